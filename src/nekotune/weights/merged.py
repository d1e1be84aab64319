"""The merged weights as a view, tensor by tensor: streamed from the checkpoint and the adapter
(low memory), or from peft's own merge_and_unload of the whole model; for QLoRA adapters, into
the base weights rounded to NF4 as training saw them (when bitsandbytes and CUDA are there)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nekotune.config import Config, ModelConfig
from nekotune.errors import UserError
from nekotune.model.source import ModelSource
from nekotune.weights.adapter import Adapter, NotStreamable
from nekotune.weights.checkpoint import BaseCheckpoint, has_safetensors, local_model_dir, torch_dtype

log = logging.getLogger(__name__)
EMBED_NAMES = ("model.embed_tokens.weight",)
LM_HEAD = "lm_head.weight"


@dataclass
class MergedModel:
    """Merged weights, tensor by tensor, in the base's layout; plus the config to write with them."""

    shards: dict[str, list[str]]
    shapes: dict[str, tuple[int, ...]]
    config: dict
    get: Callable[[str], Any]  # name -> fp32 tensor
    base_dir: Path

    def names(self) -> list[str]:
        return [n for names in self.shards.values() for n in names]


def streamed_merge(base: BaseCheckpoint, adapter: Adapter | None, roundtrip: Any = None) -> MergedModel:
    """The low-memory merge: each tensor is read, merged and handed on alone."""
    shards = {f: list(n) for f, n in base.shards.items()}
    shapes = dict(base.shapes)
    config = dict(base.config)
    sources = {n: n for n in base.shapes}  # output name -> base tensor it starts from
    if adapter is not None:
        _check_targets(adapter, base)
        _untie_if_needed(adapter, base, shards, shapes, config, sources)

    def get(name: str):
        weight = base.get(sources[name]).float()
        if roundtrip is not None:
            weight = roundtrip(sources[name], weight)
        return adapter.merge(name, weight) if adapter is not None else weight

    return MergedModel(shards, shapes, config, get, base.path)


def _check_targets(adapter: Adapter, base: BaseCheckpoint) -> None:
    tied = LM_HEAD not in base.shapes  # the checkpoint stores one matrix for both
    for name in sorted(adapter.touched()):
        if name == LM_HEAD and tied and name in adapter.layers:
            raise NotStreamable(f"{adapter.path}: the adapter has LoRA on lm_head, which shares its weights "
                                f"with the embeddings in this model")
        if name not in base.shapes and not (name == LM_HEAD and tied):
            raise UserError(f"{adapter.path}: adapter weight for {name} has no tensor in base model {base.path}; "
                            f"load the adapter on the base it was trained on")
        if name in adapter.replacements and name in base.shapes \
                and tuple(adapter.replacements[name].shape) != base.shapes[name]:
            raise NotStreamable(f"{adapter.path}: {name} has shape {tuple(adapter.replacements[name].shape)} but "
                                f"the base has {base.shapes[name]} (resized vocabulary?)")


def _is_tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False)))


def _untie_if_needed(adapter: Adapter, base: BaseCheckpoint, shards, shapes, config, sources) -> None:
    """A tied model whose lm_head or embeddings were trained as modules_to_save has two different
    matrices after the merge: write lm_head as its own tensor and untie."""
    embed = next((n for n in EMBED_NAMES if n in base.shapes), None)
    if LM_HEAD in base.shapes or embed is None:
        return
    trained = [n for n in (LM_HEAD, embed) if n in adapter.replacements]
    if not trained or all(adapter.replacements[n].float().equal(base.get(embed).float()) for n in trained):
        return
    shards[base.file_of[embed]].append(LM_HEAD)
    shapes[LM_HEAD] = base.shapes[embed]
    sources[LM_HEAD] = embed
    config["tie_word_embeddings"] = False


def inmemory_merge(spec: ModelSource, model_cfg: ModelConfig, compute_dtype: str, base: BaseCheckpoint | None,
                   roundtrip: Callable | None = None) -> MergedModel:
    """The default merge: peft's own merge_and_unload on the whole model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from nekotune.model import attach_adapter
    from nekotune.model.load import is_vision_model

    kwargs = {"dtype": torch_dtype(compute_dtype), "trust_remote_code": model_cfg.trust_remote_code}
    # a vision-language model merges with its vision tower (issue 17); tensor names stay the base's
    auto = AutoModelForImageTextToText if is_vision_model(spec, model_cfg) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(spec.base, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {spec.base} ({str(exc).splitlines()[0]})") from None
    if roundtrip is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(roundtrip(name, param.float()).to(param.dtype))
    merged = attach_adapter(model, spec).merge_and_unload()
    state = merged.state_dict()
    config = merged.config.to_dict()
    if base is None:  # .bin checkpoints: shard by size instead of copying a layout
        shards = {"model.safetensors": [n for n in state if not _is_tied_copy(n, config, state)]}
    else:
        shards = {f: list(n) for f, n in base.shards.items()}
        config = dict(base.config)
        state = _checkpoint_names(state, config, {n for names in shards.values() for n in names})
        _keep_untied_head(shards, state, base, config)
    shapes = {n: tuple(state[n].shape) for names in shards.values() for n in names}
    missing = [n for n in shapes if n not in state]
    if missing:
        raise RuntimeError(f"merged model has no tensor {missing[0]} of the base checkpoint")
    return MergedModel(shards, shapes, config, lambda n: state[n].float(), Path(spec.base))


def _is_tied_copy(name: str, config: dict, state: dict) -> bool:
    return name == LM_HEAD and _is_tied(config) and any(n in state for n in EMBED_NAMES)


def _keep_untied_head(shards, state, base: BaseCheckpoint, config) -> None:
    """modules_to_save on a tied head leaves lm_head different from the embeddings: keep both."""
    embed = next((n for n in EMBED_NAMES if n in base.shapes), None)
    if LM_HEAD in base.shapes or embed is None or LM_HEAD not in state:
        return
    if state[LM_HEAD].data_ptr() != state[embed].data_ptr() and not state[LM_HEAD].equal(state[embed]):
        shards[base.file_of[embed]].append(LM_HEAD)
        config["tie_word_embeddings"] = False


# -- QLoRA bases ------------------------------------------------------------------------------
def quantized_roundtrip(run_config: dict) -> Callable | None:
    """For an adapter trained on a 4-bit base: NF4-round the linear weights as training saw them."""
    quant = (run_config.get("model") or {}).get("quantization")
    if not quant:
        return None
    try:
        import bitsandbytes.functional as bnbf
        import torch

        if quant != "4bit" or not torch.cuda.is_available():
            raise ImportError
    except ImportError:
        log.warning("note: the adapter was trained on a %s base; merging into the original full-precision weights "
                    "(the %s round trip needs bitsandbytes and a CUDA GPU). Check the result with "
                    "`nekotune export verify`.", quant, quant)
        return None

    def roundtrip(name: str, weight):
        if weight.ndim != 2 or not name.endswith(".weight") or "embed" in name or name == LM_HEAD:
            return weight
        packed, state = bnbf.quantize_4bit(weight.to("cuda", torch.bfloat16), quant_type="nf4",
                                           compress_statistics=True)
        return bnbf.dequantize_4bit(packed, state).float().cpu()

    return roundtrip


def open_merged(spec: ModelSource, cfg: Config, low_memory: bool = True,
                compute_dtype: str | None = None) -> MergedModel:
    """The merged weights of `spec` (base alone when it has no adapter), tensor by tensor."""
    base_dir = local_model_dir(spec.base, cfg.model.revision)
    roundtrip = quantized_roundtrip(spec.run_config) if spec.adapter else None
    if spec.adapter is None or low_memory:
        _refuse_vision_low_memory(spec, cfg)
        base = BaseCheckpoint.open(base_dir)
        return streamed_merge(base, Adapter.load(spec.adapter) if spec.adapter else None, roundtrip)
    layout = BaseCheckpoint.open(base_dir) if has_safetensors(base_dir) else None
    dtype = compute_dtype or (layout.weights_dtype if layout else "float32")
    return inmemory_merge(spec, cfg.model, dtype, layout, roundtrip)


def _checkpoint_names(state: dict, config: dict, available: set[str]) -> dict:
    """In-memory tensor names as the base checkpoint spells them: Qwen2-VL/2.5-VL checkpoints use
    the hub layout (model.layers, visual.*), not transformers 5's in-memory model.language_model.*."""
    from nekotune.vision.families import checkpoint_name, family_of

    if family_of(config) is None:
        return state
    return {checkpoint_name(config, n, available) or n: v for n, v in state.items()}


def _refuse_vision_low_memory(spec: ModelSource, cfg: Config) -> None:
    """The streamed merge maps adapter names onto checkpoint names by prefix; Qwen2-VL/2.5-VL save
    the hub layout (model.layers, visual.*), not the in-memory names, so it is not wired yet."""
    from nekotune.model.load import is_vision_model

    if spec.adapter is not None and is_vision_model(spec, cfg.model):
        raise UserError(f"merge --low-memory does not support vision-language models yet; merge {spec.label} "
                        f"without --low-memory")


def _has_safetensors(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()

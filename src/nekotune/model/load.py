"""Loading a resolved model: device and precision, the tokenizer, the base weights and the adapter.

Weights from a local directory load from safetensors only, and an adapter too: nekotune never
unpickles. Code from model files runs only when the user set model.trust_remote_code (trust.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.config import Config, ModelConfig
from nekotune.devices import cpu_has_fast_bf16 as cpu_has_fast_bf16  # re-exported; lives with the device facts
from nekotune.errors import UserError
from nekotune.model.source import ModelSource, resolve_source
from nekotune.trust import is_needs_code, needs_code_error, warn_trusted

log = logging.getLogger(__name__)


# -- device and precision --------------------------------------------------------------------
@dataclass
class Precision:
    device: str
    weights: Any  # torch.dtype for the frozen base weights
    autocast: Any  # torch.dtype for autocast, or None

    @property
    def name(self) -> str:
        import torch

        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return names[self.autocast] if self.autocast is not None else names[self.weights]


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device=cuda but torch sees no CUDA GPU; install a CUDA build of torch "
                        "(see README) or use model.device=auto")
    if requested == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("model.device=mps but MPS is not available on this machine; use model.device=auto")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_precision(device: str, requested: str = "auto", training: bool = True) -> Precision:
    """devices.choose_precision's choice (the one `estimate` counts) as torch dtypes; on a Mac
    that is bf16 or fp16 where macOS and torch run it, not fp32 (docs in devices.py)."""
    import torch

    from nekotune.devices import choose_precision, probe

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    choice = choose_precision(probe(device), requested, training)
    if choice.note:
        log.warning("note: %s", choice.note)
    return Precision(device, table[choice.weights], table[choice.autocast] if choice.autocast else None)


# -- loading ---------------------------------------------------------------------------------
def chat_template_text(model_cfg: ModelConfig | None) -> str | None:
    """The Jinja file model.chat_template names, read; None when it names none."""
    if model_cfg is None or not model_cfg.chat_template:
        return None
    path = Path(model_cfg.chat_template)
    if not path.is_file():
        raise UserError(f"model.chat_template file {path} not found")
    return path.read_text(encoding="utf-8")


def load_tokenizer(spec: ModelSource, model_cfg: ModelConfig | None = None) -> Any:
    from transformers import AutoTokenizer

    source = spec.adapter if spec.adapter and _has_tokenizer(Path(spec.adapter)) else spec.base
    # only the user's own setting: effective_config never takes trust_remote_code from a run
    trust = bool(model_cfg and model_cfg.trust_remote_code)
    if trust:
        warn_trusted([spec.adapter, spec.base])
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        if not trust and is_needs_code(exc):
            raise needs_code_error(source, "tokenizer") from None
        raise UserError(f"cannot load a tokenizer from {source} ({str(exc).strip().splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    template = chat_template_text(model_cfg)
    if template is not None:
        tok.chat_template = template
    return tok


def _has_tokenizer(p: Path) -> bool:
    return (p / "tokenizer_config.json").is_file()


def check_quantization(model_cfg: ModelConfig, device: str) -> None:
    """QLoRA needs bitsandbytes on CUDA; say so before spending a minute loading weights."""
    if not model_cfg.quantization:
        return
    if device != "cuda":
        raise UserError(f"model.quantization={model_cfg.quantization} needs an NVIDIA GPU with CUDA (bitsandbytes); "
                        f"this machine trains on {device}: remove model.quantization (LoRA in bf16/fp32 works here)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.quantization needs bitsandbytes: pip install 'nekotune[qlora]' (or bitsandbytes)")


def quantization_config(model_cfg: ModelConfig, compute_dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def base_config(spec: ModelSource, model_cfg: ModelConfig | None = None) -> dict:
    """The base model's config.json as a dict ({} where it has none, e.g. a GGUF)."""
    from nekotune.model.processor import read_model_json

    return read_model_json(spec.base, "config.json", model_cfg.revision if model_cfg else None)


def is_vision_model(spec: ModelSource, model_cfg: ModelConfig | None = None) -> bool:
    """A vision-language model of a supported family (issue 17); a UserError for another VLM family."""
    from nekotune.vision.families import family_of

    return family_of(base_config(spec, model_cfg)) is not None


def load_renderer(spec: ModelSource, cfg: Config, policy: Any = None) -> tuple[Any, Any]:
    """(tokenizer, renderer): the text Renderer, or for a vision-language model the VisionRenderer
    over its processor (tokenizer + image processor at data.image_*_pixels + chat template)."""
    from nekotune.data.render import Renderer

    if not is_vision_model(spec, cfg.model):
        tokenizer = load_tokenizer(spec, cfg.model)
        return tokenizer, Renderer.from_config(tokenizer, cfg.data)
    from nekotune.data.images import DATA_POLICY
    from nekotune.data.vision_render import VisionRenderer
    from nekotune.model.processor import load_processor, processor_source

    trust = cfg.model.trust_remote_code  # only the user's own setting (effective_config)
    if trust:
        warn_trusted([spec.adapter, spec.base])
    processor = load_processor(processor_source(spec.base, spec.adapter), cfg.data.image_min_pixels,
                               cfg.data.image_max_pixels, chat_template=chat_template_text(cfg.model),
                               revision=cfg.model.revision, trust_remote_code=trust)
    return processor.tokenizer, VisionRenderer.for_processor(processor, cfg.data, policy or DATA_POLICY)


def load_model(spec: ModelSource, model_cfg: ModelConfig, precision: Precision, training: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    check_quantization(model_cfg, precision.device)
    kwargs = {"dtype": precision.weights, "trust_remote_code": model_cfg.trust_remote_code,
              "attn_implementation": model_cfg.attn_implementation or _default_attention(precision.device)}
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    if model_cfg.quantization:
        kwargs["quantization_config"] = quantization_config(model_cfg, precision.autocast or torch.bfloat16)
        # each process of a multi-GPU run keeps its quantized copy on its own GPU
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    if Path(spec.base).is_dir() and any(Path(spec.base).glob("*.safetensors")):
        kwargs["use_safetensors"] = True  # never unpickle weights from a local directory
    if model_cfg.trust_remote_code:
        warn_trusted([spec.adapter, spec.base])
    try:
        # a vision-language model loads with its vision tower (AutoModelForCausalLM refuses its config)
        auto = AutoModelForImageTextToText if is_vision_model(spec, model_cfg) else AutoModelForCausalLM
        model: Any = auto.from_pretrained(spec.base, **kwargs)
    except (OSError, ValueError) as exc:
        if not model_cfg.trust_remote_code and is_needs_code(exc):
            raise needs_code_error(spec.base, "model") from None
        raise UserError(f"cannot load model {spec.base} ({str(exc).strip().splitlines()[0]})") from None
    if not model_cfg.quantization:
        model.to(precision.device)
    if spec.adapter:
        model = attach_adapter(model, spec, trainable=training)
    if not training:
        model.eval()
    return model


def _default_attention(device: str) -> str:
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def require_safetensors_adapter(adapter: str) -> None:
    """peft would fall back to a pickled adapter_model.bin; nekotune never unpickles weights."""
    if not (Path(adapter) / "adapter_model.safetensors").is_file():
        raise UserError(f"{adapter} has no adapter_model.safetensors; nekotune loads adapters from "
                        f"safetensors only (convert the .bin with peft, or retrain)")


def attach_adapter(model: Any, spec: ModelSource, trainable: bool = False, adapter_name: str = "default") -> Any:
    from peft import PeftModel

    assert spec.adapter is not None
    require_safetensors_adapter(spec.adapter)
    try:
        return PeftModel.from_pretrained(model, spec.adapter, adapter_name=adapter_name, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"adapter {spec.adapter} does not fit base model {spec.base} ({first}); load it on the "
                        f"base it was trained on") from None


# -- inference -------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: Any
    renderer: Any
    spec: ModelSource
    cfg: Config

    @property
    def source(self) -> ModelSource:
        return self.spec


def load_source(source: ModelSource, cfg: Config) -> Loaded:
    """A resolved model (and its effective config) loaded for generation."""
    device = pick_device(cfg.model.device)
    precision = pick_precision(device, cfg.model.dtype, training=False)
    _, renderer = load_renderer(source, cfg)
    model = load_model(source, cfg.model, precision, training=False)
    return Loaded(model, renderer, source, cfg)


def load_for_inference(cfg: Config, model_arg: str | None) -> Loaded:
    return load_source(*resolve_source(cfg, model_arg))

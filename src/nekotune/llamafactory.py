"""LLaMA-Factory's YAML and datasets, read as LLaMA-Factory reads them.

`nekotune train lf.yaml` runs a LLaMA-Factory SFT or pre-training YAML. The key-by-key
translation is in aliases.py; this module holds what is LLaMA-Factory's own:

- the tables aliases.py reads (stages, defaults that differ from nekotune's, keys to refuse or
  ignore) and `is_llamafactory` to recognise such a YAML;
- `template_settings`: LLaMA-Factory's `template` name against the model's own chat template
  (nekotune always renders with the model's template; a note says when they look different);
- datasets by name: `resolve_datasets(names, dataset_dir)` reads dataset_info.json as
  LLaMA-Factory's data/parser.py does (file_name or hub ids, formatting, columns, tags, split,
  num_samples), and `convert_row` turns each row into nekotune's `messages` (or `text`) row,
  following data/converter.py; the data stage reads the files (data/llamafactory.py), so
  nekotune's own readers and checks take over from there.

Why not squeeze this into `data.columns`: LLaMA-Factory's columns are optional (a missing
`query` is no error), its ShareGPT tags rename roles, and several datasets are mixed; one small
adapter per dataset is simpler and keeps nekotune's reader strict for its own formats.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from nekotune.errors import UserError

# stage -> data.format (None: nekotune's default). rm, ppo, dpo, kto are preference stages.
STAGES: dict[str, str | None] = {"sft": None, "pt": "text"}
# LLaMA-Factory's (and HF TrainingArguments') defaults that change what is learned, applied to
# the keys a LLaMA-Factory YAML omits so that it trains what `llamafactory-cli train` would.
DEFAULTS: dict[str, Any] = {"lora.r": 8, "data.max_seq_len": 2048, "train.lr": 5e-5, "train.batch_size": 8,
                            "train.scheduler": "linear", "train.warmup_ratio": 0.0}
# Defaults that differ but change nothing learned: kept as nekotune's, said once.
KEPT_DEFAULTS = {"logging_steps": "(LLaMA-Factory logs every 500 steps by default; nekotune keeps "
                                  "train.logging_steps=5)",
                 "save_steps": "(LLaMA-Factory saves every 500 steps by default; nekotune keeps saving each epoch)"}
MARKERS = ("stage", "finetuning_type", "dataset_dir")
CONTEXTUAL = {"stage", "finetuning_type", "template"}
LIST_KEYS = {"dataset", "eval_dataset", "lora_target", "additional_target", "report_to"}

IGNORED: dict[str, str] = {
    "data_shared_file_system": "", "ignore_pad_token_for_loss": "", "eval_num_beams": "", "buffer_size": "",
    "eval_on_each_dataset": "nekotune reports one eval loss", "compute_accuracy": "nekotune reports eval loss",
    "predict_with_generate": "use nekotune predict", "generation_max_length": "use generate.max_new_tokens",
    "generation_num_beams": "", "include_num_input_tokens_seen": "run.json records tokens", "print_param_status": "",
    "om_hub_token": "", "infer_backend": "nekotune trains with transformers", "infer_dtype": "use model.dtype",
    "quantization_device_map": "", "use_unsloth_gc": "", "plot_loss_keys": "", "use_reentrant_gc": "",
    "double_quantization": "4-bit loading always uses double quantization", "mix_strategy": "",
}
# Prefixes of settings for methods nekotune does not run; under stage sft/pt LLaMA-Factory
# ignores them too (dpo_* only matter to stage dpo), so they are warnings, not errors.
FAMILIES: dict[str, str] = {
    "pref_": "only for LLaMA-Factory's preference stages", "dpo_": "only for stage dpo",
    "kto_": "only for stage kto", "simpo_": "only for stage dpo", "ppo_": "only for stage ppo",
    "ref_model": "only for preference stages", "reward_model": "only for stage ppo", "ld_alpha": "",
    "freeze_": "only for finetuning_type: freeze", "oft_": "only for finetuning_type: oft",
    "galore_": "only with use_galore", "apollo_": "only with use_apollo", "badam_": "only with use_badam",
    "swanlab_": "set SWANLAB_PROJECT / SWANLAB_MODE / SWANLAB_LOG_DIR / SWANLAB_API_KEY in the environment",
    "vllm_": "an inference setting", "sglang_": "an inference setting", "ray_": "", "kt_": "",
    "image_": "nekotune trains text models", "video_": "nekotune trains text models",
    "audio_": "nekotune trains text models",
}
UNSUPPORTED: dict[str, str] = {
    "mask_history": "nekotune trains every assistant turn; remove it",
    "streaming": "nekotune reads the whole dataset; remove it",
    "interleave_probs": "nekotune concatenates the datasets; remove it",
    "tokenized_path": "nekotune tokenizes from the datasets; remove it",
    "quantization_method": "nekotune quantizes with bitsandbytes", "quantization_type": "nekotune quantizes to nf4",
    "adapter_name_or_path": "nekotune trains a new adapter; continue a run with output.dir=<run> "
    "train.resume=true, or merge the adapter first (nekotune merge)",
    "preserve_thinking": "remove it", "tool_format": "nekotune trains no tool calls", "media_dir": "nekotune "
    "trains text models", "loraplus_lr_ratio": "remove it", "loraplus_lr_embedding": "remove it",
    "pissa_init": "remove it", "pissa_iter": "remove it", "pissa_convert": "remove it",
    "create_new_adapter": "remove it", "use_galore": "remove it", "use_apollo": "remove it",
    "use_badam": "remove it", "use_muon": "remove it", "use_adam_mini": "remove it", "use_llama_pro": "remove it",
    "use_mca": "remove it", "use_dft_loss": "remove it", "use_asft_loss": "remove it", "use_eaft_loss": "remove it",
    "use_unsloth": "remove it", "rope_scaling": "remove it", "shift_attn": "remove it", "resize_vocab": "remove it",
    "add_tokens": "remove it", "add_special_tokens": "remove it", "train_from_scratch": "remove it",
    "upcast_layernorm": "remove it", "upcast_lmhead_output": "remove it", "moe_aux_loss_coef": "remove it",
    "fp8": "remove it", "use_kt": "remove it",
}
HARMLESS_DEFAULTS: dict[str, Any] = {
    "mask_history": False, "streaming": False, "interleave_probs": None, "tokenized_path": None,
    "quantization_method": "bnb", "quantization_type": "nf4", "adapter_name_or_path": None,
    "preserve_thinking": False, "tool_format": None, "loraplus_lr_ratio": None, "pissa_init": False,
    "create_new_adapter": False, "use_galore": False, "use_apollo": False, "use_badam": False, "use_muon": False,
    "use_adam_mini": False, "use_llama_pro": False, "use_mca": False, "use_dft_loss": False, "use_unsloth": False,
    "rope_scaling": None, "shift_attn": False, "resize_vocab": False, "add_tokens": None, "add_special_tokens": None,
    "train_from_scratch": False, "upcast_layernorm": False, "upcast_lmhead_output": False, "fp8": False,
    "use_kt": False, "media_dir": None,
}


def is_llamafactory(raw: Mapping[str, Any]) -> bool:
    """A LLaMA-Factory YAML: its examples always say `stage` and `finetuning_type`; a
    `dataset` of names with `template` or `cutoff_len` is one too."""
    return any(k in raw for k in MARKERS) or ("dataset" in raw and ("template" in raw or "cutoff_len" in raw))


def family_reason(key: str) -> str:
    prefix = next((p for p in FAMILIES if key.startswith(p)), None)
    if prefix is None:
        return ""
    return FAMILIES[prefix] or "a setting of a method nekotune does not run"


# -- template -> the model's own chat template ---------------------------------------------------
# Model families, most specific first: a regex over the model's name or path. A heuristic for a
# note only: nekotune renders with the model's own template whatever the result.
FAMILY_PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("qwen3_5", r"qwen3[.\-_]?5", "Qwen3.5"), ("qwen3_6", r"qwen3[.\-_]?6", "Qwen3.6"),
    ("qwen3_vl", r"qwen3[\-_]?vl", "Qwen3-VL"), ("qwen3_omni", r"qwen3[\-_]?omni", "Qwen3-Omni"),
    ("qwen3", r"qwen3", "Qwen3"), ("qwen2_vl", r"qwen2(\.5)?[\-_]?vl", "Qwen2-VL"),
    ("qwen", r"qwen|qwq", "Qwen / Qwen2 / Qwen2.5"), ("llama4", r"llama[\-_]?4", "Llama 4"),
    ("llama3", r"llama[\-_]?3", "Llama 3"), ("llama2", r"llama[\-_]?2", "Llama 2"),
    ("ministral", r"ministral", "Ministral"), ("mistral", r"mistral|mixtral", "Mistral"),
    ("gemma3", r"gemma[\-_]?3", "Gemma 3"), ("gemma2", r"gemma[\-_]?2", "Gemma 2"), ("gemma", r"gemma", "Gemma"),
    ("smollm2", r"smollm2", "SmolLM2"), ("smollm", r"smollm", "SmolLM"),
    ("phi4_mini", r"phi[\-_]?4[\-_]?mini", "Phi-4-mini"), ("phi4", r"phi[\-_]?4", "Phi-4"), ("phi", r"phi[\-_]?3",
                                                                                           "Phi-3"),
    ("deepseekr1", r"deepseek[\-_]?r1", "DeepSeek-R1"), ("deepseek3", r"deepseek[\-_]?v3", "DeepSeek-V3"),
    ("deepseekcoder", r"deepseek[\-_]?coder", "DeepSeek-Coder"), ("deepseek", r"deepseek", "DeepSeek"),
    ("chatglm3", r"chatglm3", "ChatGLM3"), ("glm4", r"glm[\-_]?4", "GLM-4"), ("intern2", r"internlm[\-_]?2",
                                                                               "InternLM2"),
    ("yi", r"(^|/)yi[\-_]", "Yi"), ("granite3", r"granite[\-_]?3", "Granite 3"), ("gpt_oss", r"gpt[\-_]?oss",
                                                                                    "gpt-oss"),
    ("ernie", r"ernie", "ERNIE"), ("exaone", r"exaone", "EXAONE"), ("olmo", r"olmo", "OLMo"),
)
# LLaMA-Factory templates named differently from the family they serve.
TEMPLATE_FAMILY = {"qwen3_nothink": "qwen3", "qwen3_5_nothink": "qwen3_5", "qwen3_vl_nothink": "qwen3_vl",
                   "qwen3_omni_nothink": "qwen3_omni", "ernie_nothink": "ernie", "llama2_zh": "llama2",
                   "glm4_moe": "glm4", "glm4_7": "glm4", "phi_small": "phi", "hunyuan_small": "hunyuan"}
PLAIN_TEMPLATES = {"default", "alpaca", "empty", "vicuna", "fewshot", "base"}  # no chat markup
GENERIC_TEMPLATES = {"chatml", "chatml_de"}  # ChatML: many models' own template


def model_family(name: str) -> str | None:
    text = name.lower().replace("\\", "/")
    return next((family for family, pattern, _ in FAMILY_PATTERNS if re.search(pattern, text)), None)


def _label(family: str) -> str:
    return next((label for fam, _, label in FAMILY_PATTERNS if fam == family), family)


def template_settings(template: str, model: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """LLaMA-Factory's `template` -> (nested settings, [(note, kind)]). `*_nothink` turns thinking
    off; everything else is a note, because nekotune renders with the model's own template."""
    name = template.strip().lower()
    settings: dict[str, Any] = {}
    notes: list[tuple[str, str]] = []
    if name.endswith("_nothink"):
        settings["data.enable_thinking"] = False
        notes.append((f"template: {template} -> data.enable_thinking=false", "alias"))
    rendering = "nekotune renders with the model's own chat template (`nekotune data check` shows it)"
    if name in PLAIN_TEMPLATES:
        notes.append((f"template: {template} is a plain-text prompt in LLaMA-Factory; {rendering}; to train with a "
                      f"plain prompt, set model.chat_template to a Jinja file", "warning"))
        return settings, notes
    if name in GENERIC_TEMPLATES:
        notes.append((f"template: {template} -> {rendering}; they agree for models that ship ChatML", "alias"))
        return settings, notes
    wanted = TEMPLATE_FAMILY.get(name, name)
    have = model_family(model)
    if wanted not in {f for f, _, _ in FAMILY_PATTERNS}:
        notes.append((f"template: {template} is not a template nekotune knows; {rendering}", "warning"))
    elif have is None:
        notes.append((f"template: {template} ({_label(wanted)}) -> {rendering}; the model's family cannot be told "
                      f"from {model!r}, so compare them", "warning"))
    elif have != wanted:
        notes.append((f"template: {template} is LLaMA-Factory's {_label(wanted)} template but the model looks like "
                      f"{_label(have)}; {rendering}", "warning"))
    else:
        notes.append((f"template: {template} -> the model's own chat template ({_label(have)})", "alias"))
    return settings, notes


# -- datasets by name ------------------------------------------------------------------------------
INFO_FILE = "dataset_info.json"
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet", ".txt")  # LLaMA-Factory also reads .arrow
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
COLUMN_NAMES = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos",
                "audios", "chosen", "rejected", "kto_tag")


@dataclass(frozen=True)
class LFDataset:
    """One entry of dataset_info.json, resolved. `columns` and `tags` follow LLaMA-Factory: when
    the entry lists `columns` (or `tags`), the ones it leaves out are None, not the defaults."""

    name: str
    formatting: str  # alpaca | sharegpt | openai
    stage: str = "sft"
    files: tuple[Path, ...] = ()  # local files (a file_name may be a folder of files of one type)
    hub: str | None = None  # "huggingface" | "modelscope"
    hub_id: str | None = None
    subset: str | None = None
    folder: str | None = None
    split: str = "train"
    num_samples: int | None = None
    columns: Mapping[str, str | None] = field(default_factory=dict)
    tags: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def format(self) -> str:
        """The nekotune format of the rows `read_dataset` returns."""
        return "text" if self.stage == "pt" else "messages"


def resolve_datasets(names: list[str] | str, dataset_dir: str | Path, stage: str = "sft") -> list[LFDataset]:
    """`dataset: a,b` + `dataset_dir` -> one LFDataset per name, in order."""
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    wanted = [n for n in wanted if n]
    if str(dataset_dir) == "ONLINE":  # LLaMA-Factory: every name is a hub dataset id
        hub = "modelscope" if _truthy(os.environ.get("USE_MODELSCOPE_HUB")) else "huggingface"
        return [LFDataset(name=n, formatting="alpaca", stage=stage, hub=hub, hub_id=n,
                          columns=dict(ALPACA_COLUMNS)) for n in wanted]
    if str(dataset_dir).startswith("REMOTE:"):
        raise UserError(f"dataset_dir {dataset_dir}: download that repository's {INFO_FILE} and data files, and "
                        f"set dataset_dir to the folder holding them")
    info_path = Path(dataset_dir).expanduser() / INFO_FILE
    info = _read_info(info_path)
    return [_entry(name, info, info_path, stage) for name in wanted]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "y")


def _read_info(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found; LLaMA-Factory `dataset:` names are looked up in dataset_dir/{INFO_FILE}: "
                        f"set dataset_dir to the folder holding it (LLaMA-Factory's data/), or give data.path")
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); fix the file") \
            from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise UserError(f"{path}: expected a JSON object of dataset names to their definitions")
    return info


def _entry(name: str, info: dict, info_path: Path, stage: str) -> LFDataset:
    if name not in info:
        known = ", ".join(sorted(info)[:12]) + (", ..." if len(info) > 12 else "")
        raise UserError(f"dataset `{name}` is not defined in {info_path} (defined: {known or 'none'}); add it there "
                        f"or fix the name")
    attr = info[name]
    where = f"dataset `{name}` ({info_path})"
    if attr.get("ranking") or any((attr.get("columns") or {}).get(c) for c in ("chosen", "rejected", "kto_tag")):
        raise UserError(f"{where} is a preference dataset (chosen/rejected or kto_tag); stage sft and pt train on "
                        f"single answers: pick a supervised dataset")
    columns = _columns(attr, where)
    tags: dict[str, str | None] = {k: None for k in SHAREGPT_TAGS} if "tags" in attr else dict(SHAREGPT_TAGS)
    tags.update({k: v for k, v in (attr.get("tags") or {}).items() if k in SHAREGPT_TAGS})
    fmt = str(attr.get("formatting", "alpaca")).lower()
    if fmt not in ("alpaca", "sharegpt", "openai"):
        raise UserError(f"{where}: formatting {fmt!r} is not alpaca, sharegpt or openai")
    base = LFDataset(name=name, formatting=fmt, stage=stage, subset=attr.get("subset"), folder=attr.get("folder"),
                     split=str(attr.get("split", "train")), num_samples=attr.get("num_samples"),
                     columns=columns, tags=tags)
    hub = _hub(attr)
    if hub:
        return replace(base, hub=hub[0], hub_id=hub[1])
    if "script_url" in attr or "cloud_file_name" in attr:
        raise UserError(f"{where}: loading scripts and cloud files are not read by nekotune (it never runs code "
                        f"from a dataset); download the data and give file_name")
    if "file_name" not in attr:
        raise UserError(f"{where}: no file_name (or hf_hub_url / ms_hub_url); add one")
    return replace(base, files=_files(info_path.parent / str(attr["file_name"]), where))


def _columns(attr: dict, where: str) -> dict[str, str | None]:
    given = attr.get("columns")
    if given is None:
        return {**ALPACA_COLUMNS, "messages": "conversations", "system": None, "tools": None}
    if not isinstance(given, dict):
        raise UserError(f"{where}: `columns` must be an object of column names")
    columns: dict[str, str | None] = {k: given.get(k) for k in COLUMN_NAMES}
    for media in ("images", "videos", "audios"):
        if columns[media]:
            raise UserError(f"{where} has {media}; nekotune trains text models: pick a text dataset")
    if columns["tools"]:
        raise UserError(f"{where} has a tools column (tool calling); nekotune trains no tool calls: pick "
                        f"another dataset")
    return columns


def _hub(attr: dict) -> tuple[str, str] | None:
    """LLaMA-Factory's choice: ModelScope with USE_MODELSCOPE_HUB=1 or when there is no HF id."""
    hf, ms = attr.get("hf_hub_url"), attr.get("ms_hub_url")
    if ms and (_truthy(os.environ.get("USE_MODELSCOPE_HUB")) or not hf):
        return "modelscope", str(ms)
    if hf:
        return "huggingface", str(hf)
    if attr.get("om_hub_url"):
        raise UserError(f"dataset {attr['om_hub_url']}: nekotune does not read the OpenMind hub; download it and "
                        f"give file_name")
    return None


def _files(path: Path, where: str) -> tuple[Path, ...]:
    if path.is_dir():  # a folder of files of one type, as LLaMA-Factory reads it (not recursive)
        files = tuple(sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")))
    elif path.is_file():
        files = (path,)
    else:
        raise UserError(f"{where}: file {path} not found; fix file_name or dataset_dir")
    kinds = {p.suffix.lower().replace(".jsonl", ".json") for p in files}
    if not files or len(kinds) != 1 or not all(p.suffix.lower() in FILE_TYPES for p in files):
        raise UserError(f"{where}: {path} must be one {'/'.join(t.lstrip('.') for t in FILE_TYPES)} file or a "
                        f"folder of files of one such type (arrow: convert to parquet)")
    return files


# -- rows ----------------------------------------------------------------------------------------
def sample_rows(rows: list, n: int, seed: int) -> list:
    """LLaMA-Factory's num_samples: a permutation of all rows cut to n, topped up with random
    draws when n is larger (so every row is used before any repeats)."""
    if not rows or n <= 0:
        return []
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    order = order[:n] + [rng.randrange(len(rows)) for _ in range(max(0, n - len(rows)))]
    return [rows[i] for i in order]


def convert_row(ds: LFDataset, data: dict, where: str) -> dict:
    """One LLaMA-Factory row -> `{"messages": [...]}` (or `{"text": ...}` for stage pt)."""
    system, messages = (_alpaca(ds, data, where) if ds.formatting == "alpaca" else _sharegpt(ds, data, where))
    if ds.stage == "pt":  # LLaMA-Factory pre-trains on the first prompt's text
        first = next((m["content"] for m in messages if m["role"] == "user"), "")
        return {"text": first}
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


def _text(value: Any, where: str, column: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: column `{column}` must be text, got {type(value).__name__}")
    return value


def _alpaca(ds: LFDataset, data: dict, where: str) -> tuple[str, list[dict]]:
    cols = ds.columns
    messages: list[dict] = []
    history = data.get(cols["history"]) if cols.get("history") else None
    if isinstance(history, list):
        for pair in history:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise UserError(f"{where}: column `{cols['history']}` must be a list of [question, answer] pairs")
            messages += [{"role": "user", "content": _text(pair[0], where, str(cols["history"]))},
                         {"role": "assistant", "content": _text(pair[1], where, str(cols["history"]))}]
    parts = [_text(data[c], where, c) for c in (cols.get("prompt"), cols.get("query")) if c and data.get(c)]
    messages.append({"role": "user", "content": "\n".join(parts)})  # LLaMA-Factory joins them with one newline
    answer = data.get(cols["response"]) if cols.get("response") else None
    if isinstance(answer, (str, int, float)) and not isinstance(answer, bool):  # a number is an answer too
        messages.append({"role": "assistant", "content": _text(answer, where, str(cols["response"]))})
    elif ds.stage != "pt":
        raise UserError(f"{where}: no answer text in column `{cols.get('response')}` (dataset `{ds.name}`); fill it "
                        f"in, or fix `columns` in dataset_info.json")
    system = data.get(cols["system"]) if cols.get("system") else ""
    return _text(system or "", where, str(cols.get("system"))), messages


def _sharegpt(ds: LFDataset, data: dict, where: str) -> tuple[str, list[dict]]:
    column, t = ds.columns.get("messages"), ds.tags
    turns = data.get(column) if column else None
    if not isinstance(turns, list) or not all(isinstance(m, dict) for m in turns):
        raise UserError(f"{where}: column `{column}` (dataset `{ds.name}`) must be a list of message objects")
    roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["system_tag"]: "system",
             t["observation_tag"]: "tool", t["function_tag"]: "tool"}
    roles.pop(None, None)
    system = ""
    if t["system_tag"] and turns and turns[0].get(t["role_tag"]) == t["system_tag"]:
        system, turns = _text(turns[0].get(t["content_tag"]), where, str(t["content_tag"])), turns[1:]
    elif ds.columns.get("system") and data.get(ds.columns["system"]):
        system = _text(data[ds.columns["system"]], where, str(ds.columns["system"]))
    messages = []
    for i, turn in enumerate(turns, start=1):
        tag = turn.get(t["role_tag"])
        role = roles.get(tag)
        if role is None:
            raise UserError(f"{where}: {column}[{i}].{t['role_tag']} is {tag!r}, none of the dataset's tags "
                            f"({', '.join(str(k) for k in roles)}); fix the row or `tags` in dataset_info.json")
        if role == "tool" or turn.get("tool_calls"):
            raise UserError(f"{where}: {column}[{i}] is a tool call or tool result; nekotune trains no tool calls")
        messages.append({"role": role, "content": _text(turn.get(t["content_tag"]), where, str(t["content_tag"]))})
    return system, messages

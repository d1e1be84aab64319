"""`translate`: a config mapping in other tools' words -> nekotune's nested mapping + notes."""

from __future__ import annotations

from typing import Any, Mapping

from nekotune import llamafactory as lf
from nekotune.aliases.tables import ALIASES, CONTEXTUAL, HARMLESS_DEFAULTS, IGNORED, SAME_NAME, UNSUPPORTED, known_names
from nekotune.aliases.values import SECTIONS, Note, _Skip, csv_list, steps, to_bool, to_float, to_int
from nekotune.errors import UserError


# -- translate -----------------------------------------------------------------------------------
def set_dotted(nested: dict, dotted: str, value: Any) -> None:
    node = nested
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def get_dotted(nested: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = nested
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, float) else f"{value:g}"


def _one(key: str, value: Any, nested: dict, notes: list[Note], errors: list[str]) -> None:
    if key in ALIASES:
        alias = ALIASES[key]
        try:
            out = alias.convert(value) if alias.convert else value
        except (ValueError, TypeError) as exc:
            errors.append(f"`{key}: {_show(value)}`: {exc}")
            return
        if isinstance(out, _Skip):
            notes.append(Note(f"{key}: {_show(value)} -> {alias.target} keeps nekotune's default"))
            return
        set_dotted(nested, alias.target, out)
        changed = "" if out == value and type(out) is type(value) else f" ({_show(value)} -> {_show(out)})"
        notes.append(Note(f"{key} -> {alias.target}{changed}"))
    elif key in SAME_NAME:
        set_dotted(nested, SAME_NAME[key], value)
        notes.append(Note(f"{key} -> {SAME_NAME[key]}"))
    elif key in UNSUPPORTED:
        if key in HARMLESS_DEFAULTS and HARMLESS_DEFAULTS[key] == value:
            notes.append(Note(f"{key}: {_show(value)} is that tool's default; nothing to translate"))
        else:
            errors.append(f"`{key}: {_show(value)}` has no nekotune equivalent; {UNSUPPORTED[key]}")
    elif key in IGNORED:
        why = IGNORED[key]
        notes.append(Note(f"{key}: ignored" + (f" ({why})" if why else " (no effect in nekotune)"), "warning"))


def translate(raw: Mapping[str, Any], source: str = "the config", *,
              llamafactory: bool | None = None) -> tuple[dict, list[Note]]:
    """`raw` (a YAML mapping, or overrides already parsed to values) -> (nested mapping, notes).

    nekotune's own sections and unknown keys pass through unchanged (config validation reports an
    unknown key with a hint); `source` names the file or "the command line" in errors. A
    LLaMA-Factory YAML is detected (`llamafactory.is_llamafactory`) unless `llamafactory` says."""
    nested: dict = {}
    notes: list[Note] = []
    errors: list[str] = []
    names = known_names()
    nested_leaves = {f"{s}.{k}" for s in SECTIONS if isinstance(raw.get(s), Mapping) for k in raw[s]}
    for key, value in raw.items():
        target = ALIASES[key].target if key in ALIASES else SAME_NAME.get(key)
        if target in nested_leaves:  # `learning_rate: 1e-4` beside `train: {lr: 2e-4}`: which one is meant?
            errors.append(f"`{key}` and `{target}` are both set; keep one")
        elif key in ("model", "data") and isinstance(value, str):  # `model: Qwen/Qwen3-1.7B`, `data: train.json`
            target = "model.name_or_path" if key == "model" else "data.path"
            set_dotted(nested, target, value)
            notes.append(Note(f"{key} -> {target}"))
        elif key in SECTIONS or key == "preset":
            nested[key] = _merge(nested.get(key), value)  # nested keys first, flat ones never clash (above)
        elif key in names and key not in CONTEXTUAL:
            _one(key, value, nested, notes, errors)
        elif lf.family_reason(key):  # galore_rank, pref_beta, ...: settings of methods nekotune does not run
            notes.append(Note(f"{key}: ignored ({lf.family_reason(key)})", "warning"))
        elif key not in CONTEXTUAL:
            nested[key] = value  # not ours: config validation names it
    _post(raw, nested, notes, errors)
    if lf.is_llamafactory(raw) if llamafactory is None else llamafactory:
        _post_llamafactory(raw, nested, notes, errors)
    elif "dataset" in raw:
        _plain_dataset(raw["dataset"], nested, notes, errors)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise UserError(f"{source}: " + "; ".join(errors[:3]) + more)
    return nested, notes


def _post_llamafactory(raw: Mapping[str, Any], nested: dict, notes: list[Note], errors: list[str]) -> None:
    """What a LLaMA-Factory YAML means beyond its keys: the stage and method, LLaMA-Factory's
    own defaults for what it omits (so it trains what `llamafactory-cli train` would), the
    template, and datasets named in dataset_info.json."""
    stage = str(raw.get("stage", "sft")).lower()
    if stage not in lf.STAGES:
        errors.append(f"`stage: {stage}`: nekotune trains stage sft or pt")
    elif lf.STAGES[stage]:
        set_dotted(nested, "data.format", lf.STAGES[stage])
        notes.append(Note(f"stage: {stage} -> data.format={lf.STAGES[stage]} (one text per row; LLaMA-Factory "
                          f"concatenates pt rows into cutoff_len blocks)"))
    method = str(raw.get("finetuning_type", "lora")).lower()
    if method != "lora":
        errors.append(f"`finetuning_type: {method}`: nekotune trains LoRA adapters; use finetuning_type: lora")
    for dotted, value in lf.DEFAULTS.items():
        if get_dotted(nested, dotted) is None and not (dotted == "train.warmup_ratio" and "warmup_steps" in raw):
            set_dotted(nested, dotted, value)
            notes.append(Note(f"(LLaMA-Factory default) {dotted}={_show(value)}", "default"))
    if get_dotted(nested, "lora.alpha") is None:  # LLaMA-Factory: lora_alpha defaults to 2 * lora_rank
        alpha = 2 * get_dotted(nested, "lora.r")
        set_dotted(nested, "lora.alpha", alpha)
        notes.append(Note(f"(LLaMA-Factory default lora_alpha = 2 x lora_rank) lora.alpha={alpha}", "default"))
    for key, note in lf.KEPT_DEFAULTS.items():
        if key not in raw:
            notes.append(Note(note, "default"))
    if raw.get("template"):
        settings, lines = lf.template_settings(str(raw["template"]), str(get_dotted(nested, "model.name_or_path", "")))
        for dotted, value in settings.items():
            set_dotted(nested, dotted, value)
        notes.extend(Note(text, kind) for text, kind in lines)
    if raw.get("dataset"):
        set_dotted(nested, "data.dataset", csv_list(raw["dataset"]))  # new key
        notes.append(Note("dataset -> data.dataset (names in dataset_dir/dataset_info.json)"))
        if get_dotted(nested, "data.dataset_dir") is None:
            set_dotted(nested, "data.dataset_dir", "data")
            notes.append(Note("(LLaMA-Factory default) data.dataset_dir='data'", "default"))
        if "max_samples" in raw:
            notes.append(Note("max_samples: LLaMA-Factory keeps the first max_samples rows of each dataset; "
                              "so does nekotune with data.dataset", "default"))


def _merge(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **new}
    return new


def _plain_dataset(value: Any, nested: dict, notes: list[Note], errors: list[str]) -> None:
    """qlora/TRL `dataset`: a file or hub id is data.path; a bare name needs LLaMA-Factory's
    dataset_info.json (`dataset_dir`)."""
    if isinstance(value, str) and ("/" in value or "\\" in value or "." in value) and "," not in value:
        set_dotted(nested, "data.path", value)
        notes.append(Note("dataset -> data.path"))
    else:
        errors.append(f"`dataset: {_show(value)}` names datasets without a dataset_info.json; give data.path "
                      f"(a file, folder or hub id) or LLaMA-Factory's dataset_dir")


def _post(raw: Mapping[str, Any], nested: dict, notes: list[Note], errors: list[str]) -> None:
    """Keys read together: alpaca-lora's batch sizes, warmup in steps, HF strategies with their
    steps, qlora's two lengths, the best-model direction, trackers named by their settings."""
    if "batch_size" in raw and "micro_batch_size" in raw:  # alpaca-lora: batch_size is the effective batch
        try:
            accum = max(1, to_int(raw["batch_size"]) // to_int(raw["micro_batch_size"]))
        except ValueError as exc:
            errors.append(f"`batch_size` / `micro_batch_size`: {exc}")
        else:
            set_dotted(nested, "train.batch_size", to_int(raw["micro_batch_size"]))
            set_dotted(nested, "train.grad_accum", accum)
            notes.append(Note(f"batch_size {raw['batch_size']} with micro_batch_size -> train.grad_accum={accum}"))
            notes[:] = [n for n in notes if not n.startswith("batch_size -> ")]
    if "warmup_steps" in raw:
        _warmup(raw["warmup_steps"], nested, notes, errors)
    _steps_and_strategies(raw, nested, notes, errors)
    if "source_max_len" in raw or "target_max_len" in raw:  # qlora: prompt and answer lengths apart
        total = to_int(raw.get("source_max_len", 1024)) + to_int(raw.get("target_max_len", 256))
        set_dotted(nested, "data.max_seq_len", total)
        notes.append(Note(f"source_max_len + target_max_len -> data.max_seq_len={total}"))
    if "greater_is_better" in raw and to_bool(raw["greater_is_better"]):
        errors.append("`greater_is_better: true`: nekotune keeps the checkpoint with the lowest train.best_metric "
                      "(a loss); remove it")
    if raw.get("prompt_template_name"):
        notes.append(Note("prompt_template_name: ignored (nekotune renders rows with the model's chat template; "
                          "set model.chat_template to a Jinja file for a plain-text prompt)", "warning"))
    for key, tracker, extra in (("wandb_project", "wandb", " (set WANDB_PROJECT for the project name)"),
                                ("use_swanlab", "swanlab", "")):
        if raw.get(key) and (key != "use_swanlab" or to_bool(raw[key])):
            reporters = [r for r in get_dotted(nested, "train.report_to") or [] if r != "none"]
            set_dotted(nested, "train.report_to", sorted({*reporters, tracker}))
            notes.append(Note(f"{key} -> train.report_to += {tracker}{extra}"))


def _warmup(value: Any, nested: dict, notes: list[Note], errors: list[str]) -> None:
    try:
        number = to_float(value)
    except ValueError as exc:
        errors.append(f"`warmup_steps: {_show(value)}`: {exc}")
        return
    if 0 < number < 1:  # transformers 5 reads a float below 1 as a ratio of all steps
        set_dotted(nested, "train.warmup_ratio", number)
        notes.append(Note(f"warmup_steps -> train.warmup_ratio ({number:g} is a ratio of all steps)"))
    elif number >= 1:
        set_dotted(nested, "train.warmup_steps", to_int(number))  # new key
        notes.append(Note("warmup_steps -> train.warmup_steps"))


def _steps_and_strategies(raw: Mapping[str, Any], nested: dict, notes: list[Note], errors: list[str]) -> None:
    """HF/LF `save_steps: 0.1` is a ratio of ALL steps; nekotune's fraction is of an EPOCH, so a
    ratio r of N epochs is r * N epochs (or round(r * max_steps) steps with max_steps)."""
    epochs = get_dotted(nested, "train.epochs", 3.0)
    max_steps = get_dotted(nested, "train.max_steps", -1)
    frac = raw.get("checkpoint_every_epoch_frac")  # the Alpaca kit: already a fraction of an epoch
    for kind in ("save", "eval"):
        strategy = raw.get(f"{kind}_strategy", raw.get("evaluation_strategy") if kind == "eval" else None)
        key, name = f"train.{kind}_steps", f"{kind}_steps"
        if frac is not None:
            set_dotted(nested, key, to_float(frac))
            notes.append(Note(f"checkpoint_every_epoch_frac -> {key}"))
            continue
        try:
            value = steps(raw[name]) if raw.get(name) is not None else None
        except ValueError as exc:
            errors.append(f"`{name}: {_show(raw[name])}`: {exc}")
            continue
        strategy = str(strategy).lower() if strategy is not None else None
        if strategy == "epoch":
            notes.append(Note(f"{kind}_strategy: epoch -> {key} unset (nekotune {kind}s each epoch)"))
        elif strategy == "no":
            what = "saves a checkpoint each epoch" if kind == "save" else "evaluates when there is validation data"
            notes.append(Note(f"{kind}_strategy: no: ignored (nekotune {what})", "warning"))
        elif strategy == "best":
            set_dotted(nested, "train.load_best", True)
            notes.append(Note("save_strategy: best -> train.load_best=true (checkpoints still saved to resume)"))
        elif strategy not in (None, "steps"):
            errors.append(f"`{kind}_strategy: {strategy}`: use steps, epoch or no")
        elif value is None and strategy == "steps":
            value = 500 if kind == "save" else get_dotted(nested, "train.logging_steps", 500)
            notes.append(Note(f"{kind}_strategy: steps without {name} -> {key}={value} (the Trainer's default)"))
            set_dotted(nested, key, value)
        elif value is not None:
            _set_steps(name, key, value, epochs, max_steps, nested, notes)


def _set_steps(name: str, key: str, value: Any, epochs: Any, max_steps: Any, nested: dict,
               notes: list[Note]) -> None:
    if isinstance(value, float):
        if isinstance(max_steps, int) and max_steps > 0:
            resolved: Any = max(1, round(value * max_steps))
            notes.append(Note(f"{name} -> {key}={resolved} ({value:g} of max_steps {max_steps})"))
        else:
            resolved = value * float(epochs)
            notes.append(Note(f"{name} -> {key}={resolved:g} epochs ({value:g} of all steps of {float(epochs):g} "
                              f"epochs)"))
        set_dotted(nested, key, resolved)
    else:
        set_dotted(nested, key, value)
        notes.append(Note(f"{name} -> {key}"))



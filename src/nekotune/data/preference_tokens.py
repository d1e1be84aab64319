"""Preference rows -> token ids through nekotune's one Renderer, and `data check` for preference files.

A pair's prompt ids are `Renderer.prompt_ids(prompt)`, byte for byte what chat sends; each answer's ids
are the span `Renderer.encode` trains for that answer (the answer and its end-of-turn token, not the
newline some templates write after it). TRL is handed these ids and never re-templates: its own
templating would also train the newline after `<|im_end|>` and can move the prompt/answer cut where BPE
merges across it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nekotune.data import percentile
from nekotune.data.formats import Conversation, Turn, apply_mapping
from nekotune.data.preference import (
    Example,
    KTOExample,
    PreferencePair,
    load_examples,
    preference_format_name,
    resolve_format,
    unpair,
)
from nekotune.data.render import IGNORE, Encoded, Renderer
from nekotune.data.sources import Row, read_rows
from nekotune.errors import UserError


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    where: str = ""

    def row(self) -> dict:
        """The columns nekotune's TRL subclasses read (nekotune/preference.py)."""
        return {"prompt_ids": self.prompt_ids, "chosen_ids": self.chosen_ids, "rejected_ids": self.rejected_ids}

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class EncodedKTO:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    truncated: bool = False
    where: str = ""

    def row(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "completion_ids": self.completion_ids, "label": self.label}

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


class PreferenceEncoder:
    """Pairs and KTO rows -> token ids through the Renderer.

    Truncation (data.max_seq_len, data.truncation): the prompt is never cut, because it must stay what
    chat sends; with `truncate` each answer keeps its first tokens so that prompt + answer fits (TRL's
    keep_start), with `drop` a row that does not fit is left out; a prompt that leaves no room for an
    answer is left out either way."""

    def __init__(self, renderer: Renderer):
        self.renderer = renderer
        # The answer span must be found on the whole conversation, never on a truncated one, and only
        # answers are trained in preference data (train_on_prompt does not apply).
        self._full = Renderer(renderer.tokenizer, renderer.system_prompt, renderer.enable_thinking,
                              max_seq_len=2**62, train_on_prompt=False, chat_template=renderer.template)

    def prompt_ids(self, prompt: Conversation) -> list[int]:
        return self.renderer.prompt_ids(prompt)

    def answer_ids(self, prompt: Conversation, answer: list[Turn]) -> list[int]:
        """The ids Renderer.encode trains for the last answer of prompt + answer (answer + end of turn)."""
        enc = self._full.encode(Conversation(turns=prompt.turns + answer, system=prompt.system, where=prompt.where))
        if enc is None:
            raise UserError(f"{prompt.where}: the chat template leaves nothing of the answer to train on; check the "
                            f"answer text or set model.chat_template")
        last = max(i for i, label in enumerate(enc.labels) if label != IGNORE)
        first = last
        while first > 0 and enc.labels[first - 1] != IGNORE:
            first -= 1
        return enc.input_ids[first:last + 1]

    def _fit(self, prompt: list[int], answers: list[list[int]]) -> tuple[list[list[int]], bool] | None:
        room = self.renderer.max_seq_len - len(prompt)
        if room < 1:
            return None
        if all(len(a) <= room for a in answers):
            return answers, False
        if self.renderer.truncation == "drop":
            return None
        return [a[:room] for a in answers], True

    def encode_pair(self, pair: PreferencePair) -> EncodedPair | None:
        prompt = self.prompt_ids(pair.prompt)
        fitted = self._fit(prompt, [self.answer_ids(pair.prompt, pair.chosen),
                                    self.answer_ids(pair.prompt, pair.rejected)])
        if fitted is None:
            return None
        (chosen, rejected), truncated = fitted
        return EncodedPair(prompt, chosen, rejected, truncated, pair.where)

    def encode_kto(self, ex: KTOExample) -> EncodedKTO | None:
        prompt = self.prompt_ids(ex.prompt)
        fitted = self._fit(prompt, [self.answer_ids(ex.prompt, ex.answer)])
        if fitted is None:
            return None
        (completion,), truncated = fitted
        return EncodedKTO(prompt, completion, ex.label, truncated, ex.where)

    def encode(self, item: Example) -> EncodedPair | EncodedKTO | None:
        return self.encode_pair(item) if isinstance(item, PreferencePair) else self.encode_kto(item)

    def full_length(self, item: Example) -> int:
        """Prompt + longest answer, untruncated (what data check compares with max_seq_len)."""
        answers = [item.chosen, item.rejected] if isinstance(item, PreferencePair) else [item.answer]
        return len(self.prompt_ids(item.prompt)) + max(len(self.answer_ids(item.prompt, a)) for a in answers)



# -- preparing a training run -------------------------------------------------------------------
@dataclass
class PreparedPreference:
    train: list[EncodedPair | EncodedKTO]
    eval: list[EncodedPair | EncodedKTO]
    format: str
    kind: str
    stats: dict = field(default_factory=dict)


def split_examples(items: list, val_size: float, seed: int) -> tuple[list, list]:
    """data.val_size of the rows (a fraction, or a count when >= 1) held out, chosen with the seed; the
    same rule as the SFT split (data/__init__.py), whose helper is private to that module."""
    if val_size <= 0 or len(items) < 2:
        return items, []
    n_val = int(round(val_size * len(items))) if val_size < 1 else int(val_size)
    n_val = max(1, min(n_val, len(items) - 1))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _encode_all(encoder: PreferenceEncoder, items: list[Example]) -> tuple[list, Counter]:
    out: list[EncodedPair | EncodedKTO] = []
    counts: Counter = Counter()
    for item in items:
        enc = encoder.encode(item)
        if enc is None:
            counts["dropped"] += 1
        elif isinstance(enc, EncodedPair) and enc.chosen_ids == enc.rejected_ids:
            counts["identical"] += 1  # no preference to learn (also after truncation)
        else:
            counts["truncated"] += enc.truncated
            out.append(enc)
    return out, counts


def _load(path: str, data_cfg: Any, kind: str) -> tuple[list[Example], str]:
    return load_examples(path, data_cfg, kind, unpair_pairs=False)


def _unpaired(items: list[Example], kind: str) -> list[Example]:
    if kind == "kto" and items and isinstance(items[0], PreferencePair):
        return list(unpair(items))  # type: ignore[arg-type]
    return items


def prepare_preference(data_cfg: Any, renderer: Renderer, kind: str, seed: int) -> PreparedPreference:
    """data.path (+ data.val_path or data.val_size) -> encoded train and eval rows, before training starts.
    `kind` is the stage's data kind: "pairs" (dpo, orpo, simpo) or "kto"."""
    path = data_cfg.path
    if not path:
        raise UserError("preference training needs data.path: a file of chosen/rejected pairs (or KTO rows with a "
                        "label); see docs/preference.md")
    items, fmt = _load(path, data_cfg, kind)
    if data_cfg.val_path:
        train_items, eval_items = items, _load(data_cfg.val_path, data_cfg, kind)[0]
    else:
        train_items, eval_items = split_examples(items, data_cfg.val_size, seed)
    train_items, eval_items = _unpaired(train_items, kind), _unpaired(eval_items, kind)
    encoder = PreferenceEncoder(renderer)
    train, counts = _encode_all(encoder, train_items)
    evals, _ = _encode_all(encoder, eval_items)
    if not train:
        raise UserError(f"{path}: no trainable rows left ({counts['dropped']} longer than data.max_seq_len="
                        f"{renderer.max_seq_len}, {counts['identical']} with chosen equal to rejected); "
                        f"run `nekotune data check {path}`")
    lengths = [longest(e) for e in train]
    stats = {
        "path": path, "format": fmt, "kind": kind, "rows": len(items), "train_rows": len(train),
        "eval_rows": len(evals), "truncated_rows": counts["truncated"], "dropped_rows": counts["dropped"],
        "identical_pairs": counts["identical"], "tokens": sum(e.tokens for e in train),
        "trained_tokens": sum(_answer_tokens(e) for e in train),
        "length_p50": percentile(lengths, 50), "length_p95": percentile(lengths, 95), "length_max": max(lengths),
    }
    if kind == "kto":
        stats["desirable"] = sum(1 for e in train if e.label)
        stats["undesirable"] = len(train) - stats["desirable"]
    return PreparedPreference(train, evals, fmt, kind, stats)


def _answer_tokens(enc: EncodedPair | EncodedKTO) -> int:
    if isinstance(enc, EncodedPair):
        return len(enc.chosen_ids) + len(enc.rejected_ids)
    return len(enc.completion_ids)


def longest(enc: EncodedPair | EncodedKTO) -> int:
    """The longest sequence a row puts through the model: prompt + its longer answer."""
    if isinstance(enc, EncodedPair):
        return len(enc.prompt_ids) + max(len(enc.chosen_ids), len(enc.rejected_ids))
    return len(enc.prompt_ids) + len(enc.completion_ids)


# -- data check ---------------------------------------------------------------------------------
@dataclass
class PreferenceReport:
    """What `nekotune data check` finds in a preference file; the command prints it."""

    path: str
    format: str
    kind: str
    rows: int
    max_seq_len: int
    truncation: str
    problems: dict[str, list[str]] = field(default_factory=dict)  # reason -> rows that cannot be read
    identical: list[str] = field(default_factory=list)  # chosen == rejected
    over_length: list[str] = field(default_factory=list)  # prompt + longer answer > max_seq_len
    prompt_too_long: list[str] = field(default_factory=list)  # no room left for any answer token
    duplicates: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    desirable: int = 0
    undesirable: int = 0
    example: list[tuple[str, bool]] = field(default_factory=list)  # (text, trained) of the first chosen answer
    tokenizer: str = ""  # where the tokenizer that measured the lengths came from

    @property
    def bad_rows(self) -> int:
        """Rows training leaves out; duplicates are only a warning, as for SFT files."""
        dropped = self.over_length if self.truncation == "drop" else self.prompt_too_long
        return sum(map(len, self.problems.values())) + len(set(self.identical) | set(dropped))

    @property
    def ok(self) -> bool:
        return self.bad_rows == 0 and bool(self.lengths)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("lengths", "example")}
        if self.lengths:
            out.update(length_p50=percentile(self.lengths, 50), length_p95=percentile(self.lengths, 95),
                       length_max=max(self.lengths))
        return {**out, "bad_rows": self.bad_rows, "ok": self.ok}


def _row_label(where: str, source: str) -> str:
    """"data.json row 7" -> "row 7" (the file is named once, at the top of the report)."""
    return where[len(source):].strip() if source and where.startswith(source + " ") else where


def _reason(exc: UserError, where: str) -> str:
    return str(exc).removeprefix(f"{where}: ").split(";")[0]


def check_preferences(rows: list[Row], renderer: Renderer, kind: str, fmt: str = "auto",
                      columns: dict[str, str] | None = None, source: str = "") -> PreferenceReport:
    """Every row converted and measured; problems listed by row instead of stopping at the first."""
    if not rows:
        raise UserError(f"{source or 'dataset'}: no rows; the file is empty")
    spec = resolve_format([apply_mapping(rows[0], columns or {})], fmt, kind)
    report = PreferenceReport(source, spec.name, kind, len(rows), renderer.max_seq_len, renderer.truncation)
    encoder, seen = PreferenceEncoder(renderer), Counter[str]()
    for raw in rows:
        label = _row_label(raw.where, source)
        try:
            row = apply_mapping(raw, columns or {})
            item = spec.convert(row)
            for part in _unpaired([item], kind):
                _measure(report, encoder, part, label)
        except UserError as exc:
            report.problems.setdefault(_reason(exc, raw.where), []).append(label)
            continue
        key = json.dumps(row.data, sort_keys=True, ensure_ascii=False, default=str)
        seen[key] += 1
        if seen[key] == 2:
            report.duplicates.append(label)
        if isinstance(item, PreferencePair) and item.chosen[-1].content == item.rejected[-1].content:
            report.identical.append(label)
    return report


def _measure(report: PreferenceReport, encoder: PreferenceEncoder, item: Example, label: str) -> None:
    prompt = encoder.prompt_ids(item.prompt)
    sides = [item.chosen, item.rejected] if isinstance(item, PreferencePair) else [item.answer]
    answers = [encoder.answer_ids(item.prompt, side) for side in sides]
    n = len(prompt) + max(map(len, answers))
    report.lengths.append(n)
    if n > report.max_seq_len and label not in report.over_length:
        report.over_length.append(label)
    if len(prompt) >= report.max_seq_len and label not in report.prompt_too_long:
        report.prompt_too_long.append(label)
    if isinstance(item, KTOExample):
        report.desirable += item.label
        report.undesirable += not item.label
    if not report.example:
        enc = Encoded(prompt + answers[0], [IGNORE] * len(prompt) + answers[0])
        report.example = encoder.renderer.trained_text(enc)


def check_preference_file(path: str, data_cfg: Any, renderer: Renderer, kind: str,
                          fmt: str | None = None) -> PreferenceReport:
    """`nekotune data check FILE` for a preference stage, with the run's data settings."""
    rows = read_rows(path, split=data_cfg.split, max_rows=data_cfg.max_rows)
    return check_preferences(rows, renderer, kind, preference_format_name(data_cfg.format, fmt),
                             data_cfg.columns, source=path)

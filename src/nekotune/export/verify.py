"""`nekotune export verify`: does llama.cpp run the exported GGUF as transformers runs the source?

For each demo held-out prompt, rendered by the same Renderer training used:
- tokenization: llama.cpp's token ids for the prompt text must equal transformers' ids;
- greedy continuation (20 tokens) on both sides: how many leading tokens agree;
- teacher-forced top-1 agreement: llama.cpp reads transformers' continuation and predicts each
  next token. Greedy runs split for good at the first near-tie, which says little about the
  numbers; this measure does not cascade, so it is the pass criterion (with tokenization).
Then the next-token distributions on a fixed text against a reference, the source model in
transformers or another GGUF such as the f16 export (--reference): top-1 agreement and mean KL
divergence per token (export/divergence.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nekotune.config import Config
from nekotune.errors import UserError
from nekotune.export.divergence import Divergence

N_TOKENS = 20
# Minimum teacher-forced top-1 agreement, by the GGUF's file type: quantization moves near-ties.
THRESHOLDS = {"ALL_F32": 0.95, "MOSTLY_F16": 0.95, "MOSTLY_BF16": 0.9, "MOSTLY_Q8_0": 0.9}
LOW_BIT_THRESHOLD = 0.75


@dataclass
class PromptResult:
    prompt: str
    n_prompt_tokens: int
    tokens_equal: bool
    greedy_match: int  # leading tokens of the two greedy continuations that agree
    greedy_len: int
    top1: float  # teacher-forced next-token agreement over transformers' continuation
    hf_text: str
    llama_text: str


def require_llama_cpp() -> Any:
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError("export verify needs llama-cpp-python: pip install 'nekotune[verify]' "
                        "(it compiles llama.cpp, about 6 minutes on 2 cores)")
    import llama_cpp

    return llama_cpp


def gguf_file_type(path: Path) -> str:
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.contents())
    return next((t.name for t in gguf.LlamaFileType if t.value == value), str(value))


def heldout_prompts(cfg: Config) -> list:
    from nekotune.data import DEMO_HELDOUT, load_conversations

    convs, _ = load_conversations(str(DEMO_HELDOUT), cfg.data.model_copy(update={"format": "auto", "columns": {}}))
    return [c.prompt_part() for c in convs]


def hf_greedy(model: Any, prompt_ids: list[int], stop_ids: list[int], pad_id: Any) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_TOKENS,
                             repetition_penalty=1.0, eos_token_id=stop_ids or None, pad_token_id=pad_id,
                             temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt_ids):].tolist()


def llama_greedy(llm: Any, prompt_ids: list[int], stop_ids: list[int]) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(prompt_ids)
    generated: list[int] = []
    while len(generated) < N_TOKENS:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        if token in stop_ids:
            break
        llm.eval([token])
    return generated


def teacher_forced_top1(llm: Any, prompt_ids: list[int], continuation: list[int]) -> float:
    import numpy as np

    if not continuation:
        return 1.0
    llm.reset()
    llm.eval(prompt_ids + continuation[:-1])
    start = len(prompt_ids) - 1
    predicted = np.argmax(llm.scores[start:start + len(continuation)], axis=-1)
    return float(np.mean(predicted == np.array(continuation)))


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_prompt(loaded: Any, llm: Any, conv: Any, stop_ids: list[int]) -> PromptResult:
    renderer = loaded.renderer
    text = renderer.prompt_text(conv)
    hf_ids = renderer.prompt_ids(conv)
    llama_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    hf_out = hf_greedy(loaded.model, hf_ids, stop_ids, renderer.tokenizer.pad_token_id)
    llama_out = llama_greedy(llm, llama_ids, stop_ids)
    decode = renderer.tokenizer.decode
    return PromptResult(conv.turns[-1].content if conv.turns else text, len(hf_ids), hf_ids == llama_ids,
                        leading_agreement(hf_out, llama_out), max(len(hf_out), len(llama_out)),
                        teacher_forced_top1(llm, hf_ids, hf_out), decode(hf_out), decode(llama_out))


def bos_agrees(llm: Any, tokenizer: Any) -> bool:
    """Whether llama.cpp adds BOS (tokenizer.ggml.add_bos_token) exactly when transformers does."""
    return llm.tokenize(b"Hello", add_bos=True, special=True) == tokenizer("Hello")["input_ids"]


def short(text: str, width: int = 38) -> str:
    """A prompt on one line of the report's table."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class VerifyReport:
    gguf: Path
    file_type: str
    results: list[PromptResult]
    bos_ok: bool  # llama.cpp adds BOS exactly when transformers does
    divergence: Divergence | None = None  # on the fixed text, against the reference

    @property
    def n_equal(self) -> int:
        """Prompts that both sides tokenize to the same ids."""
        return sum(r.tokens_equal for r in self.results)

    @property
    def top1(self) -> float:
        return sum(r.top1 for r in self.results) / len(self.results)

    @property
    def greedy(self) -> float:
        return sum(r.greedy_match / max(r.greedy_len, 1) for r in self.results) / len(self.results)

    @property
    def threshold(self) -> float:
        return THRESHOLDS.get(self.file_type, LOW_BIT_THRESHOLD)

    @property
    def ok(self) -> bool:
        return self.n_equal == len(self.results) and self.bos_ok and self.top1 >= self.threshold


class Verification:
    """One GGUF opened in llama.cpp beside its source in transformers (`with` closes llama.cpp);
    `run()` compares them on the held-out prompts."""

    def __init__(self, cfg: Config, file: str, model_arg: str | None, limit: int | None = None,
                 reference: str | None = None):
        from nekotune.export.divergence import fixed_texts, open_llama
        from nekotune.model import load_source, resolve_source

        llama_cpp = require_llama_cpp()
        self.gguf = Path(file).expanduser()
        if not self.gguf.is_file() or self.gguf.suffix != ".gguf":
            raise UserError(f"{file} is not a .gguf file; give the file `nekotune export gguf` wrote")
        self.reference = Path(reference).expanduser() if reference else None
        if self.reference is not None and (not self.reference.is_file() or self.reference.suffix != ".gguf"):
            raise UserError(f"--reference {reference} is not a .gguf file; give e.g. the f16 export of the same model")
        self.loaded = load_source(*resolve_source(cfg, model_arg, merged_prompts=True))
        self.prompts = heldout_prompts(self.loaded.cfg)[:limit]
        self.texts = fixed_texts(self.loaded)
        n_ctx = max([len(self.loaded.renderer.prompt_ids(c)) + N_TOKENS for c in self.prompts]
                    + [len(t) for t in self.texts]) + 8
        self.llm = open_llama(llama_cpp, self.gguf, n_ctx)
        self.ref_llm = None
        try:
            if self.reference is not None:
                self.ref_llm = open_llama(llama_cpp, self.reference, n_ctx)
        except BaseException:
            self.llm.close()
            raise

    @property
    def label(self) -> str:
        return self.loaded.spec.label

    def run(self) -> VerifyReport:
        from nekotune.export.divergence import divergence, hf_logits, llama_logits

        renderer = self.loaded.renderer
        results = [compare_prompt(self.loaded, self.llm, conv, renderer.stop_token_ids) for conv in self.prompts]
        if self.ref_llm is not None and self.reference is not None:
            ref_llm = self.ref_llm
            d = divergence(lambda ids: llama_logits(ref_llm, ids), self.llm, self.texts,
                           f"{self.reference.name} (llama.cpp)")
        else:
            d = divergence(lambda ids: hf_logits(self.loaded.model, ids), self.llm, self.texts,
                           f"{self.label} (transformers)")
        return VerifyReport(self.gguf, gguf_file_type(self.gguf), results, bos_agrees(self.llm, renderer.tokenizer), d)

    def close(self) -> None:
        self.llm.close()  # before interpreter shutdown, when llama_cpp's own cleanup would fail noisily
        if self.ref_llm is not None:
            self.ref_llm.close()

    def __enter__(self) -> "Verification":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

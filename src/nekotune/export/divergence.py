"""Next-token distributions of a GGUF against a reference on a fixed text (issue 20).

llama.cpp's `perplexity --kl-divergence` idea: the fixed text is the demo's held-out
conversations with their answers and the first 48 demo training conversations, about 6,000
tokens, rendered as training renders them (on the held-out part alone, top-1 figures of equally
good files landed a point or two apart). The reference is the source model in transformers or
another GGUF such as the f16 export; reported are top-1 agreement and mean KL(reference || GGUF)
per token. `export verify` and bench/kquant_quality.py both measure with this module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXED_TRAIN_ROWS = 48  # demo training conversations added to the held-out ones for the fixed text


@dataclass
class Divergence:
    reference: str
    texts: int
    positions: int
    top1: float  # positions whose most likely next token is the reference's
    mean_kl: float  # KL(reference || GGUF) in nats, averaged over positions
    max_kl: float


def fixed_texts(loaded: Any) -> list[list[int]]:
    """Token ids of each fixed-text conversation (answers included), as training encodes it."""
    from nekotune.data import DEMO_DATA, DEMO_HELDOUT, load_conversations

    data = loaded.cfg.data.model_copy(update={"format": "auto", "columns": {}, "max_seq_len": 4096,
                                              "max_rows": None, "split": "train"})
    convs = load_conversations(str(DEMO_HELDOUT), data)[0] + load_conversations(str(DEMO_DATA), data,
                                                                                 max_rows=FIXED_TRAIN_ROWS)[0]
    renderer = type(loaded.renderer).from_config(loaded.renderer.tokenizer, data, loaded.renderer.template)
    return [enc.input_ids for enc in map(renderer.encode, convs) if enc is not None]


def hf_logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu().numpy()


def llama_logits(llm: Any, ids: list[int]) -> Any:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def token_divergence(reference: Any, logits: Any) -> tuple[Any, Any]:
    """Per position: KL(softmax(reference) || softmax(logits)) and whether the argmaxes agree."""
    import numpy as np

    def log_softmax(z: Any) -> Any:
        z = z.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    ref, got = log_softmax(reference), log_softmax(logits)
    kl = (np.exp(ref) * (ref - got)).sum(axis=-1)
    return np.maximum(kl, 0.0), reference.argmax(axis=-1) == logits.argmax(axis=-1)


def divergence(reference_logits: Callable[[list[int]], Any], llm: Any, texts: list[list[int]],
               label: str) -> Divergence:
    """Teacher-forced over each text; the last position (predicting past the text) is left out."""
    import numpy as np

    kls, agree = [], []
    for ids in texts:
        kl, same = token_divergence(reference_logits(ids)[:-1], llama_logits(llm, ids)[:-1])
        kls.append(kl)
        agree.append(same)
    kl, same = np.concatenate(kls), np.concatenate(agree)
    return Divergence(label, len(texts), int(kl.size), float(same.mean()), float(kl.mean()), float(kl.max()))


@contextlib.contextmanager
def plain_cpu_kernels(llama_cpp: Any) -> Iterator[None]:
    """Load models without llama.cpp's extra CPU buffer types (AMX tiles, repacked weights).

    On virtual machines that report AMX, ggml_backend_amx_mul_mat segfaults (seen with
    llama-cpp-python 0.3.36 on this project's 2-core build machines, on every quantized type);
    the plain kernels compute the same products. llama-cpp-python has no argument for it, so the
    default model parameters are patched while a model loads."""
    low = llama_cpp.llama_cpp
    original = low.llama_model_default_params

    def params() -> Any:
        p = original()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = original


def open_llama(llama_cpp: Any, path: Path, n_ctx: int) -> Any:
    with plain_cpu_kernels(llama_cpp):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                               n_threads=os.cpu_count() or 1, seed=0)

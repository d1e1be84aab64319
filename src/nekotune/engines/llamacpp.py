"""The llama.cpp engine: a base GGUF loaded once, LoRA GGUFs applied per call, nekotune's sampling.

Why nekotune drives the decode loop itself instead of calling `Llama.generate`:
- transformers' repetition penalty covers every token of the context, prompt included;
  llama-cpp-python's covers only the last 64 sampled tokens, which changed 5 of 6 greedy
  SmolLM2 answers at the default 1.1. Here the penalty sampler sees the prompt and a window of
  the whole context.
- transformers applies penalty -> temperature -> top-k -> top-p; llama-cpp-python's chain runs
  top-k, typical, top-p, min-p (0.05 by default) and only then temperature. The chain here is
  built in transformers' order from llama.cpp's own samplers, with its own seeded RNG.
- stop ids come from nekotune's Renderer, not from the GGUF's eos/eot metadata.

Adapters: llama.cpp applies one adapter set to a whole context, and a KV cache computed under
one adapter is wrong under another, so a switch empties the cache. Under one adapter, a prompt
that starts like the previous one (the system prompt, an earlier chat turn) reuses that part of
the cache, as llama-cpp-python's server does. One Llama is not thread-safe: every call takes the
lock, so generations are serialised, as in that server.

On CPUs with AMX, ggml repacks q8_0 (and other quantized) weights into its AMX buffer, after
which every decode of two or more tokens segfaults in ggml_backend_amx_mul_mat (llama.cpp issue
20824, reproduced here with nekotune's and llama.cpp's own q8_0 files). The model is then loaded
without extra buffer types (`use_extra_bufts=False`), which `Llama()` has no argument for, and
its q4_0 matrices are sent to the other extra buffer, CPU_REPACK, by name (engines/cpu_repack.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Iterator, Mapping, Sequence

from nekotune.engines.base import Detokenizer, check_adapter
from nekotune.engines.gguf_header import context_length as gguf_context_length
from nekotune.errors import UserError
from nekotune.generate import MIN_TEMPERATURE, GenSettings

DEFAULT_N_CTX = 4096
MAX_DEFAULT_THREADS = 8  # decoding is memory-bound: more threads stop helping well before this
_PATCH_LOCK = threading.Lock()


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def import_llama_cpp():
    """llama_cpp, or a one-line error saying how to install it.

    OpenMP's wait policy is left to the user's environment. llama.cpp's ggml shares the libgomp
    that torch loads first (one soname), which reads OMP_WAIT_POLICY once, when the process
    starts, so setting it here would do nothing. The default (spin briefly, then sleep) decoded
    the demo model's predictions 3x faster than OMP_WAIT_POLICY=PASSIVE on a quiet 2-core machine
    (17 s against 53 s); on an oversubscribed machine spinning threads fight the other processes
    (1 token/s at load average 8-12 on 2 cores, 14 with PASSIVE), and there PASSIVE is the
    setting to use (docs/engines.md)."""
    if not available():
        raise UserError("the llama.cpp engine needs llama-cpp-python: pip install 'nekotune[llamacpp]' "
                        "(it compiles llama.cpp, about 6 minutes on 2 cores), or set generate.engine=transformers")
    import llama_cpp

    return llama_cpp


def default_threads() -> int:
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, min(physical, MAX_DEFAULT_THREADS))


def has_amx(lib) -> bool:
    return "AMX_INT8 = 1" in lib.llama_print_system_info().decode("utf-8", "replace")


@dataclass(frozen=True)
class LlamaCppOptions:
    n_threads: int | None = None  # None: physical cores, at most 8
    n_threads_batch: int | None = None  # prompt processing; None: as n_threads
    n_ctx: int | None = None  # None: the model's context, at most 4096
    n_batch: int = 512
    repack: bool | None = None  # ggml's weight repacking; None: off where AMX is present
    n_gpu_layers: int | None = None  # None: all layers where the build offloads (Metal, CUDA), else 0
    reuse_prefix: bool = True  # keep the KV cache of a prompt prefix shared with the previous call
    extra: dict = field(default_factory=dict)  # further Llama() keyword arguments


@contextlib.contextmanager
def _model_params(lib, use_extra_bufts: bool, overrides: int = 0):
    """Llama() builds its model params from llama_model_default_params(); swap that in for one
    construction (under a lock, so concurrent loads do not see each other's swap). `overrides`:
    the address of a tensor buffer-type override array (cpu_repack.Overrides), 0 for none."""
    import llama_cpp.llama as high

    with _PATCH_LOCK:
        original = high.llama_cpp.llama_model_default_params

        def params():
            p = original()
            p.use_extra_bufts = use_extra_bufts
            if overrides:
                p.tensor_buft_overrides = overrides
            return p

        high.llama_cpp.llama_model_default_params = params
        try:
            yield
        finally:
            high.llama_cpp.llama_model_default_params = original


class _Sampler:
    """A llama.cpp sampler chain with transformers' semantics for nekotune's GenSettings."""

    def __init__(self, lib, n_vocab: int, n_ctx: int, settings: GenSettings, prompt_ids: Sequence[int]):
        self.lib = lib
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda s: lib.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if settings.repetition_penalty != 1.0:
            # penalty_last_n = the whole context (-1 is not "all" in this binding)
            add(lib.llama_sampler_init_penalties(n_vocab, n_ctx, settings.repetition_penalty, 0.0, 0.0))
        if settings.temperature < MIN_TEMPERATURE:
            add(lib.llama_sampler_init_greedy())
        else:
            if settings.temperature != 1.0:
                add(lib.llama_sampler_init_temp(settings.temperature))
            if settings.top_k > 0:
                add(lib.llama_sampler_init_top_k(settings.top_k))
            if settings.top_p < 1.0:
                add(lib.llama_sampler_init_top_p(settings.top_p, 1))
            add(lib.llama_sampler_init_dist(lib.LLAMA_DEFAULT_SEED if settings.seed is None else settings.seed))
        if settings.repetition_penalty != 1.0:
            for token in prompt_ids:  # transformers penalises the prompt's tokens too
                lib.llama_sampler_accept(self.chain, token)

    def sample(self, ctx) -> int:
        return int(self.lib.llama_sampler_sample(self.chain, ctx, -1))  # also accepts the token

    def close(self) -> None:
        if self.chain is not None:
            self.lib.llama_sampler_free(self.chain)
            self.chain = None


class LlamaCppEngine:
    """One GGUF base in memory, with LoRA GGUF adapters picked per call by name."""

    name = "llama.cpp"

    def __init__(self, model_path: str | Path, tokenizer, adapters: Mapping[str, str | Path] | None = None,
                 options: LlamaCppOptions | None = None):
        self.lib = import_llama_cpp()
        self.tokenizer = tokenizer
        self.options = options = options or LlamaCppOptions()
        self.model_path = Path(model_path)
        self.threads = options.n_threads or default_threads()
        if not self.model_path.is_file():
            raise UserError(f"{self.model_path}: GGUF file not found")
        trained = gguf_context_length(self.model_path)
        self.n_ctx = min(options.n_ctx or DEFAULT_N_CTX, trained or DEFAULT_N_CTX)
        self.repack = (not has_amx(self.lib)) if options.repack is None else options.repack
        self._overrides = None  # q4_0 weights to CPU_REPACK where the AMX buffer is left out
        if options.repack is None and not self.repack:
            from nekotune.engines.cpu_repack import repack_overrides

            self._overrides = repack_overrides(self.lib, self.model_path)
        self.llm = self._load()
        self._handles: dict[str, object] = {}
        self._active: str | None = None
        self._lock = threading.Lock()
        try:
            for adapter_name, path in (adapters or {}).items():
                self._handles[adapter_name] = self._load_adapter(Path(path))
        except BaseException:
            self.close()
            raise

    # -- loading -------------------------------------------------------------------------------
    def _load(self):
        o = self.options
        gpu = o.n_gpu_layers if o.n_gpu_layers is not None else (-1 if self.lib.llama_supports_gpu_offload() else 0)
        kwargs = dict(model_path=str(self.model_path), n_ctx=self.n_ctx, n_batch=o.n_batch, n_threads=self.threads,
                      n_threads_batch=o.n_threads_batch or self.threads, n_gpu_layers=gpu, logits_all=False,
                      verbose=False, **o.extra)
        try:
            with _model_params(self.lib, use_extra_bufts=self.repack,
                               overrides=self._overrides.address if self._overrides else 0):
                return self.lib.Llama(**kwargs)
        except ValueError as exc:  # "Failed to load model from file"
            raise UserError(f"{self.model_path}: llama.cpp cannot load this GGUF ({exc}); re-export it with "
                            f"nekotune export gguf") from None

    def _load_adapter(self, path: Path):
        if not path.is_file():
            raise UserError(f"{path}: LoRA GGUF not found")
        handle = self.lib.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not handle:  # llama.cpp says why only on its log: wrong architecture, tensor or shape
            raise UserError(f"{path}: llama.cpp refused this LoRA GGUF for {self.model_path.name} (another "
                            f"architecture, or trained on another base); convert it for this base")
        return handle  # freed with the model

    @property
    def adapters(self) -> list[str]:
        return list(self._handles)

    def _use(self, adapter: str | None) -> None:
        """Apply `adapter` (None: the bare base); the caller holds the lock."""
        if adapter == self._active:
            return
        if adapter is None:
            rc = self.lib.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            handles = (self.lib.llama_adapter_lora_p_ctypes * 1)(self._handles[adapter])
            rc = self.lib.llama_set_adapters_lora(self.llm.ctx, handles, 1, (ctypes.c_float * 1)(1.0))
        if rc:
            raise RuntimeError(f"llama_set_adapters_lora failed with code {rc}")
        self.llm.reset()  # the cache was computed under the other adapter: never reuse it
        self._active = adapter

    def _prefill(self, prompt_ids: Sequence[int]) -> None:
        """Evaluate the prompt, keeping the cached part it shares with what the cache holds."""
        keep = 0
        if self.options.reuse_prefix:
            cached = self.llm.input_ids[:self.llm.n_tokens]
            limit = min(len(cached), len(prompt_ids) - 1)  # at least one token is evaluated: its logits are sampled
            while keep < limit and cached[keep] == prompt_ids[keep]:
                keep += 1
        self.llm.n_tokens = keep  # Llama.eval drops the cache from here on
        self.llm.eval(list(prompt_ids[keep:]))

    # -- generating ----------------------------------------------------------------------------
    def _budget(self, prompt_ids: Sequence[int], settings: GenSettings) -> int:
        if not prompt_ids:
            raise UserError("the prompt is empty")
        room = self.n_ctx - len(prompt_ids)
        if room < 1:
            raise UserError(f"the prompt is {len(prompt_ids)} tokens; the llama.cpp context holds {self.n_ctx} "
                            f"(shorten the conversation)")
        return min(settings.max_new_tokens, room)

    def generate_ids(self, prompt_ids: Sequence[int], settings: GenSettings, stop_ids: Sequence[int],
                     stop_event: threading.Event | None = None,
                     adapter: str | None = None) -> Generator[int, None, None]:
        """The answer's token ids (the stop token not included), one at a time."""
        check_adapter(adapter, self.adapters)
        budget = self._budget(prompt_ids, settings)
        stops = set(stop_ids)
        with self._lock:
            self._use(adapter)
            sampler = _Sampler(self.lib, self.llm.n_vocab(), self.n_ctx, settings, prompt_ids)
            try:
                self._prefill(prompt_ids)
                for step in range(budget):
                    if stop_event is not None and stop_event.is_set():
                        return
                    token = sampler.sample(self.llm.ctx)
                    if token in stops:
                        return
                    yield token
                    if step + 1 < budget:  # the last token needs no logits after it
                        self.llm.eval([token])
            except Exception:
                self.llm.reset()  # a failed decode leaves the cache in an unknown state
                raise
            finally:
                sampler.close()

    def stream(self, prompt_ids: list[int], settings: GenSettings, stop_ids: Sequence[int],
               stop_event: threading.Event | None = None, adapter: str | None = None) -> Iterator[str]:
        text = Detokenizer(self.tokenizer)
        ids = self.generate_ids(prompt_ids, settings, stop_ids, stop_event, adapter)
        with contextlib.closing(ids):
            for token in ids:
                if piece := text.add(token):
                    yield piece
        if tail := text.flush():
            yield tail

    def generate_batch(self, prompts: Sequence[list[int]], settings: GenSettings, stop_ids: Sequence[int],
                       adapter: str | None = None, batch_size: int = 8,
                       on_batch: Callable[[int], None] | None = None) -> list[str]:
        """One prompt after another (one context); `batch_size` only paces on_batch."""
        answers = []
        for i, prompt in enumerate(prompts):
            ids = list(self.generate_ids(prompt, settings, stop_ids, adapter=adapter))
            answers.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
            if on_batch and ((i + 1) % batch_size == 0 or i + 1 == len(prompts)):
                on_batch((i % batch_size) + 1)
        return answers

    def describe(self) -> str:
        """One line for the command layer to print."""
        return (f"llama.cpp: {self.model_path.name}, {self.threads} threads, context {self.n_ctx}"
                f"{'' if self.repack else self._repack_note()}"
                f"{', adapters ' + ', '.join(self.adapters) if self.adapters else ''}")

    def _repack_note(self) -> str:
        if self._overrides:
            return ", AMX buffer off, q4_0 weights repacked"
        return ", weight repacking off (AMX)"

    def close(self) -> None:
        """Free the model now: at interpreter exit llama-cpp-python's own cleanup fails noisily."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            with self._lock if hasattr(self, "_lock") else contextlib.nullcontext():
                llm.close()
            self.llm = None

    def __enter__(self) -> "LlamaCppEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

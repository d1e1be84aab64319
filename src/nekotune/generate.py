"""One generation path for chat, ask, predict, eval, compare, serve and the UI.

Prompts always come from Renderer.prompt_ids, so they match training token for token, and
generation stops at the template's end-of-turn token.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Generator

from nekotune.data.formats import Conversation
from nekotune.data.habits import decode_complete, hide_empty_think, hide_empty_think_stream, utf8_safe_stream
from nekotune.data.render import Renderer
from nekotune.errors import UserError


@dataclass
class GenSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None
    no_repeat_ngram_size: int = 0  # generate.no_repeat_ngram_size (issue 16): the "remove repeated text" habit

    @classmethod
    def from_config(cls, gen_cfg: Any, **overrides: Any) -> "GenSettings":
        values = {k: getattr(gen_cfg, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k",
                                                   "repetition_penalty", "seed")}
        values["no_repeat_ngram_size"] = getattr(gen_cfg, "no_repeat_ngram_size", 0) or 0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()

    def validated(self) -> "GenSettings":
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
             "max_new_tokens must be a positive integer"),
            (self.temperature >= 0, "temperature must be 0 (greedy) or more"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be 0 (off) or more"),
            (self.repetition_penalty > 0, "repetition_penalty must be above 0"),
            (isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
             "no_repeat_ngram_size must be 0 (off) or a positive integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad generation setting: {message} (got {self})")
        return self


# Below this a temperature samples like greedy decoding anyway, and dividing float32 logits by
# it (1e-300 is 0.0 in float32) gives inf/NaN probabilities that torch.multinomial refuses.
MIN_TEMPERATURE = 1e-4


class SeededSampler:
    """Draws the next token with this generation's own torch.Generator.

    transformers samples with torch.multinomial on torch's global RNG and takes no generator,
    so a seed set with torch.manual_seed would be shared by every generation running at once
    (the server runs several in threads): each would shift the others' draws. With a seed,
    generation runs greedy, this processor comes last (after temperature, top-k and top-p) and
    leaves only the token it drew, so the greedy pick is that draw.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.generator is None:  # created on the scores' device, where the draw happens
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probs = torch.softmax(scores.float(), dim=-1)
        drawn = torch.multinomial(probs, num_samples=1, generator=self.generator)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, drawn, 0.0)


def _sampling_processors(settings: GenSettings, seed: int):
    """transformers' own warpers, in its order, then the draw seeded with `seed`."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        warpers.append(TopKLogitsWarper(top_k=settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=settings.top_p))
    warpers.append(SeededSampler(seed))
    return warpers


def _generate_kwargs(settings: GenSettings, renderer: Renderer) -> dict:
    """model.generate arguments; call once per generate() (a seeded sampler holds its RNG state)."""
    tok = renderer.tokenizer
    kwargs = {"max_new_tokens": settings.max_new_tokens, "eos_token_id": renderer.stop_token_ids or None,
              "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
              "repetition_penalty": settings.repetition_penalty}
    if settings.no_repeat_ngram_size:  # transformers' own processor: no n-gram of this size twice
        kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if settings.temperature < MIN_TEMPERATURE:
        kwargs.update(greedy)
    elif settings.seed is not None:
        kwargs.update(greedy, logits_processor=_sampling_processors(settings, settings.seed))
    else:
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return kwargs


def _device(model):
    return next(model.parameters()).device


def autocast_for(model: Any) -> Any:
    """bf16 base weights (CPU training) with fp32 LoRA weights need autocast to mix."""
    import torch

    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1 and torch.bfloat16 in dtypes:
        return torch.autocast(_device(model).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _StopFlag:
    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream(model: Any, renderer: Renderer, conv: Conversation, settings: GenSettings,
           stop: threading.Event | None = None, inputs: dict | None = None) -> Generator[str, None, None]:
    """Yield the answer piece by piece; setting `stop` ends generation early. `inputs`: the
    conversation's renderer.prompt_inputs, where the caller built them already (the server)."""
    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    # ids, attention mask and, for a vision-language model, the images with their mm_token_type_ids
    device = _device(model)
    if inputs is None:
        inputs = renderer.prompt_inputs(conv, device=device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    streamer = TextIteratorStreamer(renderer.tokenizer, skip_prompt=True, skip_special_tokens=True)
    flag = _StopFlag()
    if stop is not None:
        flag.event = stop
    kwargs = _generate_kwargs(settings, renderer)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.no_grad(), autocast_for(model):
                model.generate(**inputs, streamer=streamer, stopping_criteria=StoppingCriteriaList([flag]), **kwargs)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        # a character cut by the token limit is held back, not shown as U+FFFD, and an empty
        # <think></think> block (Qwen3-style templates, thinking off) is not shown
        for piece in hide_empty_think_stream(utf8_safe_stream(p for p in streamer if p)):
            yield piece
    finally:
        flag.event.set()
        thread.join()
    if errors:
        raise errors[0]


def generate(model: Any, renderer: Renderer, conv: Conversation, settings: GenSettings) -> str:
    return generate_batch(model, renderer, [conv], settings)[0]


def generate_batch(model: Any, renderer: Renderer, convs: list[Conversation], settings: GenSettings,
                   batch_size: int = 8, on_batch: Any = None) -> list[str]:
    """Left-padded batched generation; returns the decoded answers in input order."""
    import torch

    tok = renderer.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    collate = renderer.batch_collator(pad_id)  # images (if any) are decoded batch by batch
    prompts = [renderer.prompt_ids(c) for c in convs]
    # Sorting by length keeps padding small; results are put back in order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    trailing = {t for t in [pad_id, *(renderer.stop_token_ids or [])] if t is not None}
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        batch = collate([renderer.prompt_features(convs[i]) for i in chunk])
        device = _device(model)
        kwargs = _generate_kwargs(settings, renderer)  # a fresh seeded RNG per batch, as each batch was seeded
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), autocast_for(model):
            out = model.generate(**inputs, **kwargs)
        width = batch["input_ids"].shape[1]
        for row, i in enumerate(chunk):
            # never ending in a broken UTF-8 character; without the empty think block
            text = decode_complete(tok, out[row, width:].tolist(), trailing=trailing, skip_special_tokens=True)
            answers[i] = hide_empty_think(text).strip()
        if on_batch:
            on_batch(len(chunk))
    return answers

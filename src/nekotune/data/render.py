"""The only code that turns a Conversation into tokens.

Training, data check, chat, predict, eval, serve and the GGUF/Ollama export all call this,
with the model's own chat template, so a prompt is rendered identically everywhere.

Why not `apply_chat_template(return_assistant_tokens_mask=True)`: it needs `{% generation %}`
markers that most shipped templates (SmolLM2, Qwen, Llama 3) lack. Instead each assistant turn
is located by rendering the conversation up to it with the generation prompt: whatever the
template emits after that prompt, up to and including the end-of-turn token, is what the model
must learn to generate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from nekotune.data.formats import Conversation
from nekotune.errors import UserError

# Used only for base models that ship no chat template; the end of turn is the EOS token.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
)
IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class Renderer:
    def __init__(self, tokenizer: Any, system_prompt: str | None = None, enable_thinking: bool | None = None,
                 max_seq_len: int = 1024, truncation: str = "truncate", train_on_prompt: bool = False,
                 chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.train_on_prompt = train_on_prompt
        self.template = chat_template or getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
        self.uses_fallback_template = self.template == FALLBACK_TEMPLATE
        self.eot_text = self._find_end_of_turn()

    @classmethod
    def from_config(cls, tokenizer: Any, data_cfg: Any, chat_template: str | None = None) -> "Renderer":
        return cls(tokenizer, system_prompt=data_cfg.system_prompt, enable_thinking=data_cfg.enable_thinking,
                   max_seq_len=data_cfg.max_seq_len, truncation=data_cfg.truncation,
                   train_on_prompt=data_cfg.train_on_prompt, chat_template=chat_template)

    # -- text -----------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        kwargs = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.template,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as exc:  # jinja raises its own types, e.g. "roles must alternate"
            raise UserError(f"the chat template rejected a conversation ({str(exc).splitlines()[0]}); "
                            f"check the roles or set model.chat_template") from None

    takes_images = False  # the VisionRenderer (data/vision_render.py) does

    def _text_only(self, conv: Conversation) -> None:
        if conv.images and not self.takes_images:
            raise UserError(f"{conv.where or 'the conversation'}: it has images but the model is a text model; "
                            f"use a vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: docs/vision.md)")

    def prompt_text(self, conv: Conversation) -> str:
        self._text_only(conv)
        return self.render(conv.messages(self.system_prompt), add_generation_prompt=True)

    def prompt_ids(self, conv: Conversation) -> list[int]:
        return self._tokenize(self.prompt_text(conv))

    def prompt_inputs(self, conv: Conversation, device: Any = None) -> dict:
        """What `model.generate` takes for this prompt (the VisionRenderer adds the images)."""
        import torch

        ids = torch.tensor([self.prompt_ids(conv)], device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def prompt_features(self, conv: Conversation) -> dict:
        """One row of a left-padded generation batch (see batch_collator)."""
        ids = self.prompt_ids(conv)
        return {"input_ids": ids, "labels": ids}

    def batch_collator(self, pad_id: int) -> Any:
        """Left-pads prompt_features rows into a generation batch."""
        from nekotune.data.collate import pad_batch

        return lambda rows: pad_batch(rows, pad_id, side="left")

    def _tokenize(self, text: str) -> list[int]:
        # The template already wrote BOS where the model wants it.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _find_end_of_turn(self) -> str:
        probe = "nekotune-probe-answer"
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], False)
        tail = text[text.find(probe) + len(probe):]
        special = [t for t in self.tokenizer.all_special_tokens if t]
        special += [t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if t.special]
        stripped = tail.lstrip()
        for token in sorted(set(special), key=len, reverse=True):
            if stripped.startswith(token):
                return token
        return self.tokenizer.eos_token or ""

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an answer: the template's end-of-turn and the EOS."""
        ids = []
        for text in (self.eot_text, self.tokenizer.eos_token):
            if text:
                tid = self.tokenizer.convert_tokens_to_ids(text)
                if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid not in ids:
                    ids.append(tid)
        return ids

    # -- training -------------------------------------------------------------------------
    def assistant_spans(self, messages: list[dict], full: str, where: str) -> list[tuple[int, int]]:
        spans = []
        cursor = 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            common = len(os.path.commonprefix([prefix, full]))
            begin = max(common, cursor)
            start = full.find(msg["content"], begin)
            if start < 0:
                raise UserError(f"{where}: the chat template changed an assistant answer so it cannot be "
                                f"located for the loss mask; set model.chat_template to a standard template")
            if start - begin > 64:  # a template that re-renders earlier text differently: trust the content
                begin = start
            end = start + len(msg["content"])
            rest = full[end:]
            stripped = rest.lstrip()
            if self.eot_text and stripped.startswith(self.eot_text):
                end += len(rest) - len(stripped) + len(self.eot_text)
            spans.append((begin, end))
            cursor = end
        return spans

    def encode(self, conv: Conversation) -> Encoded | None:
        """input_ids and labels (-100 where not trained); None when nothing is left to train."""
        if conv.text is not None:
            text_ids = self.tokenizer(conv.text, add_special_tokens=True)["input_ids"]
            if self.tokenizer.eos_token_id is not None:
                text_ids = text_ids + [self.tokenizer.eos_token_id]
            return self._fit(Encoded(text_ids, list(text_ids)))
        self._text_only(conv)
        messages = conv.messages(self.system_prompt)
        full = self.render(messages, add_generation_prompt=False)
        if self.train_on_prompt:
            whole = self._tokenize(full)
            return self._fit(Encoded(whole, list(whole)))
        # Tokenize piece by piece at the span edges: BPE must not merge a prompt's last
        # characters with the answer's first, or training would see other prompt tokens than
        # generation does (Llama 3's "\n\n" before the answer is the classic case).
        ids: list[int] = []
        labels: list[int] = []
        cursor = 0
        for start, end in self.assistant_spans(messages, full, conv.where):
            prompt_piece = self._tokenize(full[cursor:start]) if start > cursor else []
            answer_piece = self._tokenize(full[start:end])
            ids += prompt_piece + answer_piece
            labels += [IGNORE] * len(prompt_piece) + answer_piece
            cursor = end
        if cursor < len(full):
            tail = self._tokenize(full[cursor:])
            ids += tail
            labels += [IGNORE] * len(tail)
        return self._fit(Encoded(ids, labels))

    def _fit(self, enc: Encoded) -> Encoded | None:
        if len(enc.input_ids) > self.max_seq_len:
            if self.truncation == "drop":
                return None
            enc = Encoded(enc.input_ids[: self.max_seq_len], enc.labels[: self.max_seq_len], truncated=True)
        return enc if enc.n_trained > 0 else None

    def trained_text(self, enc: Encoded) -> list[tuple[str, bool]]:
        """(piece, trained) runs for showing a user what the loss sees."""
        runs: list[tuple[str, bool]] = []
        current: list[int] = []
        flag = None
        for tid, lab in zip(enc.input_ids, enc.labels):
            trained = lab != IGNORE
            if flag is not None and trained != flag:
                runs.append((self.tokenizer.decode(current), flag))
                current = []
            current.append(tid)
            flag = trained
        if current:
            runs.append((self.tokenizer.decode(current), bool(flag)))
        return runs

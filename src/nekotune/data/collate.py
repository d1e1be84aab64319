"""Turn encoded examples into batches.

`flatten` is padding-free packing: the examples of one batch are concatenated into a single
row with position ids that restart per example. transformers then builds a block-diagonal
causal mask (SDPA) or uses varlen flash attention, so no token attends across examples and
no compute is spent on padding. The optimizer sees exactly the same examples per step as
with padding, so loss curves are comparable.
"""

from __future__ import annotations

import torch

from nekotune.data.render import IGNORE


def pad_batch(features: list[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    longest = max(len(f["input_ids"]) for f in features)
    ids, labels, mask = [], [], []
    for f in features:
        n = len(f["input_ids"])
        pad = longest - n
        if side == "right":
            ids.append(f["input_ids"] + [pad_id] * pad)
            labels.append(f["labels"] + [IGNORE] * pad)
            mask.append([1] * n + [0] * pad)
        else:
            ids.append([pad_id] * pad + f["input_ids"])
            labels.append([IGNORE] * pad + f["labels"])
            mask.append([0] * pad + [1] * n)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def flatten_batch(features: list[dict]) -> dict[str, torch.Tensor]:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for f in features:
        n = len(f["input_ids"])
        ids.extend(f["input_ids"])
        # The first token of each example is never a target: it would be "predicted" from the
        # previous example's last token.
        labels.extend([IGNORE] + list(f["labels"][1:]))
        positions.extend(range(n))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


class Collator:
    def __init__(self, pad_id: int, packing: bool):
        self.pad_id = pad_id
        self.packing = packing

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        features = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features]
        return flatten_batch(features) if self.packing else pad_batch(features, self.pad_id)

"""A LoRA adapter as tensors: each adapted base tensor's low-rank update (and DoRA magnitude), and
the modules_to_save replacements, for the tensor-by-tensor merge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nekotune.errors import UserError
from nekotune.io import read_json

ADAPTER_PREFIX = "base_model.model."


class NotStreamable(UserError):
    """An adapter feature the tensor-by-tensor merge does not reproduce; peft's own merge does."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"{reason}; run `nekotune merge` without --low-memory")


@dataclass
class LoraLayer:
    a: Any  # [r, in]; embeddings: [r, num_embeddings]
    b: Any  # [out, r]; embeddings: [dim, r]
    scaling: float
    magnitude: Any = None  # DoRA: one learned norm per output row
    embedding: bool = False

    def delta(self) -> Any:
        product = self.b.float() @ self.a.float()
        return (product.T if self.embedding else product) * self.scaling

    def merge_into(self, weight: Any) -> Any:
        merged = weight + self.delta()
        if self.magnitude is None:
            return merged
        # DoRA: W' = m * (W + dW) / ||W + dW||, the norm taken over each output row.
        import torch

        norm = torch.linalg.norm(merged, dim=1)
        return (self.magnitude.float() / norm).view(-1, 1) * merged


@dataclass
class Adapter:
    path: Path
    config: dict
    layers: dict[str, LoraLayer] = field(default_factory=dict)  # base tensor name -> LoRA
    replacements: dict[str, Any] = field(default_factory=dict)  # modules_to_save: name -> full tensor
    nbytes: int = 0

    @classmethod
    def load(cls, path: str | Path) -> "Adapter":
        path = Path(path)
        config = read_json(path / "adapter_config.json")
        _check_streamable(config, path)
        try:
            state = _read_weights(path)
        except Exception as exc:
            raise UserError(f"{path}: cannot read the adapter weights ({str(exc).splitlines()[0][:160]})") from None
        adapter = cls(path, config, nbytes=sum(t.numel() * t.element_size() for t in state.values()))
        adapter._parse(state)
        return adapter

    def _parse(self, state: dict) -> None:
        parts: dict[str, dict] = {}
        for key, tensor in state.items():
            name = key[len(ADAPTER_PREFIX):] if key.startswith(ADAPTER_PREFIX) else key
            module, kind = _split_lora_key(name, self.path)
            if kind is None:
                if ".base_layer." not in name:  # base_layer: a copy of the base embedding peft saves too
                    self.replacements[name] = tensor
                continue
            parts.setdefault(module, {})[kind] = tensor
        for module, p in parts.items():
            self.layers[module + ".weight"] = self._layer(module, p)

    def _layer(self, module: str, p: dict) -> LoraLayer:
        embedding = "embedding_A" in p
        a, b = (p.get("embedding_A"), p.get("embedding_B")) if embedding else (p.get("A"), p.get("B"))
        if a is None or b is None:
            raise UserError(f"{self.path}: {module} has only half of its LoRA weights; the adapter file is damaged")
        if embedding and "magnitude" in p:
            raise NotStreamable(f"{self.path}: DoRA on the embedding layer ({module}) is not supported by the "
                                f"low-memory merge")
        return LoraLayer(a, b, self._scaling(module, a.shape[0]), p.get("magnitude"), embedding)

    def _scaling(self, module: str, rank: int) -> float:
        alphas: dict = self.config.get("alpha_pattern") or {}
        alpha = float(self.config.get("lora_alpha", 8))
        if alphas:  # peft's own pattern matching (imported only here: peft takes 2 s to import)
            from peft.utils.other import get_pattern_key

            alpha = float(alphas.get(get_pattern_key(list(alphas), module), alpha))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def merge(self, name: str, weight: Any) -> Any:
        """The merged value of one base tensor (fp32 in, fp32 out)."""
        if name in self.replacements:
            return self.replacements[name].float()
        layer = self.layers.get(name)
        return layer.merge_into(weight) if layer is not None else weight

    def touched(self) -> set[str]:
        return set(self.layers) | set(self.replacements)


def _split_lora_key(name: str, where: Path) -> tuple[str, str | None]:
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "embedding_A",
                ".lora_embedding_B": "embedding_B", ".lora_magnitude_vector": "magnitude",
                ".lora_magnitude_vector.weight": "magnitude"}
    for suffix, kind in suffixes.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    if ".lora_" in name:
        raise NotStreamable(f"{where}: adapter tensor {name} is of a LoRA variant the low-memory merge "
                            f"does not handle")
    return name, None


def _check_streamable(config: dict, path: Path) -> None:
    """Refuse, with the way out, what the tensor-by-tensor merge does not reproduce exactly."""
    where = path / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise NotStreamable(f"{where}: peft_type {config.get('peft_type')} is not LoRA, which the low-memory "
                            f"merge handles only")
    unsupported = [key for key in ("fan_in_fan_out", "lora_bias", "trainable_token_indices", "layer_replication",
                                   "use_qalora", "alora_invocation_tokens", "target_parameters")
                   if config.get(key)]
    if unsupported:
        raise NotStreamable(f"{where}: `{unsupported[0]}` is not supported by the low-memory merge")


def _read_weights(path: Path) -> dict:
    """The adapter's tensors by their saved names. A safetensors file is read directly: peft's
    load_peft_weights reads it the same way but importing peft costs 2 s, a tenth of a whole
    `predict --engine llama.cpp` (issue 19); other forms go through peft as before."""
    file = path / "adapter_model.safetensors"
    if file.is_file():
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    from peft.utils import load_peft_weights

    return load_peft_weights(str(path), device="cpu")

"""`nekotune estimate`: peak training memory from config.json and the training config alone.

Nothing here imports torch or loads weights, so it answers in well under a second. Every term
is a count of tensors nekotune's training path keeps alive; the few constants (runtime baseline,
allocator slack) are measured and checked by bench/estimate_memory.py.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nekotune import devices
from nekotune.errors import UserError
from nekotune.io import read_json
from nekotune.registry import ARCHITECTURES

MB = 2**20
GB = 2**30
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_RUNTIME_MB = 440  # RSS after importing torch, transformers, peft, accelerate (measured, x86-64 Linux)
CUDA_CONTEXT_MB = 600  # CUDA context + cuBLAS workspace: outside torch's allocated memory
ALLOCATOR_SLACK = 0.10  # freed-but-held blocks (glibc arenas on CPU, the caching allocator on GPU)
# Measured by bench/estimate_memory.py on CPU (fp32): autograd keeps more than the tensor count
# below (fp32 copies inside RMSNorm and rotary, views made contiguous, per-example attention
# pieces) and glibc keeps freed blocks. One factor for all rows, not one per row.
CPU_ACTIVATION_FACTOR = 1.25
# bf16 autocast on a CPU: 2 bytes per activation element, as on a GPU. What made short rows look
# heavier (a first fit said 3.2 bytes) is the attention: examples up to
# training.speed.MATMUL_ATTENTION_MAX_LEN tokens go through two grouped matmuls that keep their
# scores for the backward pass (heads x length^2 x SCORE_BYTES per layer), counted on their own
# below. Checked on all 11 rows of bench/estimate_memory.py (December 2026, AVX512-BF16 CPU).
CPU_BF16_ACT_BYTES = 2.0
SCORE_BYTES = 6  # bf16 scores, their fp32 softmax (see training/speed.py)
# hidden-sized tensors per layer and token kept under checkpointing: fp32 on a CPU keeps fp32 copies
# beside the layer input (6, fitted in fp32); bf16 on a CPU keeps 2, as a GPU (December 2026 run)
CKPT_KEPT_HIDDEN = {"cpu": 6, "cpu-bf16": 2, "cuda": 2}
SEEDS_RULES = {"lora": (3, 4), "qlora": (2.5, 2.5), "full": (20, 20)}  # GB per billion parameters


@dataclass
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qk_norm: bool
    name: str = ""

    @classmethod
    def from_config(cls, cfg: dict, name: str = "") -> "Arch":
        text = cfg.get("text_config") or cfg
        try:
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            arch = cls(hidden=hidden, layers=int(text["num_hidden_layers"]), heads=heads,
                       kv_heads=int(text.get("num_key_value_heads") or heads),
                       head_dim=int(text.get("head_dim") or hidden // heads),
                       intermediate=int(text["intermediate_size"]), vocab=int(text["vocab_size"]),
                       tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                       qk_norm=_has_qk_norm(text.get("model_type", cfg.get("model_type"))), name=name)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{name or 'config.json'}: missing or invalid field {exc}; estimate needs a decoder-only "
                            f"model config (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, "
                            f"vocab_size)") from None
        return arch

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_params(self) -> int:
        per_layer = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.layers * per_layer + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_linear_params + self.embedding_params + self.norm_params


def _has_qk_norm(model_type: object) -> bool:
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    return bool(arch and arch.qk_norm)


# -- reading the model's config ----------------------------------------------------------------
def read_model_config(model_arg: str) -> tuple[dict, str]:
    p = Path(model_arg).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        return read_json(p), str(p)
    if p.is_dir():
        for candidate in (p / "config.json", p / "adapter" / "adapter_config.json", p / "adapter_config.json"):
            if candidate.is_file() and candidate.name == "config.json":
                return read_json(candidate), str(candidate)
        if (p / "adapter_config.json").is_file() or (p / "adapter").is_dir():
            from nekotune.model import resolve

            return read_model_config(resolve(str(p)).base)
        raise UserError(f"{p} has no config.json; point --model at a model directory, a config.json or a hub id")
    if model_arg in ("smollm2", "", None) or p.suffix == ".gguf":
        from nekotune.model import resolve_base

        return read_model_config(resolve_base(model_arg))
    if model_arg.count("/") == 1 and not model_arg.startswith((".", "/", "~")):
        return _from_hub(model_arg)
    raise UserError(f"model {model_arg} not found; give a model directory, a config.json or a hub id")


def _from_hub(repo: str) -> tuple[dict, str]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, "config.json")
    except Exception as exc:  # offline, gated, missing: all the same to the user
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot fetch config.json of {repo} ({first[:160]}); download it and pass "
                        f"--model path/to/config.json") from None
    return read_json(Path(path)), repo


# -- the breakdown -----------------------------------------------------------------------------
@dataclass
class Settings:
    device: str = "cuda"  # cuda | cpu | mps (unified memory: the GPU's tensors and the process share RAM)
    weight_bytes: float = 2.0  # per base parameter: 4 fp32, 2 bf16
    act_bytes: float = 2.0
    quant4: bool = False
    batch: int = 4
    seq: int = 1024
    grad_ckpt: bool = False
    lora_r: int = 16
    targets: tuple[str, ...] = LINEAR_NAMES
    dora: bool = False
    modules_to_save: tuple[str, ...] = ()  # lora.modules_to_save: whole modules trained beside LoRA
    chunked_loss: bool = True
    grad_accum: int = 1
    # issue 18: train.stage's passes (registry.TRAINING_STAGES): DPO puts chosen + rejected through the
    # policy (2 rows with gradients) and the reference (2 rows without); ORPO/SimPO build full logits
    stage: str = "sft"
    grad_rows: int = 1
    nograd_rows: int = 0
    full_logits: bool = False
    # examples up to this many tokens use the score-keeping matmul attention (bf16 CPU with packing);
    # the estimate takes every example to be `seq` long, so short examples packed into long rows
    # can add up to heads x this length x SCORE_BYTES per token and layer
    matmul_attention_len: int = 0


@dataclass
class Estimate:
    model: str
    settings: dict
    items: dict[str, float] = field(default_factory=dict)  # MB

    @property
    def total_mb(self) -> float:
        return sum(self.items.values())

    def to_dict(self) -> dict:
        return {"model": self.model, "settings": self.settings,
                "items_mb": {k: round(v, 1) for k, v in self.items.items()}, "total_mb": round(self.total_mb, 1),
                "total_gb": round(self.total_mb / 1024, 2)}


def saved_module_params(arch: Arch, names: tuple[str, ...]) -> int:
    """Parameters of lora.modules_to_save: peft trains a full copy of each (embed_tokens and
    lm_head are vocab x hidden each, about 1B on Llama-3-8B); other names are per-layer norms."""
    sizes = {"embed_tokens": arch.vocab * arch.hidden, "lm_head": arch.vocab * arch.hidden,
             "wte": arch.vocab * arch.hidden, "norm": arch.hidden}
    return sum(sizes.get(n, arch.layers * arch.hidden) for n in names)


def lora_params(arch: Arch, r: int, targets: tuple[str, ...], dora: bool = False) -> int:
    shapes = arch.linear_shapes()
    per_layer = sum(r * (i + o) + (o if dora else 0) for name, (i, o) in shapes.items() if name in targets)
    return arch.layers * per_layer


def base_weights_bytes(arch: Arch, s: Settings) -> float:
    if not s.quant4:
        return arch.params * s.weight_bytes
    linear = arch.layers * arch.layer_linear_params
    # NF4: 4 bits a weight; double quantization keeps one 8-bit absmax per 64 weights and one
    # fp32 constant per 256 of those: 0.127 extra bits a weight. Embeddings and norms stay bf16.
    return linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + (arch.embedding_params + arch.norm_params) * 2


def activation_elems_per_token_layer(arch: Arch, s: Settings) -> float:
    """Elements kept for backward per token in one decoder layer (SDPA, LoRA on the targets)."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    hidden_terms = 5 * arch.hidden  # layer input, two norms' inputs and outputs, residual sum
    attention = 3 * q + 3 * kv + arch.heads  # q, k, v, rotated q and k, attention output, logsumexp
    mlp = 4 * arch.intermediate  # gate, up, activation, product
    lora = len(s.targets) * s.lora_r
    return hidden_terms + attention + mlp + lora


def estimate(arch: Arch, s: Settings) -> Estimate:
    tokens = s.batch * s.seq * s.grad_rows  # a preference example is several sequences
    est = Estimate(model=arch.name, settings=asdict(s))
    n_lora = lora_params(arch, s.lora_r, s.targets, s.dora)
    est.items["base weights"] = base_weights_bytes(arch, s) / MB
    est.items["LoRA weights + grads + AdamW (fp32)"] = n_lora * 16 / MB
    if s.modules_to_save:  # a trained copy in the base dtype, its gradient and two AdamW moments
        est.items["modules_to_save copies + grads + AdamW"] = (saved_module_params(arch, s.modules_to_save)
                                                              * 4 * s.weight_bytes / MB)
    factor = CPU_ACTIVATION_FACTOR if s.device == "cpu" else 1.0  # MPS: the GPU's tensor count, no glibc
    per_layer = activation_elems_per_token_layer(arch, s) * s.act_bytes * factor
    if s.grad_ckpt:
        kind = "cpu-bf16" if s.device == "cpu" and s.weight_bytes == 2 else s.device
        kept = tokens * CKPT_KEPT_HIDDEN.get(kind, 2) * arch.hidden * s.act_bytes * arch.layers
        recompute = tokens * per_layer  # one layer's activations during its recomputation
        est.items["activations (gradient checkpointing)"] = (kept + recompute) / MB
    else:
        est.items["activations"] = tokens * per_layer * arch.layers / MB
    if s.matmul_attention_len and s.seq <= s.matmul_attention_len:
        scores = s.batch * s.grad_rows * arch.heads * s.seq ** 2 * SCORE_BYTES
        est.items["attention scores (matmul path)"] = scores * (1 if s.grad_ckpt else arch.layers) / MB
    # backward holds the gradient of a couple of layers' activations at a time
    est.items["activation gradients in flight"] = 2 * tokens * per_layer / MB
    if s.full_logits:  # TRL's CPO/ORPO: fp32 logits of every row, their log-softmax and its gradient
        est.items["logits + loss (full logits)"] = 3 * tokens * arch.vocab * 4 / MB
    else:
        est.items["logits + loss"] = logits_bytes(arch, s, tokens) / MB
    if s.nograd_rows:  # the reference (and KTO's KL) forward: one layer's activations at a time, no grads
        nograd = s.batch * s.seq * s.nograd_rows
        est.items["reference forward (no grad)"] = (nograd * per_layer + logits_bytes(arch, s, nograd)) / MB
    if s.device == "cuda":
        est.items["CUDA context (outside torch allocations)"] = CUDA_CONTEXT_MB
    elif s.device == "cpu":
        est.items["Python + torch runtime"] = CPU_RUNTIME_MB
    est.items["allocator slack"] = ALLOCATOR_SLACK * sum(v for k, v in est.items.items()
                                                         if k not in ("Python + torch runtime",
                                                                      "CUDA context (outside torch allocations)"))
    if s.device == "mps":  # one pool: Metal's overhead and the CPU side of the process count too
        est.items = devices.unified_items(est.items)
    return est


def logits_bytes(arch: Arch, s: Settings, tokens: int) -> float:
    if s.chunked_loss:  # nekotune: one chunk of fp32 logits, its softmax (in place) and bf16 gradient
        from nekotune.training.loss import loss_chunk

        chunk = loss_chunk(arch.vocab)
        return 3 * min(chunk, tokens) * arch.vocab * 4
    return 3 * tokens * arch.vocab * 4  # a plain HF loss: fp32 logits for every token, softmax, gradient


def plain_loss_logits_mb(arch: Arch, s: Settings) -> float:
    return 3 * s.batch * s.seq * arch.vocab * 4 / MB


def inference_mb(arch: Arch, seq: int = 2048) -> dict[str, float]:
    kv_cache = 2 * arch.layers * arch.kv_heads * arch.head_dim * seq * 2
    linear = arch.layers * arch.layer_linear_params
    other = arch.embedding_params + arch.norm_params
    weights = {"bf16": arch.params * 2, "8-bit": linear * (1 + 4 / 64) + other * 2,
               "4-bit": linear * (4.127 / 8) + other * 2}
    return {k: (v + kv_cache) / MB + CUDA_CONTEXT_MB for k, v in weights.items()}


# -- settings from a Config --------------------------------------------------------------------
def settings_from_config(cfg: Any, device: str, facts: devices.DeviceFacts | None = None) -> Settings:
    """The Settings a training of `cfg` runs with on `device`: the precision, gradient
    checkpointing and quantization the trainer itself picks there (devices.plan_training)."""
    targets = cfg.lora.target_modules
    if targets == "all-linear" or targets == ["all-linear"]:
        targets = LINEAR_NAMES
    elif isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(","))
    facts = facts if facts is not None and facts.kind == device else devices.DeviceFacts(device, bitsandbytes=True)
    plan = devices.plan_training(facts, cfg.model.dtype, cfg.model.quantization, cfg.train.grad_checkpointing,
                                 cfg.data.packing)
    weight_bytes = plan.precision.weight_bytes
    act_bytes = 2.0 if plan.precision.autocast in ("bf16", "fp16") else weight_bytes
    matmul_len = 0
    if device == "cpu" and plan.precision.autocast == "bf16":
        from nekotune.training.speed import MATMUL_ATTENTION_MAX_LEN

        act_bytes = CPU_BF16_ACT_BYTES
        matmul_len = MATMUL_ATTENTION_MAX_LEN if plan.packing else 0
    stage = _stage(cfg)
    return Settings(device=device, weight_bytes=weight_bytes, act_bytes=act_bytes,
                    quant4=plan.quantization == "4bit", batch=cfg.train.batch_size, seq=cfg.data.max_seq_len,
                    grad_ckpt=plan.grad_checkpointing, lora_r=cfg.lora.r, targets=tuple(targets),
                    modules_to_save=tuple(cfg.lora.modules_to_save or ()),
                    dora=cfg.lora.use_dora, grad_accum=cfg.train.grad_accum, stage=stage.name,
                    grad_rows=stage.grad_rows, nograd_rows=stage.nograd_rows, full_logits=stage.full_logits,
                    matmul_attention_len=matmul_len)


def _stage(cfg: Any) -> Any:
    """train.stage as trained: LLaMA-Factory's stage=dpo with pref_loss=simpo is the simpo stage."""
    from nekotune.registry import TRAINING_STAGES
    from nekotune.training.preference import resolve_stage

    return TRAINING_STAGES[resolve_stage(cfg.train.stage, cfg.train.pref_loss)[0]]


# -- fitting a budget --------------------------------------------------------------------------
def parse_size(text: str) -> float:
    """'8GB', '12g', '7.5GiB', '24000MB' -> MB."""
    t = text.strip().lower().replace("ib", "b")
    for suffix, factor in (("gb", 1024), ("g", 1024), ("mb", 1), ("m", 1)):
        if t.endswith(suffix):
            try:
                return float(t[: -len(suffix)]) * factor
            except ValueError:
                break
    raise UserError(f"--fit {text!r}: give a memory size like 8GB or 24000MB (or auto on a GPU machine)")


def gpu_memory_mb() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / MB
    except ImportError:
        pass
    raise UserError("--fit auto needs a CUDA GPU; give the budget instead, e.g. --fit 8GB")


def fit(arch: Arch, s: Settings, budget_mb: float,
        quantization: tuple[bool, ...] = (False, True)) -> tuple[Settings, Estimate] | None:
    """The fastest settings under the budget, in this order of preference: the given batch; a
    smaller micro-batch with more accumulation (same effective batch); gradient checkpointing;
    shorter sequences; 4-bit weights where the device runs them (`quantization`,
    devices.fit_options: not on a CPU or a Mac)."""
    effective = s.batch * s.grad_accum
    for quant in ([s.quant4] if s.quant4 else list(quantization)):
        for ckpt in ([s.grad_ckpt] if s.grad_ckpt else [False, True]):
            seq = s.seq
            while seq >= min(256, s.seq):
                for batch in _batches(s.batch):
                    trial = Settings(**{**asdict(s), "quant4": quant, "grad_ckpt": ckpt, "seq": seq, "batch": batch,
                                        "grad_accum": max(1, effective // batch)})
                    trial.targets = tuple(trial.targets)
                    est = estimate(arch, trial)
                    if est.total_mb <= budget_mb:
                        return trial, est
                seq //= 2
    return None


def _batches(start: int) -> list[int]:
    out, b = [], start
    while b >= 1:
        out.append(b)
        b //= 2
    return out


def overrides_for(s: Settings) -> list[str]:
    out = [f"train.batch_size={s.batch}", f"train.grad_accum={s.grad_accum}", f"data.max_seq_len={s.seq}",
           f"train.grad_checkpointing={'true' if s.grad_ckpt else 'false'}"]
    if s.quant4:
        out.append("model.quantization=4bit")
    return out


# -- the stage -------------------------------------------------------------------------------
@dataclass
class MemoryReport:
    arch: Arch
    settings: Settings
    estimate: Estimate
    result: dict  # what `nekotune estimate --json` prints


def estimate_training(cfg: Any, model_arg: str | None, fit_to: str | None = None,
                      facts: devices.DeviceFacts | None = None) -> MemoryReport:
    """Peak training memory of `cfg` on the model `model_arg` names (default: the config's), on
    this machine's device (`facts`, default devices.light_facts) as `train` would run there, and
    with `fit_to` (a size like 8GB, or auto) the fastest settings that fit it."""
    name = model_arg or cfg.model.name_or_path
    raw, source = read_model_config(name)
    arch = Arch.from_config(raw, name=name)
    facts = facts or devices.light_facts(cfg.model.device)
    notes: list[str] = []
    if cfg.model.quantization and facts.kind != "cuda" and cfg.model.device == "auto":
        notes.append(f"model.quantization={cfg.model.quantization} runs on an NVIDIA GPU only: estimated for one")
        facts = devices.DeviceFacts("cuda", facts.torch_version, cuda_bf16=True, bitsandbytes=True)
    cfg, adapted = devices.adapt_config(cfg, facts)
    s = settings_from_config(cfg, facts.kind, facts)
    est = estimate(arch, s)
    vision = _add_vision(est, raw, source, cfg, s)
    result = {"model": name, "config": source, "params": arch.params, "device": facts.kind,
              "unified_memory": facts.unified, "notes": notes + adapted, "stage": s.stage,
              # compute per example relative to SFT on one sequence (DPO 2.67x; measured 2.62x, docs/preference.md)
              "step_cost_vs_sft": round(_stage(cfg).step_cost, 2),
              "lora_params": lora_params(arch, s.lora_r, s.targets, s.dora), "estimate": est.to_dict(),
              "plain_hf_loss_logits_mb": round(plain_loss_logits_mb(arch, s), 1),
              "inference_mb": {k: round(v, 1) for k, v in inference_mb(arch).items()}}
    if vision:
        result["vision"] = vision
    preset_gb = re.fullmatch(r"(\d+)gb", cfg.preset or "")
    if preset_gb:  # the preset names the memory it is for: say whether this config fits it
        budget = int(preset_gb.group(1)) * 1024
        result["preset"] = {"name": cfg.preset, "budget_mb": budget, "fits": est.total_mb <= budget}
    if fit_to:
        result["fit"] = _fit_result(arch, s, facts, fit_to)
    return MemoryReport(arch, s, est, result)


# -- vision-language models (issue 17) ---------------------------------------------------------
def _preprocessor(source: str) -> dict | None:
    """preprocessor_config.json beside the config.json read (its pixel bounds), if there is one."""
    p = Path(source)
    candidate = (p.parent if p.suffix == ".json" else p) / "preprocessor_config.json"
    if candidate.is_file():
        return read_json(candidate)
    if source.count("/") == 1 and not p.exists():  # a hub id: the file is small; missing is fine
        try:
            from huggingface_hub import hf_hub_download

            return read_json(Path(hf_hub_download(source, "preprocessor_config.json")))
        except Exception:  # offline or absent: the family's own bounds
            return None
    return None


def _add_vision(est: Estimate, raw: dict, source: str, cfg: Any, s: Settings) -> dict | None:
    """The vision tower's weights and activations for one image per row at data.image_max_pixels.
    Image tokens need no term of their own: they are part of the max_seq_len tokens above."""
    from nekotune.vision.families import family_of

    if family_of(raw) is None:
        return None
    from nekotune.vision.plan import vision_plan

    plan = vision_plan(raw, _preprocessor(source), cfg.data.image_min_pixels, cfg.data.image_max_pixels)
    assert plan is not None
    images = s.batch  # one image per row (a row with more images has fewer text tokens)
    # bitsandbytes' quantization of the vision tower is not verified here: counted in bf16
    items = {"vision tower weights": plan.vision_params * (s.weight_bytes if not s.quant4 else 2.0) / MB,
             "vision tower activations": plan.activation_elems(images, trained=cfg.lora.vision) * s.act_bytes / MB}
    if cfg.lora.vision:  # qkv, proj, fc1, fc2 of each block
        h, i = plan.vision_hidden, plan.vision_intermediate
        n = plan.vision_depth * s.lora_r * ((h + 3 * h) + 2 * h + 2 * (h + i))
        items["vision LoRA weights + grads + AdamW (fp32)"] = n * 16 / MB
    for key, value in items.items():
        est.items[key] = value
    est.items["allocator slack"] += ALLOCATOR_SLACK * sum(items.values())
    return {"family": plan.family, "vision_params": plan.vision_params, "min_pixels": plan.min_pixels,
            "max_pixels": plan.max_pixels, "max_tokens_per_image": plan.max_tokens_per_image,
            "images_per_micro_batch": images, "vision_trained": cfg.lora.vision}


def _fit_result(arch: Arch, s: Settings, facts: devices.DeviceFacts, fit_to: str) -> dict:
    options = devices.fit_options(facts)
    if fit_to.strip().lower() != "auto":
        budget = parse_size(fit_to)
    elif facts.kind == "mps":
        budget = devices.memory_budget_mb(facts) or parse_size("8GB")
    else:
        budget = gpu_memory_mb()
    found = fit(arch, s, budget, options.quantization)
    if found:
        return {"budget_mb": round(budget), "settings": asdict(found[0]), "total_mb": round(found[1].total_mb, 1),
                "overrides": overrides_for(found[0]), "note": ""}
    hint = f"; {options.note}" if options.note else ""
    return {"budget_mb": round(budget), "settings": None,
            "message": f"nothing fits: use a smaller model, or more GPUs with FSDP (docs/distributed.md){hint}"}

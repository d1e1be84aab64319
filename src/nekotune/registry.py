"""The open sets, one table each: data formats, training stages, GGUF types, architectures'
export facts, inference engines.

Plain data and no imports from the rest of nekotune, so that the config (the bottom layer) can
validate against it, and the CLI's choices, the UI's lists, the stages and the docs all read
the same table. Adding a member is one entry here, plus the code that implements it where the
entry says (a format's adapter in data/formats.py, a type's encoder in export/gguf.py ...).
"""

from __future__ import annotations

from dataclasses import dataclass

# -- data formats: name -> what a row looks like (the adapters: data/formats.py FORMATS) --------
DATA_FORMATS: dict[str, str] = {
    "alpaca": "instruction, input, output (optional history, system)",
    "qa": "a question and an answer (instruction/prompt/question/query + output/response/answer/completion)",
    "prompt_target": "text and target",
    "messages": "messages: [{role, content}, ...] (OpenAI style)",
    "sharegpt": "conversations: [{from, value}, ...]",
    "text": "text: plain text for continued pre-training",
}
DATA_FORMAT_CHOICES = ("auto", *DATA_FORMATS)  # data.format


# -- training stages: name -> recipe -----------------------------------------------------------
@dataclass(frozen=True)
class TrainingStage:
    name: str
    recipe: str  # "module:function" taking (cfg, ...) like nekotune.training.train
    description: str
    formats: tuple[str, ...] = ()  # data formats it trains on; empty: any
    # issue 18 (preference tuning): what a step costs, read by the recipe, `estimate` and the docs
    data: str = "sft"  # "sft" conversations | "text" | "pairs" (chosen + rejected) | "kto" (answer + label)
    grad_rows: int = 1  # sequences per example through forward + backward
    nograd_rows: int = 0  # sequences per example through a no-grad forward (reference, KL)
    full_logits: bool = False  # materialises [rows, length, vocab] logits (TRL's CPO/ORPO)
    reference: bool = False  # needs a reference model (base with the adapter disabled, or the SFT model)
    default_beta: float | None = None  # train.pref_beta when unset

    @property
    def preference(self) -> bool:
        return self.data in ("pairs", "kto")

    @property
    def step_cost(self) -> float:
        """Compute per example relative to one SFT sequence of the same length (a forward is 1, forward +
        backward 3). DPO: 2.67; measured 2.62 on SmolLM2 (docs/preference.md)."""
        return (3 * self.grad_rows + self.nograd_rows) / 3


PREFERENCE_RECIPE = "nekotune.training.preference_recipe:train"
TRAINING_STAGES: dict[str, TrainingStage] = {s.name: s for s in (
    TrainingStage("sft", "nekotune.training.recipe:train", "supervised fine-tuning: the answers are trained"),
    TrainingStage("pt", "nekotune.training.recipe:train", "continued pre-training: every token of plain text "
                  "is trained", formats=("text",), data="text"),
    # policy chosen + rejected with gradients, the same two through the reference
    TrainingStage("dpo", PREFERENCE_RECIPE, "DPO on chosen/rejected pairs (TRL), reference: the base with the "
                  "adapter disabled", data="pairs", grad_rows=2, nograd_rows=2, reference=True, default_beta=0.1),
    # no reference; TRL's CPO/ORPO compute log-probs from full logits
    TrainingStage("orpo", PREFERENCE_RECIPE, "ORPO on pairs (TRL): SFT on chosen + odds-ratio term, no reference",
                  data="pairs", grad_rows=2, full_logits=True, default_beta=0.1),
    TrainingStage("simpo", PREFERENCE_RECIPE, "SimPO on pairs (TRL's CPO trainer): length-normalised, no "
                  "reference", data="pairs", grad_rows=2, full_logits=True, default_beta=2.0),
    # one answer with gradients; no-grad: the policy on the mismatched (KL) answer, the reference on both
    TrainingStage("kto", PREFERENCE_RECIPE, "KTO on answers labelled desirable/undesirable (TRL), or on pairs",
                  data="kto", grad_rows=1, nograd_rows=3, reference=True, default_beta=0.1),
)}
PREFERENCE_STAGES = tuple(n for n, s in TRAINING_STAGES.items() if s.preference)
# DPOConfig.loss_type values that trained with LoRA on pre-tokenized rows (TRL 1.16); train.pref_loss
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSSES = ("kto", "apo_zero_unpaired")


# -- GGUF types: --type names -> what export/gguf.py writes ------------------------------------
@dataclass(frozen=True)
class GgufType:
    name: str
    tensor_type: str  # gguf.GGMLQuantizationType member for the matrices
    file_type: str  # gguf.LlamaFileType member for general.file_type
    low_bit: bool = False  # 4-5 bits: the output matrix keeps 8 bits, as llama.cpp keeps it higher
    # issue 20: a K-quant file; tensor_type is its default, llama.cpp's per-tensor rules (export/mixture.py)
    # give some tensors more bits, and export/quants.py encodes them in pure NumPy
    k_mixture: bool = False


GGUF_TYPES: dict[str, GgufType] = {t.name: t for t in (
    GgufType("f32", "F32", "ALL_F32"),
    GgufType("f16", "F16", "MOSTLY_F16"),
    GgufType("bf16", "BF16", "MOSTLY_BF16"),
    GgufType("q8_0", "Q8_0", "MOSTLY_Q8_0"),
    GgufType("q4_0", "Q4_0", "MOSTLY_Q4_0", low_bit=True),
    GgufType("q4_1", "Q4_1", "MOSTLY_Q4_1", low_bit=True),
    GgufType("q5_0", "Q5_0", "MOSTLY_Q5_0", low_bit=True),
    GgufType("q5_1", "Q5_1", "MOSTLY_Q5_1", low_bit=True),
    # issue 20: K-quants, no llama.cpp build needed
    GgufType("q2_k", "Q2_K", "MOSTLY_Q2_K", k_mixture=True),
    GgufType("q3_k_m", "Q3_K", "MOSTLY_Q3_K_M", k_mixture=True),
    GgufType("q4_k_s", "Q4_K", "MOSTLY_Q4_K_S", k_mixture=True),
    GgufType("q4_k_m", "Q4_K", "MOSTLY_Q4_K_M", k_mixture=True),
    GgufType("q5_k_s", "Q5_K", "MOSTLY_Q5_K_S", k_mixture=True),
    GgufType("q5_k_m", "Q5_K", "MOSTLY_Q5_K_M", k_mixture=True),
    GgufType("q6_k", "Q6_K", "MOSTLY_Q6_K", k_mixture=True),
)}


# -- architectures: config.json model_type -> facts the export and the estimate need -----------
@dataclass(frozen=True)
class Architecture:
    model_type: str
    gguf_arch: str | None  # llama.cpp's architecture name; None: the GGUF export does not write it
    permute_qk: bool = False  # HF's half-split rotary layout -> llama.cpp's interleaved one (Llama family)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3): weights the estimate counts
    examples: str = ""  # model families, for messages


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "llama", permute_qk=True, examples="SmolLM2, Llama 3"),
    Architecture("mistral", "llama", permute_qk=True),  # the Llama graph in llama.cpp
    # Qwen2/Qwen3 use NEOX rotary in llama.cpp: no permutation
    Architecture("qwen2", "qwen2", examples="Qwen2, Qwen2.5"),
    Architecture("qwen3", "qwen3", qk_norm=True),
    Architecture("qwen3_moe", None, qk_norm=True),
)}


def gguf_architectures() -> str:
    """The model types the GGUF export writes, for messages: "llama (SmolLM2, Llama 3), mistral, ..."."""
    return ", ".join(f"{a.model_type} ({a.examples})" if a.examples else a.model_type
                     for a in ARCHITECTURES.values() if a.gguf_arch)


# -- inference engines: what generates tokens for chat, ask, predict, eval, compare, serve -------
@dataclass(frozen=True)
class Engine:
    name: str
    module: str  # the module with the engine class (stream/generate_batch over the Renderer's token ids)
    description: str
    install: str = "included"  # what to install when it is missing
    serve_only: bool = False  # runs as its own server process (vLLM): chat, predict and eval cannot use it
    python_module: str | None = None  # importable module it needs (checked with find_spec, never imported)
    executable: str | None = None  # program it runs, on PATH (or in the environment variable below)
    executable_env: str | None = None


ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("transformers", "nekotune.engines.transformers", "transformers' generate on the loaded model, any device"),
    # issue 19: llama.cpp on CPUs and Apple silicon, vLLM for GPU serving
    Engine("llama.cpp", "nekotune.engines.llamacpp", "llama.cpp on a cached GGUF of the model; adapters as LoRA "
           "GGUFs (fastest on CPUs and Apple silicon)", install="pip install 'nekotune[llamacpp]'",
           python_module="llama_cpp"),
    Engine("vllm", "nekotune.engines.vllm", "vLLM's OpenAI server as a subprocess, LoRA adapters switched per "
           "request (NVIDIA GPUs; serve only)", install="install vLLM in its own environment (pip install vllm)",
           serve_only=True, executable="vllm", executable_env="NEKOTUNE_VLLM"),
)}
ENGINE_CHOICES = ("auto", *ENGINES)  # generate.engine and --engine

"""GGUF export in pure Python: the `gguf` package writes, nekotune maps names and metadata.

The source is a merged directory, an HF model, or base + adapter merged on the fly: tensors are
merged, converted and written one at a time (nekotune.merge.open_merged), so the export needs
about one tensor of memory beyond the adapter.

What llama.cpp needs beyond the weights, and why it is written as it is:
- Llama-family Q/K rows are permuted into llama.cpp's rotary layout (HF uses the "half split"
  rotary form, llama.cpp the interleaved one); Qwen2/Qwen3 use NEOX rotary in llama.cpp: no permute.
- the tokenizer as a "gpt2" BPE vocabulary with merges and a pre-tokenizer name; llama.cpp knows a
  pre-tokenizer by the hash of a reference text's token ids (its convert_hf_to_gguf convention);
- the chat template nekotune trained with, so llama.cpp renders the same prompt as transformers;
- special token ids including end-of-turn, and whether BOS is added.
Quantized types come from gguf.quants (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); K-quants only through
llama-cpp-python's quantizer when it is installed.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from nekotune.config import Config
from nekotune.errors import UserError
from nekotune.model.source import ModelSource

# model_type -> llama.cpp architecture. Mistral is the Llama graph in llama.cpp.
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED = "llama (SmolLM2, Llama 3), mistral, qwen2 (Qwen2, Qwen2.5), qwen3"
PERMUTE_QK = {"llama"}
# --type -> (tensor type, file type); filled lazily because gguf is imported lazily.
TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m")
LOW_BIT = ("q4_0", "q4_1", "q5_0", "q5_1")
K_QUANT_FALLBACK = "q5_0"  # closest in quality to Q4_K_M among the types gguf.quants can write

# Pre-tokenizers llama.cpp recognises, by the hash of CHKTXT's token ids (convert_hf_to_gguf's scheme).
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
          "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE "
          "you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo and later
}
# A fine-tune with a changed vocabulary has a new hash but the same split rules: recognise the regex.
PRE_TOKENIZER_REGEX = {r"\p{N}{1,3}": "llama-bpe", r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*": "qwen2"}


def _types():
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
            "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1)}


# -- the model being exported ------------------------------------------------------------------
@dataclass
class Source:
    spec: ModelSource
    cfg: Config
    tokenizer: Any
    renderer: Any

    @property
    def name(self) -> str:
        return self.spec.name


def prepare(cfg: Config, model_arg: str | None) -> Source:
    """Resolve --model, and the prompt settings it was trained with (run config or merge info)."""
    from nekotune.data.render import Renderer
    from nekotune.model import load_tokenizer, resolve_source

    spec, cfg = resolve_source(cfg, model_arg, merged_prompts=True)
    tokenizer = load_tokenizer(spec, cfg.model)
    return Source(spec, cfg, tokenizer, Renderer.from_config(tokenizer, cfg.data))


def architecture(config: dict) -> str:
    model_type = config.get("model_type", "?")
    if model_type not in ARCHS:
        arch = ", ".join(config.get("architectures") or []) or "unknown class"
        raise UserError(f"model_type {model_type} ({arch}) is not supported by the GGUF export; "
                        f"supported: {SUPPORTED}")
    return ARCHS[model_type]


# -- tensors ---------------------------------------------------------------------------------
def permute_for_rope(weight, n_head: int):
    """HF's rotary layout (first half / second half of each head) -> llama.cpp's interleaved pairs."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensors(merged, config: dict, arch: str) -> list[tuple[str, str, tuple]]:
    """(HF name, GGUF name, shape) for every tensor llama.cpp needs, in the checkpoint's order."""
    import gguf

    names = gguf.TensorNameMap(_arch_enum(arch), config["num_hidden_layers"])
    out = []
    for hf_name in merged.names():
        if hf_name.endswith(("rotary_emb.inv_freq", ".masked_bias")):
            continue  # recomputed by llama.cpp
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings") and "model.embed_tokens.weight" \
                in merged.shapes:
            continue  # tied: llama.cpp reuses token_embd as the output matrix
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name.endswith("attn_rot_embd"):
            raise UserError(f"tensor {hf_name} has no GGUF name for architecture {arch}; this checkpoint is not a "
                            f"standard {config.get('model_type')} model")
        out.append((hf_name, gguf_name, tuple(merged.shapes[hf_name])))
    return out


def _arch_enum(arch: str):
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def tensor_type(gguf_name: str, shape: tuple, requested: str, has_output: bool):
    """The type one tensor is written in: vectors stay f32; rows that do not fill whole blocks fall
    back to f16, as llama.cpp does; at 4-5 bits the output matrix keeps 8 bits (llama.cpp keeps
    it at Q6_K, which gguf cannot write). At q8_0 the output matrix stays f16, where llama.cpp
    would write q8_0: every logit goes through it, and on the demo model that one tensor decides
    whether llama.cpp's greedy answers follow transformers' (7 of 12 prompts equal for 20 tokens
    instead of 2; docs/export.md), for about 12% more file."""
    import gguf

    Q = gguf.GGMLQuantizationType
    qtype = _types()[requested][0]
    if len(shape) < 2:
        return Q.F32
    is_output = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output)
    if requested in LOW_BIT and is_output:
        qtype = Q.Q8_0
    elif requested == "q8_0" and is_output:
        return Q.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def encode(tensor, qtype):
    """A float32 torch tensor -> the numpy array GGUFWriter writes for `qtype`."""
    import gguf
    import numpy as np

    data = tensor.float().contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _tensor_info(writer, name: str, shape: tuple, qtype) -> None:
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
        return
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)


def llama3_rope_factors(rope: dict, head_dim: int, theta: float):
    """Llama 3.1+ long-context rotary frequencies, as llama.cpp's rope_freqs tensor."""
    import numpy as np

    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


# -- metadata --------------------------------------------------------------------------------
def rope_parameters(config: dict) -> dict:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def add_hparams(writer, config: dict, n_vocab: int) -> dict:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = rope_parameters(config)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(n_vocab)
    kind = rope["rope_type"]
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings",
                                                                config.get("max_position_embeddings", 4096))))
    elif kind not in ("default", "llama3"):
        raise UserError(f"config.json: rope type {kind} is not supported by the GGUF export "
                        f"(supported: default, linear, yarn, llama3)")
    return {"head_dim": head_dim, "rope": rope}


def pre_tokenizer(tokenizer, backend: dict, console) -> str:
    digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    pattern = str(backend.get("pre_tokenizer"))
    for needle, name in PRE_TOKENIZER_REGEX.items():
        if needle.replace("\\", "\\\\") in pattern:
            return name
    console.print(f"[yellow]warning:[/] llama.cpp knows no pre-tokenizer for this tokenizer (hash {digest[:12]}); "
                  f"writing 'default'. Check tokenization with `nekotune export verify`.")
    return "default"


def looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


def bpe_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf

    T = gguf.TokenType
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if reverse and max(reverse) >= n_vocab:
        raise UserError(f"the tokenizer has {max(reverse) + 1} tokens but the embedding only {n_vocab} rows; "
                        f"resize the model's embeddings (or use the tokenizer it was trained with)")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(T.CONTROL if added[i].special or looks_special(reverse[i]) else T.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(T.NORMAL)
    return tokens, types


def add_tokenizer(writer, source: Source, n_vocab: int, console) -> None:
    import json

    import gguf

    tokenizer = source.tokenizer
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style (byte fallback)" if model.get("byte_fallback") else model.get("type", "slow")
        raise UserError(f"the tokenizer is {kind}; the GGUF export writes byte-level BPE tokenizers "
                        f"(SmolLM2, Llama 3, Qwen, Mistral Nemo); convert this model with llama.cpp's "
                        f"convert_hf_to_gguf.py")
    tokens, types = bpe_vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer, backend, console))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # SpecialVocab reads merges from a saved tokenizer
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    special.special_token_ids.update(special_token_ids(tokenizer, source.renderer))
    special.add_special_token = adds_special_tokens(tokenizer)
    special.chat_template = source.renderer.template
    special.add_to_gguf(writer, quiet=True)


def special_token_ids(tokenizer, renderer) -> dict[str, int]:
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
           "pad": tokenizer.pad_token_id}
    eot = tokenizer.convert_tokens_to_ids(renderer.eot_text) if renderer.eot_text else None
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids["eot"] = eot
    return {k: v for k, v in ids.items() if isinstance(v, int)}


def adds_special_tokens(tokenizer) -> dict[str, bool]:
    """What the HF tokenizer adds on its own, measured rather than read from configs that may lie."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and len(ids) > len(plain) and ids[0] == bos,
            "eos": eos is not None and len(ids) > len(plain) and ids[-1] == eos}


# -- writing ---------------------------------------------------------------------------------
WRITTEN_BY_KEY = "nekotune.written_by"  # a GGUF nekotune wrote; only such a file is ever overwritten
WRITTEN_BY = "nekotune export gguf"


def written_by_nekotune(path: Path) -> bool:
    """Whether `path` is a GGUF this exporter wrote (its metadata says so)."""
    import gguf

    try:
        field = gguf.GGUFReader(path).fields.get(WRITTEN_BY_KEY)
        return field is not None and str(field.contents()).startswith("nekotune")
    except Exception:  # not a GGUF, truncated, unreadable: not ours
        return False


def write_gguf(source: Source, merged, path: Path, type_name: str, console) -> None:
    import gguf
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    config = merged.config
    arch = architecture(config)
    plan = gguf_tensors(merged, config, arch)
    n_vocab = merged.shapes.get("model.embed_tokens.weight", (config.get("vocab_size"),))[0]
    has_output = any(g == "output.weight" for _, g, _ in plan)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_type("model")
    writer.add_name(source.name)
    writer.add_string(WRITTEN_BY_KEY, WRITTEN_BY)
    hp = add_hparams(writer, config, n_vocab)
    writer.add_file_type(_types()[type_name][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, source, n_vocab, console)
    types = {g: tensor_type(g, shape, type_name, has_output) for _, g, shape in plan}
    rope_freqs = llama3_rope_factors(hp["rope"], hp["head_dim"], float(hp["rope"]["rope_theta"])) \
        if hp["rope"]["rope_type"] == "llama3" else None
    for _, g, shape in plan:
        _tensor_info(writer, g, shape, types[g])
    if rope_freqs is not None:
        _tensor_info(writer, "rope_freqs.weight", rope_freqs.shape, gguf.GGMLQuantizationType.F32)
    total = sum(math.prod(s) for _, _, s in plan)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    columns = (TextColumn(f"GGUF {type_name}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("export", total=total * 4)
        for hf_name, g, shape in plan:
            tensor = prepare_tensor(merged.get(hf_name), hf_name, config, arch)
            writer.write_tensor_data(encode(tensor, types[g]))
            bar.advance(task, math.prod(shape) * 4)
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs)
    writer.close()


def prepare_tensor(tensor, hf_name: str, config: dict, arch: str):
    if arch in PERMUTE_QK:
        heads = config["num_attention_heads"]
        if ".q_proj." in hf_name:
            return permute_for_rope(tensor, heads)
        if ".k_proj." in hf_name:
            return permute_for_rope(tensor, config.get("num_key_value_heads") or heads)
    return tensor


def quantize_k(source_path: Path, target: Path) -> None:
    """Q4_K_M through llama.cpp's own quantizer (llama-cpp-python)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source_path).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with code {rc}")


def _k_quant_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def export_gguf(source: Source, out: Path, type_name: str, console) -> str:
    """Write `out`; returns the type actually written (q4_k_m may fall back)."""
    from nekotune.io import atomic_file
    from nekotune.merge import NotStreamable, open_merged

    if type_name not in TYPE_NAMES:
        raise UserError(f"--type {type_name} is not one of {', '.join(TYPE_NAMES)}")
    architecture(_config_of(source))  # fail before any weight is read
    try:
        merged = open_merged(source.spec, source.cfg, low_memory=True, console=console)
    except NotStreamable as exc:  # an adapter variant only peft itself merges: merge in memory
        console.print(f"note: {exc.reason}; merging in memory with peft")
        merged = open_merged(source.spec, source.cfg, low_memory=False, compute_dtype="float32", console=console)
    if type_name == "q4_k_m":
        if not _k_quant_available():
            console.print(f"[yellow]note:[/] q4_k_m needs llama.cpp's quantizer (pip install 'nekotune[verify]'); "
                          f"writing {K_QUANT_FALLBACK}, the nearest type the gguf package can write")
            type_name = K_QUANT_FALLBACK
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp, atomic_file(out) as final:
                f32 = Path(tmp) / "f32.gguf"
                write_gguf(source, merged, f32, "f32", console)
                quantize_k(f32, final)
            return type_name
    with atomic_file(out) as tmp:
        write_gguf(source, merged, tmp, type_name, console)
    return type_name


def _config_of(source: Source) -> dict:
    from nekotune.io import read_json
    from nekotune.merge import local_model_dir

    return read_json(local_model_dir(source.spec.base, source.cfg.model.revision) / "config.json")


def file_size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**20:.1f} MB" if size < 2**30 else f"{size / 2**30:.2f} GB"


def export_command(cfg, model_arg: str | None, out: str, type: str = "q8_0") -> Path:
    from rich.console import Console

    from nekotune.io import check_output_file
    from nekotune.merge import local_model_dir, source_paths

    console = Console(stderr=True)
    out_path = Path(out).expanduser()
    if out_path.suffix != ".gguf":
        raise UserError(f"--out {out} should name a .gguf file, e.g. --out model-{type}.gguf")
    if out_path.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name ending in .gguf")
    source = prepare(cfg, model_arg)
    check_output_file(out_path, source_paths(source.spec, local_model_dir(source.spec.base, source.cfg.model.revision),
                                             model_arg), ours=written_by_nekotune)
    written = export_gguf(source, out_path, type, console)
    console.print(f"wrote {out_path} ({written}, {file_size(out_path)}) from {source.spec.label}", soft_wrap=True)
    console.print(f"check it against transformers: nekotune export verify {out_path}"
                  + (f" --model {model_arg}" if model_arg else ""), soft_wrap=True, markup=False)
    return out_path

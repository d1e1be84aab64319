"""K-quants in pure Python: block encoders, llama.cpp's mixture rules, the importance matrix.

The encoders are checked against the `gguf` package's dequantizers (the format reference) and,
when llama-cpp-python is installed, byte for byte against llama.cpp's own quantizer
(ggml_quantize_chunk in its libggml-base). Exports use a tiny Llama whose rows are multiples of
256 (hidden 256, FFN 512), so the K types are really used rather than their fallbacks.
"""

from __future__ import annotations

import ctypes
import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from nekotune.config import load_config
from nekotune.errors import UserError

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
K_FILES = ["q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
K_BLOCKS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _cfg():
    return load_config(None, [], default_to_demo=False)


def _weights(rows=32, cols=1024, seed=0):
    """Gaussian weights with a few outlier columns and one all-zero super-block, like real layers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    x[:, rng.choice(cols, 8, replace=False)] *= 6
    x[1, :256] = 0
    x[2] += 0.03  # a row that is not centred
    return x


def _importance(cols=1024, seed=1):
    return (np.random.default_rng(seed).random(cols).astype(np.float32) ** 4 + 1e-3)


def _plain_rounding(x, qtype: str):
    """Min/max rounding with exact float scales: what a naive encoder gets at the same bits."""
    sub, nmax, with_min = {"Q2_K": (16, 3, True), "Q3_K": (16, 4, False), "Q4_K": (32, 15, True),
                           "Q5_K": (32, 31, True), "Q6_K": (16, 32, False), "Q4_0": (32, 8, False),
                           "Q4_1": (32, 15, True), "Q5_0": (32, 16, False), "Q5_1": (32, 31, True)}[qtype]
    b = x.reshape(-1, sub).astype(np.float64)
    if with_min:
        lo = np.minimum(b.min(1, keepdims=True), 0)
        d = (b.max(1, keepdims=True) - lo) / nmax
        d[d == 0] = 1
        return (np.clip(np.rint((b - lo) / d), 0, nmax) * d + lo).reshape(x.shape)
    top = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)
    d = -top / nmax
    d[d == 0] = 1
    return (np.clip(np.rint(b / d), -nmax, nmax - 1) * d).reshape(x.shape)


# -- block encoders --------------------------------------------------------------------------
# without an importance matrix Q4_0..Q5_1 are gguf.quants' own encoders, checked by gguf
ENCODED = [(q, False) for q in K_BLOCKS] + [(q, True) for q in K_BLOCKS + LEGACY]


@pytest.mark.parametrize("qtype,weighted", ENCODED)
def test_blocks_round_trip_through_gguf_and_beat_plain_rounding(qtype, weighted):
    import gguf

    from nekotune.export.quants import quantize

    Q = gguf.GGMLQuantizationType[qtype]
    x, qw = _weights(), _importance()
    data = quantize(x, Q, qw if weighted else None)
    assert data.dtype == np.uint8 and data.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, Q)
    back = gguf.quants.dequantize(data, Q)
    assert np.isfinite(back).all() and np.all(back[1, :256] == 0)  # the zero super-block stays zero
    plain = _plain_rounding(x, qtype)
    w = qw if weighted else np.ones_like(qw)
    ours, naive = np.mean(w * (back - x) ** 2), np.mean(w * (plain - x) ** 2)
    assert ours < 0.99 * naive, (ours, naive)  # the naive scales are not even rounded to their 4-8 bits
    bits = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}
    assert np.sqrt(np.mean((back - x) ** 2)) < 0.03 * 2.0 ** -(bits[qtype] - 2)  # about one step of 4 sigma


@pytest.mark.parametrize("qtype", K_BLOCKS)
def test_imatrix_moves_error_to_unimportant_columns(qtype):
    import gguf

    from nekotune.export.quants import quantize

    Q = gguf.GGMLQuantizationType[qtype]
    x, qw = _weights(seed=3), _importance(seed=4)
    plain = gguf.quants.dequantize(quantize(x, Q), Q)
    weighted = gguf.quants.dequantize(quantize(x, Q, qw), Q)
    assert np.mean(qw * (weighted - x) ** 2) < np.mean(qw * (plain - x) ** 2)


def test_chunks_and_threads_do_not_change_the_bytes(monkeypatch):
    import gguf

    from nekotune.export import quants

    Q = gguf.GGMLQuantizationType
    x = _weights(rows=40, cols=512)
    whole = quants.quantize(x, Q.Q4_K, threads=1)
    monkeypatch.setattr(quants, "CHUNK_ELEMENTS", 1024)  # two rows per chunk: 20 chunks on 3 threads
    assert np.array_equal(quants.quantize(x, Q.Q4_K, threads=3), whole)
    half = x.astype(np.float16)  # float16 input (a GGUF's) is converted chunk by chunk
    assert np.array_equal(quants.quantize(half, Q.Q6_K, threads=2), quants.quantize(half.astype(np.float32), Q.Q6_K))
    with pytest.raises(ValueError, match="multiple"):
        quants.quantize(x[:, :300], Q.Q4_K)


def _ggml():
    import llama_cpp

    path = next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"), None)
    if path is None:
        pytest.skip("llama-cpp-python without libggml-base")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def _awkward_rows(cols=2048, seed=5):
    """Rows that exercise every branch of llama.cpp's searches: zero sub-blocks and super-blocks,
    constant, all-positive and all-negative blocks, and values on a coarse grid (as from a
    float16 or bf16 checkpoint) where candidate scales tie exactly."""
    rng = np.random.default_rng(seed)
    x = _weights(rows=16, cols=cols, seed=seed)
    x[3, :16] = 0
    x[4, :32] = 0.01
    x[5, :32] = -0.01
    x[6] = np.abs(x[6])
    x[7] = -np.abs(x[7])
    x[8] = np.rint(x[8] * 512) / 512
    x[9] = x[9].astype(np.float16).astype(np.float32)
    x[10, 256:512] = rng.standard_normal(256).astype(np.float32) * 1e-4  # a much quieter super-block
    return x


@needs_llama_cpp
@pytest.mark.parametrize("qtype,weighted", ENCODED)
def test_blocks_match_llama_cpp(qtype, weighted):
    """The same searches in the same float32 order of operations: the same bytes as llama.cpp's
    quantizer, block for block (ggml_quantize_chunk in its libggml-base)."""
    import gguf

    from nekotune.export.quants import quantize

    lib, Q = _ggml(), gguf.GGMLQuantizationType[qtype]
    for seed in (5, 6):
        x, qw = _awkward_rows(seed=seed), _importance(2048, seed=seed + 10)
        ref = np.zeros(gguf.quants.quant_shape_to_byte_shape(x.shape, Q), dtype=np.uint8)
        lib.ggml_quantize_chunk(int(Q), x.ctypes.data, ref.ctypes.data, 0, x.shape[0], x.shape[1],
                                qw.ctypes.data if weighted else None)
        ours = quantize(x, Q, qw if weighted else None)
        size = gguf.GGML_QUANT_SIZES[Q][1]
        differ = np.flatnonzero(np.any(ours.reshape(-1, size) != ref.reshape(-1, size), axis=1))
        assert differ.size == 0, f"{differ.size} of {ref.size // size} blocks differ, first {differ[:5]}"


# -- mixture rules ---------------------------------------------------------------------------
def _types(type_name, model, shapes):
    from nekotune.export.mixture import k_tensor_type

    return {name: k_tensor_type(name, shape, type_name, model).name for name, shape in shapes.items()}


SMOLLM2 = {"token_embd.weight": (49152, 576), "blk.0.attn_q.weight": (576, 576), "blk.0.attn_v.weight": (192, 576),
           "blk.4.attn_v.weight": (192, 576), "blk.5.attn_v.weight": (192, 576), "blk.0.ffn_down.weight": (576, 1536),
           "blk.4.ffn_down.weight": (576, 1536), "blk.0.ffn_gate.weight": (1536, 576),
           "blk.0.attn_output.weight": (576, 576), "blk.0.attn_norm.weight": (576,)}


@pytest.mark.parametrize("type_name,expected", [
    # SmolLM2: 30 layers, 9 heads / 3 KV heads, tied embeddings, hidden 576 (not a multiple of 256)
    ("q4_k_m", ["Q8_0", "Q5_0", "Q8_0", "Q5_0", "Q8_0", "Q6_K", "Q4_K", "Q5_0", "Q5_0", "F32"]),
    ("q4_k_s", ["Q8_0", "Q5_0", "Q5_1", "Q5_0", "Q5_0", "Q5_K", "Q4_K", "Q5_0", "Q5_0", "F32"]),
    ("q5_k_m", ["Q8_0", "Q5_1", "Q8_0", "Q5_1", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_1", "F32"]),
    ("q5_k_s", ["Q8_0", "Q5_1", "Q5_1", "Q5_1", "Q5_1", "Q5_K", "Q5_K", "Q5_1", "Q5_1", "F32"]),
    ("q6_k", ["Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q6_K", "Q6_K", "Q8_0", "Q8_0", "F32"]),
    ("q3_k_m", ["Q8_0", "Q4_0", "Q5_1", "Q5_0", "Q5_0", "Q5_K", "Q4_K", "Q4_0", "Q5_0", "F32"]),
    ("q2_k", ["Q8_0", "Q4_0", "Q4_0", "Q4_0", "Q4_0", "Q3_K", "Q3_K", "Q4_0", "Q4_0", "F32"]),
])
def test_mixture_rules_smollm2(type_name, expected):
    from nekotune.export.mixture import ModelShape

    got = _types(type_name, ModelShape(n_layer=30, n_gqa=3, tied=True), SMOLLM2)
    assert list(got.values()) == expected, got


def test_mixture_rules_on_whole_super_blocks():
    from nekotune.export.mixture import ModelShape, use_more_bits

    # Qwen3-1.7B: 28 layers, tied; attention V and FFN down get Q6_K in 14 of the 28 layers at Q4_K_M
    more = [i for i in range(28) if use_more_bits(i, 28)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    qwen = ModelShape(n_layer=28, n_gqa=2, tied=True)
    shapes = {f"blk.{i}.{n}.weight": s for i in (0, 3, 5) for n, s in
              (("attn_v", (1024, 2048)), ("ffn_down", (2048, 6144)), ("attn_k", (1024, 2048)))}
    shapes["token_embd.weight"] = (151936, 2048)
    got = _types("q4_k_m", qwen, shapes)
    assert got["token_embd.weight"] == "Q6_K"  # tied: quantized as the output matrix
    assert [got[f"blk.{i}.attn_v.weight"] for i in (0, 3, 5)] == ["Q6_K", "Q4_K", "Q6_K"]
    assert [got[f"blk.{i}.ffn_down.weight"] for i in (0, 3, 5)] == ["Q6_K", "Q4_K", "Q6_K"]
    assert got["blk.0.attn_k.weight"] == "Q4_K"
    untied = ModelShape(n_layer=28, n_gqa=4, tied=False)
    got = _types("q2_k", untied, {"token_embd.weight": (151936, 2048), "output.weight": (151936, 2048),
                                  "blk.0.attn_v.weight": (512, 2048), "blk.0.attn_output.weight": (2048, 2048),
                                  "blk.0.attn_q.weight": (2048, 2048)})
    assert got == {"token_embd.weight": "Q2_K", "output.weight": "Q6_K", "blk.0.attn_v.weight": "Q4_K",
                   "blk.0.attn_output.weight": "Q3_K", "blk.0.attn_q.weight": "Q2_K"}
    seventy = ModelShape(n_layer=80, n_gqa=8, tied=False, is_70b=True)
    assert _types("q4_k_s", seventy, {"blk.9.attn_v.weight": (1024, 8192)}) == {"blk.9.attn_v.weight": "Q5_K"}
    assert _types("q4_k_m", qwen, {"blk.0.ffn_down.weight": (64, 100)}) == {"blk.0.ffn_down.weight": "F16"}


# -- importance matrix files -----------------------------------------------------------------
def _legacy_imatrix(path, entries, ncall=4, trailer=True):
    with open(path, "wb") as fh:
        fh.write(struct.pack("<i", len(entries)))
        for name, values in entries.items():
            raw = name.encode()
            fh.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size))
            fh.write((values * ncall).astype("<f4").tobytes())
        if trailer:
            fh.write(struct.pack("<i", 10) + struct.pack("<i", 4) + b"wiki")
    return path


def _gguf_imatrix(path, entries, counts):
    import gguf

    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_array("imatrix.datasets", ["calibration.txt"])
    writer.add_uint32("imatrix.chunk_count", 10)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, values in entries.items():
        writer.add_tensor(f"{name}.in_sum2", (values * counts[name]).astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.array([counts[name]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_imatrix_formats_are_read(tmp_path):
    from nekotune.export.imatrix import importance_for, load_imatrix

    entries = {"blk.0.attn_q.weight": np.linspace(0.5, 2, 256, dtype=np.float32),
               "blk.0.ffn_down.weight": np.full(512, 3.0, dtype=np.float32)}
    for path in (_legacy_imatrix(tmp_path / "m.dat", entries), _legacy_imatrix(tmp_path / "n.dat", entries,
                                                                               trailer=False),
                 _gguf_imatrix(tmp_path / "m.gguf", entries, {"blk.0.attn_q.weight": 7, "blk.0.ffn_down.weight": 0})):
        data = load_imatrix(path)
        assert set(data) == set(entries)
        assert np.allclose(data["blk.0.attn_q.weight"], entries["blk.0.attn_q.weight"], rtol=1e-6)
        # a GGUF entry never seen (count 0) is all ones, as llama.cpp reads it
        want = 1.0 if path.suffix == ".gguf" else 3.0
        assert np.allclose(data["blk.0.ffn_down.weight"], want)
        assert importance_for(data, "blk.1.attn_q.weight", 256) is None
        assert importance_for(data, "blk.0.attn_q.weight", 256).shape == (256,)
        with pytest.raises(UserError, match="another model"):
            importance_for(data, "blk.0.attn_q.weight", 512)
        assert importance_for({"token_embd.weight": np.ones(3)}, "token_embd.weight", 8) is None


def test_bad_imatrix_files_are_user_errors(tmp_path, merged_k):
    from nekotune.export.imatrix import load_imatrix

    good = _legacy_imatrix(tmp_path / "g.dat", {"blk.0.attn_q.weight": np.ones(256, dtype=np.float32)})
    (tmp_path / "cut.dat").write_bytes(good.read_bytes()[:40])
    (tmp_path / "junk.dat").write_bytes(b"\x00\x10not an imatrix at all")
    (tmp_path / "empty.dat").write_bytes(b"")
    bad = {"cut.dat": "truncated", "junk.dat": "not an imatrix", "empty.dat": "truncated",
           "missing.dat": "cannot read"}
    for name, message in bad.items():
        with pytest.raises(UserError, match=message):
            load_imatrix(tmp_path / name)
    nan = _legacy_imatrix(tmp_path / "nan.dat", {"blk.0.attn_q.weight": np.full(256, np.nan, dtype=np.float32)})
    with pytest.raises(UserError, match="non-finite"):
        load_imatrix(nan)
    with pytest.raises(UserError, match="without imatrix tensors"):
        load_imatrix(merged_k["files"]["q6_k"])  # a model, not an imatrix


def test_cli_imatrix_error_is_one_line(merged_k, tmp_path, capsys):
    from nekotune.cli import main

    rc = main(["export", "gguf", "--model", str(merged_k["model"]), "--type", "q4_k_m", "--imatrix",
               str(tmp_path / "nope.dat"), "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.dat" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


# -- whole files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_k(smol_tokenizer, tmp_path_factory):
    """A tiny Llama with 256-multiple rows (8 layers: the layer rules differ along the stack),
    exported to every K type with llama_cpp made unimportable."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nekotune.commands.export import export_command

    root = tmp_path_factory.mktemp("kquant")
    tok = smol_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    saved = {k: v for k, v in sys.modules.items() if k == "llama_cpp" or k.startswith("llama_cpp.")}
    for k in saved:
        del sys.modules[k]
    sys.modules["llama_cpp"] = None  # import llama_cpp now raises ImportError
    try:
        files = {t: export_command(_cfg(), str(root / "model"), str(root / f"{t}.gguf"), t) for t in K_FILES}
    finally:
        del sys.modules["llama_cpp"]
        sys.modules.update(saved)
    return {"model": root / "model", "files": files, "root": root,
            "read": {t: _read_back(path, ("blk.1.ffn_gate.weight", "blk.2.ffn_down.weight"))
                     for t, path in files.items()}}


@pytest.fixture(scope="module")
def f16_k(merged_k):
    """merged_k's model exported to f16 once: the file both requantize and verify start from."""
    from nekotune.commands.export import export_command

    root = merged_k["root"]
    return export_command(_cfg(), str(merged_k["model"]), str(root / "f16.gguf"), "f16")


def _read_back(path, names=()):
    """One pass over a file (reading the 49152-token vocabulary is the slow part): the file type,
    every tensor's type and a digest of its bytes, and the named tensors dequantized."""
    import hashlib

    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return {"file_type": gguf.LlamaFileType(int(reader.fields["general.file_type"].contents())).name,
            "types": {name: t.tensor_type.name for name, t in tensors.items()},
            "digests": {name: hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()
                        for name, t in tensors.items()},
            "data": {n: gguf.quants.dequantize(tensors[n].data, tensors[n].tensor_type) for n in names}}


def _expected_type(name: str, type_name: str) -> str:
    """The rules spelled out for the 8-layer model (tied, 2 query heads per KV head)."""
    if not name.endswith("weight") or "norm" in name:
        return "F32"
    if name == "token_embd.weight":
        return "Q6_K"
    layer = int(name.split(".")[1])
    more = layer in (0, 3, 6, 7)  # use_more_bits(i, 8)
    default = {"q2_k": "Q2_K", "q3_k_m": "Q3_K", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_s": "Q5_K",
               "q5_k_m": "Q5_K", "q6_k": "Q6_K"}[type_name]
    if ".attn_v." in name:
        return {"q2_k": "Q3_K", "q3_k_m": "Q5_K" if layer < 2 else "Q4_K", "q4_k_s": "Q5_K" if layer < 4 else "Q4_K",
                "q4_k_m": "Q6_K" if more else "Q4_K", "q5_k_m": "Q6_K" if more else "Q5_K"}.get(type_name, default)
    if ".ffn_down." in name:
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q4_k_s": "Q5_K" if layer < 1 else "Q4_K",
                "q4_k_m": "Q6_K" if more else "Q4_K", "q5_k_m": "Q6_K" if more else "Q5_K"}.get(type_name, default)
    if ".attn_output." in name:
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K"}.get(type_name, default)
    return default


@pytest.mark.parametrize("type_name", K_FILES)
def test_every_k_type_exports_without_llama_cpp(merged_k, type_name):
    from safetensors.numpy import load_file

    read = merged_k["read"][type_name]
    assert read["file_type"] == f"MOSTLY_{type_name.upper()}"
    assert len(read["types"]) == 2 + 8 * 9
    for name, qtype in read["types"].items():
        assert qtype == _expected_type(name, type_name), name
    original = load_file(next(merged_k["model"].glob("*.safetensors")))["model.layers.2.mlp.down_proj.weight"]
    back = read["data"]["blk.2.ffn_down.weight"].reshape(original.shape)
    bits = int(read["types"]["blk.2.ffn_down.weight"][1])
    assert np.sqrt(np.mean((back - original) ** 2)) < original.std() * 2.0 ** (1 - bits)


def test_imatrix_export(merged_k, tmp_path):
    """--imatrix: the important columns of each matrix come out more precise."""
    import gguf
    from safetensors.numpy import load_file

    from nekotune.commands.export import export_command

    qw = np.full(256, 1e-3, dtype=np.float32)
    qw[::4] = 1.0  # a quarter of every block matters
    path = _gguf_imatrix(tmp_path / "imatrix.gguf", {f"blk.{i}.ffn_gate.weight": qw for i in range(8)},
                         {f"blk.{i}.ffn_gate.weight": 1 for i in range(8)})
    out = export_command(_cfg(), str(merged_k["model"]), str(tmp_path / "im.gguf"), "q2_k", imatrix=str(path))
    original = load_file(next(merged_k["model"].glob("*.safetensors")))["model.layers.1.mlp.gate_proj.weight"]
    plain = merged_k["read"]["q2_k"]["data"]["blk.1.ffn_gate.weight"].reshape(original.shape)
    t = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.1.ffn_gate.weight"]
    weighted = gguf.quants.dequantize(t.data, t.tensor_type).reshape(original.shape)
    errors = [np.mean((back - original)[:, ::4] ** 2) for back in (plain, weighted)]
    assert errors[1] < 0.8 * errors[0], errors


def test_requantize_an_f16_gguf(merged_k, f16_k, tmp_path):
    import gguf

    from nekotune.export.requant import quantize_gguf

    f16 = f16_k
    types = quantize_gguf(f16, tmp_path / "r.gguf", "q4_k_m", threads=2)
    assert types == merged_k["read"]["q4_k_m"]["types"]
    reader = gguf.GGUFReader(tmp_path / "r.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    with pytest.raises(UserError, match="already quantized"):
        quantize_gguf(tmp_path / "r.gguf", tmp_path / "rr.gguf", "q6_k")


@needs_llama_cpp
def test_llama_cpp_picks_the_same_types_and_loads_ours(merged_k):
    """llama.cpp's own quantizer on the f32 export chooses every tensor's type as we do and writes
    the same bytes, and llama.cpp runs our files: logits close to the f32 file's, closer with
    more bits."""
    import llama_cpp

    from nekotune.commands.export import export_command
    from nekotune.export.divergence import llama_logits, open_llama, token_divergence
    from nekotune.export.gguf import quantize_k

    root = merged_k["root"]
    f32 = export_command(_cfg(), str(merged_k["model"]), str(root / "f32.gguf"), "f32")
    ids = list(range(300, 340))
    llm = open_llama(llama_cpp, f32, 64)
    try:
        reference = llama_logits(llm, ids)
    finally:
        llm.close()
    kl = {}
    for type_name, ours in merged_k["files"].items():
        quantize_k(f32, root / f"ref-{type_name}.gguf", type_name)
        theirs = _read_back(root / f"ref-{type_name}.gguf")
        assert merged_k["read"][type_name]["types"] == theirs["types"], type_name
        # and the same bytes in every tensor: llama.cpp's searches, to the last bit
        differ = [n for n, digest in merged_k["read"][type_name]["digests"].items() if theirs["digests"][n] != digest]
        assert not differ, (type_name, differ)
        llm = open_llama(llama_cpp, ours, 64)
        try:
            logits = llama_logits(llm, ids)
        finally:
            llm.close()
        assert np.isfinite(logits).all()
        kl[type_name] = float(token_divergence(reference, logits)[0].mean())
    assert kl["q6_k"] < kl["q4_k_m"] < kl["q2_k"], kl



@needs_llama_cpp
def test_verify_reports_fixed_text_divergence(merged_k, f16_k, tmp_path, capsys):
    """export verify --reference: the fixed text's next-token figures against the f16 file, less
    KL with more bits, printed by the command; a --reference that is not a GGUF is a one-line
    error. (Without --reference, against transformers: test_export's verify test.)"""
    import re

    from nekotune.api import verify
    from nekotune.commands.export import verify_command

    model = str(merged_k["model"])
    f16 = f16_k
    with pytest.raises(UserError, match=r"--reference .*none\.gguf is not a \.gguf file"):
        verify(f16, model, _cfg(), limit=1, reference=tmp_path / "none.gguf")
    q2 = verify(merged_k["files"]["q2_k"], model, _cfg(), limit=1, reference=f16).divergence
    assert q2 is not None and q2.reference == "f16.gguf (llama.cpp)" and q2.positions > 1000
    verify_command(_cfg(), str(merged_k["files"]["q6_k"]), model, limit=1, reference=str(f16))
    out = capsys.readouterr().out
    found = re.search(r"fixed text .* against f16\.gguf \(llama\.cpp\): "
                      r"top-1 agreement ([\d.]+)%, mean KL ([\d.]+)", out)
    assert found, out
    assert float(found.group(1)) / 100 > q2.top1 and 0 < float(found.group(2)) < q2.mean_kl, (found.groups(), q2)

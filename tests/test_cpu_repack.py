"""q4_0 weights to ggml's CPU_REPACK buffer on AMX CPUs (engines/cpu_repack.py, issue 19).

Which tensors are sent matters more than speed here: a tensor CPU_REPACK cannot repack ends the
process in an assertion, so the patterns must name exactly the q4_0 matrices with 8-row groups.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
from engine_fixtures import cfg, needs_llama_cpp

from nekotune.engines.cpu_repack import TensorInfo, override_patterns, repackable, tensor_infos

pytest_plugins = ["engine_fixtures"]


def _write_gguf(path, tensors):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (rows, cols, kind) in tensors.items():
        data = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TENSORS = {  # name: (rows, row length, type)
    "token_embd.weight": (64, 64, "Q8_0"),
    "blk.0.ffn_up.weight": (16, 64, "Q4_0"), "blk.1.ffn_up.weight": (24, 64, "Q4_0"),
    "blk.0.ffn_down.weight": (16, 64, "Q4_0"), "blk.1.ffn_down.weight": (16, 64, "Q8_0"),
    "blk.0.attn_q.weight": (12, 64, "Q4_0"), "blk.1.attn_q.weight": (16, 64, "Q4_0"),
    "output.weight": (32, 64, "Q4_0"),
}


def test_the_header_reader_and_patterns_name_exactly_the_repackable_tensors(tmp_path):
    path = tmp_path / "m.gguf"
    _write_gguf(path, TENSORS)
    infos = tensor_infos(path)
    assert {i.name: (i.dims[1], i.dims[0]) for i in infos} == {n: (r, c) for n, (r, c, _) in TENSORS.items()}
    patterns = override_patterns(infos)
    matched = {i.name for i in infos if any(re.search(p, i.name) for p in patterns)}
    # q8_0 tensors and the 12-row q4_0 matrix stay out; mixed kinds are named one by one
    assert matched == {"blk.0.ffn_up.weight", "blk.1.ffn_up.weight", "blk.0.ffn_down.weight",
                       "blk.1.attn_q.weight", "output.weight"}
    assert r"^blk\.[0-9]+\.ffn_up\.weight$" in patterns and r"^blk\.0\.ffn_down\.weight$" in patterns
    assert not repackable(TensorInfo("x", 2, (64,)))  # a q4_0 vector is not a matrix


def test_an_unreadable_file_means_no_overrides(tmp_path):
    from nekotune.engines.cpu_repack import repack_overrides

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")  # truncated header
    assert repack_overrides(object(), bad) is None


REPACKED = r"""
import sys
import numpy as np
from transformers import AutoTokenizer
import nekotune.engines.llamacpp as lc
from nekotune.generate import GenSettings

tok = AutoTokenizer.from_pretrained(sys.argv[2])
ids = list(range(100, 130))
out = {}
lc.has_amx = lambda lib: True  # the AMX branch on any CPU: extra buffers off, q4_0 to CPU_REPACK by name
for amx in (True, False):  # False: the plain kernels (repack=False), the reference
    options = lc.LlamaCppOptions(n_threads=1, repack=None if amx else False)
    with lc.LlamaCppEngine(sys.argv[1], tok, options=options) as engine:
        if amx:
            assert engine._overrides is not None and "q4_0 weights repacked" in engine.describe(), engine.describe()
        else:
            assert engine._overrides is None and "repacking off" in engine.describe(), engine.describe()
        engine.llm.reset()
        engine.llm.eval(ids)
        p = lc.import_llama_cpp().llama_get_logits_ith(engine.llm.ctx, -1)
        logits = np.ctypeslib.as_array(p, shape=(engine.llm.n_vocab(),)).copy()
        gen = list(engine.generate_ids(ids, GenSettings(max_new_tokens=8, temperature=0.0), []))
        out[amx] = (logits, gen)
a, b = out[True][0], out[False][0]
print(len(out[True][1]), float(np.abs(a - b).max() / (np.abs(b).max() + 1e-9)))
"""


@needs_llama_cpp
def test_repacked_q4_0_loads_decodes_and_computes_the_plain_logits(engine_bases, tmp_path):
    """In a child process, so that an assertion inside ggml fails this test instead of the suite."""
    from nekotune.export.gguf import gguf_file

    base = engine_bases["llama"]
    q4 = gguf_file(cfg(), str(base), str(tmp_path / "q4.gguf"), "q4_0").path
    run = subprocess.run([sys.executable, "-c", REPACKED, str(q4), str(base)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    tokens, rel_diff = run.stdout.strip().splitlines()[-1].split()
    assert int(tokens) == 8
    # the same q4_0 products in another memory layout: equal up to float rounding order
    assert float(rel_diff) < 0.05

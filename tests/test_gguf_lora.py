"""PEFT adapter -> llama.cpp LoRA GGUF (export/gguf_lora.py) and the content-hash cache (export/gguf_cache.py).

These run without llama-cpp-python: they read the written file back with the gguf package and
check names, shapes, the rotary permutation and the scale; tests/test_engines.py checks that
llama.cpp applying the file answers as the merged model does.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from engine_fixtures import make_adapter

from nekotune.errors import UserError

pytest_plugins = ["engine_fixtures"]


def _config(base):
    return json.loads((base / "config.json").read_text())


def _read(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: reader.fields[name].contents() for name in reader.fields if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def _peft_state(adapter):
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def test_lora_gguf_metadata_names_shapes_and_rope_permutation(engine_bases, tmp_path):
    from nekotune.export.gguf import permute_for_rope
    from nekotune.export.gguf_lora import write_lora_gguf

    base = engine_bases["llama"]
    adapter = make_adapter(base, tmp_path / "ad")
    result = write_lora_gguf(adapter, _config(base), tmp_path / "lora.gguf")
    fields, tensors = _read(result.path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == pytest.approx(8.0)
    assert fields["nekotune.written_by"] == "nekotune export gguf-lora" and not result.folded
    assert result.tensors == 2 * 7 and len(tensors) == 2 * 2 * 7  # 2 layers x 7 projections, a and b
    state = _peft_state(adapter)
    prefix = "base_model.model.model.layers.0.self_attn"
    q_a, q_b = state[f"{prefix}.q_proj.lora_A.weight"], state[f"{prefix}.q_proj.lora_B.weight"]
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert tuple(a.shape) == (64, 4) and tuple(b.shape) == (4, 64)  # GGUF ne order: [in, r] and [r, out]
    assert a.tensor_type.name == "F16"
    np.testing.assert_allclose(np.asarray(a.data).reshape(4, 64), q_a.numpy(), rtol=2e-3, atol=1e-3)
    # B's rows follow the base weight's rows into llama.cpp's rotary order; A is unchanged
    stored_b = np.asarray(b.data).reshape(64, 4)
    np.testing.assert_allclose(stored_b, permute_for_rope(q_b, 4).numpy(), rtol=2e-3, atol=1e-3)
    assert not np.allclose(stored_b, q_b.numpy(), rtol=2e-3, atol=1e-3)
    v_b = tensors["blk.1.attn_v.weight.lora_b"]
    np.testing.assert_allclose(np.asarray(v_b.data).reshape(32, 4),
                               state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].numpy(),
                               rtol=2e-3, atol=1e-3)


def test_qwen_gets_no_permutation_and_untied_embeddings_are_transposed(engine_bases, tmp_path):
    from nekotune.export.gguf_lora import write_lora_gguf

    base = engine_bases["qwen2"]  # untied: embedding LoRA is allowed
    adapter = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "embed_tokens"])
    fields, tensors = _read(write_lora_gguf(adapter, _config(base), tmp_path / "q.gguf").path)
    state = _peft_state(adapter)
    q_b = state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_allclose(np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data).reshape(q_b.shape),
                               q_b.numpy(), rtol=2e-3, atol=1e-3)
    emb_a = state["base_model.model.model.embed_tokens.lora_embedding_A"]  # [r, vocab]
    stored = tensors["token_embd.weight.lora_a"]
    assert tuple(stored.shape) == (4, emb_a.shape[1])  # ne [r, vocab]: rows of vocab, looked up by id
    np.testing.assert_allclose(np.asarray(stored.data).reshape(emb_a.shape[1], 4), emb_a.T.numpy(),
                               rtol=2e-3, atol=1e-3)


def test_rslora_and_patterns_fold_each_scale_into_lora_b(engine_bases, tmp_path):
    from nekotune.export.gguf_lora import write_lora_gguf
    from nekotune.weights import Adapter

    base = engine_bases["llama"]
    adapter = make_adapter(base, tmp_path / "ad", r=8, lora_alpha=16, use_rslora=True,
                           rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 32})
    result = write_lora_gguf(adapter, _config(base), tmp_path / "rs.gguf")
    fields, tensors = _read(result.path)
    assert result.folded and fields["adapter.lora.alpha"] == 0.0  # llama.cpp scale = 1: B carries it
    layers = Adapter.load(adapter).layers
    for hf, g, rows in (("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", 64),
                        ("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight", 32)):
        layer = layers[hf]
        assert layer.scaling != pytest.approx(2.0)
        got = np.asarray(tensors[g + ".lora_b"].data).reshape(rows, layer.a.shape[0])
        np.testing.assert_allclose(got, (layer.b * layer.scaling).numpy(), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("arch,lora,needle", [
    ("llama", {"use_dora": True}, "DoRA"),
    ("llama", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ("llama", {"target_modules": ["q_proj", "embed_tokens"]}, "tied embeddings"),
    ("llama", {"target_modules": ["q_proj", "lm_head"]}, "tied embeddings"),
    ("qwen3", {"use_dora": True}, "DoRA"),
])
def test_refusals_are_one_line_and_write_nothing(engine_bases, tmp_path, arch, lora, needle):
    from nekotune.export.gguf_lora import write_lora_gguf

    base = engine_bases[arch]
    adapter = make_adapter(base, tmp_path / "ad", **lora)
    out = tmp_path / "x.gguf"
    with pytest.raises(UserError) as err:
        write_lora_gguf(adapter, _config(base), out)
    message = str(err.value)
    assert needle in message and "merged model" in message and "\n" not in message
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_refuses_pickled_adapters_and_unsupported_architectures(engine_bases, tmp_path):
    from nekotune.export.gguf_lora import write_lora_gguf

    base = engine_bases["llama"]
    adapter = make_adapter(base, tmp_path / "ad")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(UserError, match="safetensors only"):
        write_lora_gguf(adapter, _config(base), tmp_path / "x.gguf")
    with pytest.raises(UserError, match="not supported by the GGUF export"):
        write_lora_gguf(adapter, {**_config(base), "model_type": "gpt2"}, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="not one of"):
        write_lora_gguf(adapter, _config(base), tmp_path / "x.gguf", dtype="q8_0")


def test_cache_builds_once_and_rebuilds_only_on_change(tmp_path, gguf_cache):
    from nekotune.export.gguf_cache import cached_gguf

    src = tmp_path / "weights.bin"
    src.write_bytes(b"one")
    builds = []

    def build(path):
        builds.append(path)
        path.write_bytes(b"GGUF" + src.read_bytes())

    first = cached_gguf("lora", [src], {"dtype": "f16"}, build, slot="a")
    assert first.read_bytes() == b"GGUFone" and first.parent == gguf_cache
    assert cached_gguf("lora", [src], {"dtype": "f16"}, build, slot="a") == first and len(builds) == 1
    os.utime(src, ns=(1, 1))  # touched, same content: hashed again, same key
    assert cached_gguf("lora", [src], {"dtype": "f16"}, build, slot="a") == first and len(builds) == 1
    other = cached_gguf("lora", [src], {"dtype": "f32"}, build, slot="a")  # another conversion: its own entry
    assert other != first and len(builds) == 2
    src.write_bytes(b"two")  # new content: a new entry, and the old one of the same slot goes
    second = cached_gguf("lora", [src], {"dtype": "f16"}, build, slot="a")
    assert second != first and second.read_bytes() == b"GGUFtwo" and len(builds) == 3
    assert not first.exists() and other.exists()  # the stale f16 went, the f32 conversion stays


def test_cache_leaves_nothing_when_the_build_fails(tmp_path, gguf_cache):
    from nekotune.export.gguf_cache import cached_gguf

    src = tmp_path / "w"
    src.write_bytes(b"x")

    def build(path):
        path.write_bytes(b"half")
        raise UserError("refused")

    with pytest.raises(UserError):
        cached_gguf("base", [src], {}, build)
    assert not list(gguf_cache.glob("*.gguf")) and not list(gguf_cache.glob(".*.tmp"))


def test_cached_lora_gguf_is_reused(engine_bases, tmp_path, gguf_cache):
    from nekotune.export.gguf_lora import cached_lora_gguf

    base = engine_bases["llama"]
    adapter = make_adapter(base, tmp_path / "ad")
    first = cached_lora_gguf(adapter, base)
    mtime = first.stat().st_mtime_ns
    assert cached_lora_gguf(adapter, base) == first and first.stat().st_mtime_ns == mtime
    with torch.no_grad():
        from safetensors.torch import load_file, save_file

        state = load_file(str(adapter / "adapter_model.safetensors"))
        save_file({k: v + 1 for k, v in state.items()}, str(adapter / "adapter_model.safetensors"))
    assert cached_lora_gguf(adapter, base) != first


def test_export_lora_command_checks_model_and_output(engine_bases, tmp_path):
    from engine_fixtures import cfg

    from nekotune.export.gguf_lora import export_lora

    base = engine_bases["llama"]
    adapter = make_adapter(base, tmp_path / "ad")
    out = tmp_path / "neko-lora.gguf"
    result = export_lora(cfg(), str(adapter), out)
    assert result.path == out and _read(out)[0]["general.name"] == "ad"
    assert export_lora(cfg(), str(adapter), out).path == out  # its own earlier output may be replaced
    foreign = tmp_path / "other.gguf"
    foreign.write_bytes(b"not ours")
    for model, target, needle in ((str(adapter), foreign, "not written by nekotune"),
                                  (str(base), tmp_path / "x.gguf", "holds no LoRA adapter"),
                                  (str(adapter), tmp_path / "x.bin", "should name a .gguf file"),
                                  (str(adapter), adapter / "inside.gguf", "inside")):
        with pytest.raises(UserError, match=needle):
            export_lora(cfg(), model, target)
    assert foreign.read_bytes() == b"not ours"


def test_ollama_adapter_support_follows_its_runner():
    from nekotune.export.gguf_lora import ollama_takes_adapter

    assert ollama_takes_adapter("llama") and ollama_takes_adapter("qwen2")
    assert not ollama_takes_adapter("qwen3")

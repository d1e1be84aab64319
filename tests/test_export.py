"""Merge, GGUF, Ollama and verify on tiny models of the real architectures.

Adapters are made with peft directly (random non-zero B, so merging changes the weights); one
test trains a real run to check the run-directory path end to end.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from nekotune.config import load_config
from nekotune.data.render import FALLBACK_TEMPLATE, Renderer
from nekotune.errors import UserError

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
IDS = torch.tensor([[1, 5, 300, 42, 7, 99, 1234, 17]])


def _cfg(*overrides):
    return load_config(None, list(overrides), default_to_demo=False)


def _sharded(src, dst):
    """The tiny model re-saved in many small shards, as big models come."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _adapter(base, out, perturb_saved=False, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    peft_model = get_peft_model(model, LoraConfig(**options))
    if perturb_saved:  # make a modules_to_save copy differ from the weights it replaces
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "modules_to_save" in name:
                    param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(out)
    return out


def _peft_reference(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    with torch.no_grad():
        logits = tuned(IDS).logits
    return tuned.merge_and_unload().state_dict(), logits


@pytest.fixture(scope="module")
def bases(tiny_llama, tiny_qwen3, tiny_qwen2, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return {arch: _sharded(src, root / arch) for arch, src in
            (("llama", tiny_llama), ("qwen3", tiny_qwen3), ("qwen2", tiny_qwen2))}


@pytest.fixture(scope="module")
def llama_adapter(bases, tmp_path_factory):
    return _adapter(bases["llama"], tmp_path_factory.mktemp("adapters") / "llama")


@pytest.fixture(scope="module")
def merged_llama(bases, llama_adapter, tmp_path_factory):
    from nekotune.commands.export import merge_command

    return merge_command(_cfg(), str(llama_adapter), str(tmp_path_factory.mktemp("merged") / "llama"))


# -- merge -----------------------------------------------------------------------------------
VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "dora": {"use_dora": True},
    "alpha_pattern": {"alpha_pattern": {"q_proj": 32}},
    "head_saved": {"modules_to_save": ["lm_head"], "perturb_saved": True},
    "embed_saved": {"modules_to_save": ["embed_tokens"], "perturb_saved": True},
}


@pytest.mark.parametrize("arch,variant", [("llama", v) for v in VARIANTS] + [("qwen3", "lora"), ("qwen2", "lora"),
                                                                             ("qwen3", "dora")])
def test_merge_equals_peft_merge_and_unload(bases, tmp_path, arch, variant):
    from transformers import AutoModelForCausalLM

    from nekotune.commands.export import merge_command

    adapter = _adapter(bases[arch], tmp_path / "adapter", **VARIANTS[variant])
    expected, peft_logits = _peft_reference(bases[arch], adapter)
    for low_memory in (False, True):
        out = merge_command(_cfg(), str(adapter), str(tmp_path / f"merged-{low_memory}"), low_memory=low_memory)
        merged = AutoModelForCausalLM.from_pretrained(out)
        state = merged.state_dict()
        worst = max((state[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-5, (variant, low_memory, worst)
        with torch.no_grad():
            assert (merged(IDS).logits - peft_logits).abs().max().item() < 1e-4


def test_merge_keeps_layout_and_writes_a_standalone_model(bases, llama_adapter, tmp_path):
    from safetensors import safe_open

    from nekotune.commands.export import merge_command
    from nekotune.weights import MERGE_INFO

    outs = [merge_command(_cfg(), str(llama_adapter), str(tmp_path / f"m{low}"), low_memory=low)
            for low in (False, True)]
    base_files = sorted(p.name for p in bases["llama"].glob("*.safetensors"))
    assert len(base_files) > 3
    for out in outs:
        assert sorted(p.name for p in out.glob("*.safetensors")) == base_files
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == json.loads((bases["llama"] / "model.safetensors.index.json").read_text())[
            "weight_map"]
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja", MERGE_INFO):
            assert (out / name).is_file(), name
    for name in base_files:  # both modes write the same bytes
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    with safe_open(outs[1] / base_files[0], framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}


def test_merge_output_dtype(bases, llama_adapter, tmp_path):
    from safetensors import safe_open

    from nekotune.commands.export import merge_command

    out = merge_command(_cfg(), str(llama_adapter), str(tmp_path / "bf16"), low_memory=True, dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as fh:
            assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}


def test_merge_refuses_bad_requests(bases, llama_adapter, tmp_path):
    from nekotune.commands.export import merge_command

    with pytest.raises(UserError, match="no adapter to merge"):
        merge_command(_cfg(), str(bases["llama"]), str(tmp_path / "x"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier `nekotune merge` output"):
        merge_command(_cfg(), str(llama_adapter), str(occupied))
    assert (occupied / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="which this command reads"):
        merge_command(_cfg(), str(llama_adapter), str(llama_adapter))
    with pytest.raises(UserError, match="inside .*which this command reads"):
        merge_command(_cfg(), str(llama_adapter), str(bases["llama"] / "merged"))


def test_low_memory_refuses_what_only_peft_merges(bases, tmp_path):
    from nekotune.commands.export import merge_command

    adapter = _adapter(bases["qwen2"], tmp_path / "bias", lora_bias=True, target_modules=["q_proj", "v_proj"])
    with pytest.raises(UserError, match="lora_bias.*without --low-memory"):
        merge_command(_cfg(), str(adapter), str(tmp_path / "out"), low_memory=True)
    merge_command(_cfg(), str(adapter), str(tmp_path / "out2"))  # the default mode merges it


def test_merge_of_a_trained_run_keeps_its_prompt_settings(tiny_llama, qa_file, tmp_path):
    from nekotune.commands.export import merge_command, ollama_command
    from nekotune.weights import merge_info
    from nekotune.training import train

    run = train(_cfg(*tiny_overrides(tiny_llama, qa_file, tmp_path / "run",
                                     **{"data.system_prompt": "'You are a cat.'", "train.max_steps": 2})),
                show_progress=False)
    merged = merge_command(_cfg(), str(run), str(tmp_path / "merged"), low_memory=True)
    assert merge_info(merged)["system_prompt"] == "You are a cat."
    modelfile = (ollama_command(_cfg(), str(merged), str(tmp_path / "ollama"), "q8_0") / "Modelfile").read_text()
    assert 'SYSTEM """You are a cat."""' in modelfile


# -- GGUF ------------------------------------------------------------------------------------
REQUIRED_KEYS = ["general.architecture", "general.file_type", "general.quantization_version", "{a}.context_length",
                 "{a}.embedding_length", "{a}.block_count", "{a}.feed_forward_length", "{a}.attention.head_count",
                 "{a}.attention.head_count_kv", "{a}.rope.freq_base", "{a}.attention.layer_norm_rms_epsilon",
                 "{a}.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                 "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                 "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.add_bos_token",
                 "tokenizer.chat_template"]


def _expected_tensors(arch, config):
    names = {"token_embd.weight": (config["vocab_size"], 64), "output_norm.weight": (64,)}
    if not config.get("tie_word_embeddings", False):
        names["output.weight"] = (config["vocab_size"], 64)
    kv = 2 * (config.get("head_dim") or 16)
    for b in range(2):
        names.update({f"blk.{b}.attn_norm.weight": (64,), f"blk.{b}.ffn_norm.weight": (64,),
                      f"blk.{b}.attn_q.weight": (64, 64), f"blk.{b}.attn_k.weight": (kv, 64),
                      f"blk.{b}.attn_v.weight": (kv, 64), f"blk.{b}.attn_output.weight": (64, 64),
                      f"blk.{b}.ffn_gate.weight": (128, 64), f"blk.{b}.ffn_up.weight": (128, 64),
                      f"blk.{b}.ffn_down.weight": (64, 128)})
        if arch == "qwen2":
            names.update({f"blk.{b}.attn_{x}.bias": (64 if x == "q" else kv,) for x in "qkv"})
        if arch == "qwen3":
            names.update({f"blk.{b}.attn_q_norm.weight": (16,), f"blk.{b}.attn_k_norm.weight": (16,)})
    return names


@pytest.mark.parametrize("arch,gtype", [("llama", "q8_0"), ("qwen3", "f16"), ("qwen2", "q4_0")])
def test_gguf_reads_back_complete(bases, tmp_path, arch, gtype):
    import gguf

    from nekotune.commands.export import export_command

    adapter = _adapter(bases[arch], tmp_path / "adapter")
    out = export_command(_cfg(), str(adapter), str(tmp_path / "m.gguf"), gtype)
    reader = gguf.GGUFReader(out)
    config = json.loads((bases[arch] / "config.json").read_text())
    expected = _expected_tensors(arch, config)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected)
    quant = gguf.GGMLQuantizationType[gtype.upper()]
    for name, shape in expected.items():
        tensor = got[name]
        assert tuple(int(x) for x in reversed(tensor.shape)) == shape, name  # GGUF lists dims innermost first
        want = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else quant
        if gtype == "q4_0" and name in ("output.weight", "token_embd.weight") and "output.weight" not in got:
            want = gguf.GGMLQuantizationType.Q8_0
        if gtype == "q4_0" and name == "output.weight":
            want = gguf.GGMLQuantizationType.Q8_0
        if gtype == "q8_0" and (name == "output.weight" or (name == "token_embd.weight" and "output.weight" not in got)):
            want = gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == want, (name, tensor.tensor_type)
    for key in REQUIRED_KEYS:
        assert key.format(a=gguf.MODEL_ARCH_NAMES[_arch(arch)]) in reader.fields, key
    fields = reader.fields
    assert fields["general.architecture"].contents() == arch
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    # transformers gives a qwen2 model its Qwen2 split rules even with SmolLM2's vocabulary
    assert fields["tokenizer.ggml.pre"].contents() == ("qwen2" if arch == "qwen2" else "smollm")
    assert len(fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    assert fields["tokenizer.ggml.eot_token_id"].contents() == 2  # <|im_end|>
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    if arch == "qwen3":
        assert fields["qwen3.attention.key_length"].contents() == 16
        assert "<think>" in fields["tokenizer.chat_template"].contents()


def _arch(name):
    import gguf

    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)


def test_q8_0_dequantizes_close_to_the_merged_weights(merged_llama, tmp_path):
    import gguf
    from safetensors.torch import load_file

    from nekotune.commands.export import export_command
    from nekotune.export.gguf import permute_for_rope

    out = export_command(_cfg(), str(merged_llama), str(tmp_path / "q8.gguf"), "q8_0")
    state = {}
    for shard in merged_llama.glob("*.safetensors"):
        state.update(load_file(shard))
    by_gguf = {"blk.0.attn_q.weight": permute_for_rope(state["model.layers.0.self_attn.q_proj.weight"], 4),
               "blk.0.attn_k.weight": permute_for_rope(state["model.layers.0.self_attn.k_proj.weight"], 2),
               "blk.1.ffn_down.weight": state["model.layers.1.mlp.down_proj.weight"]}
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    embedding = tensors["token_embd.weight"]  # tied: the output matrix, kept f16
    assert embedding.tensor_type == gguf.GGMLQuantizationType.F16
    assert np.allclose(np.asarray(embedding.data, dtype=np.float32).reshape(state["model.embed_tokens.weight"].shape),
                       state["model.embed_tokens.weight"].half().float().numpy())
    for name, original in by_gguf.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        restored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(original.shape)
        scale = original.abs().max().item()
        assert np.abs(restored - original.numpy()).max() <= scale / 127 + 1e-6, name


def test_tensor_type_fallbacks():
    from gguf import GGMLQuantizationType as Q

    from nekotune.export.gguf import tensor_type

    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0", True) == Q.F32
    assert tensor_type("blk.0.ffn_down.weight", (64, 100), "q8_0", True) == Q.F16  # 100 is not a multiple of 32
    assert tensor_type("blk.0.ffn_down.weight", (64, 128), "q5_1", True) == Q.Q5_1
    assert tensor_type("output.weight", (500, 64), "q4_0", True) == Q.Q8_0
    assert tensor_type("token_embd.weight", (500, 64), "q4_0", False) == Q.Q8_0  # tied: it is the output too
    assert tensor_type("token_embd.weight", (500, 64), "q4_0", True) == Q.Q4_0
    assert tensor_type("output.weight", (500, 64), "q8_0", True) == Q.F16
    assert tensor_type("token_embd.weight", (500, 64), "q8_0", False) == Q.F16  # tied
    assert tensor_type("token_embd.weight", (500, 64), "q8_0", True) == Q.Q8_0
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "bf16", True) == Q.BF16


def test_f32_gguf_loads_in_transformers_with_the_same_logits(bases, llama_adapter, tmp_path):
    """Catches a wrong Q/K permutation: transformers un-permutes what llama.cpp expects."""
    from transformers import AutoModelForCausalLM

    from nekotune.commands.export import export_command

    out = export_command(_cfg(), str(llama_adapter), str(tmp_path / "f32.gguf"), "f32")
    _, peft_logits = _peft_reference(bases["llama"], llama_adapter)
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    with torch.no_grad():
        assert (loaded(IDS).logits - peft_logits).abs().max().item() < 1e-4


def test_unsupported_architecture_is_a_user_error(tiny_llama, tmp_path):
    from nekotune.commands.export import export_command

    model = shutil.copytree(tiny_llama, tmp_path / "odd")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gemma", architectures=["GemmaForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model_type gemma .*supported: llama .*qwen2.*qwen3"):
        export_command(_cfg(), str(model), str(tmp_path / "x.gguf"), "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_gguf_and_errors(merged_llama, tmp_path, capsys):
    from nekotune.cli import main

    assert main(["export", "gguf", "--model", str(merged_llama), "--type", "f16", "--out",
                 str(tmp_path / "cli.gguf")]) == 0
    assert "MB" in capsys.readouterr().err
    rc = main(["export", "gguf", "--model", str(merged_llama), "--out", str(tmp_path / "model.bin")])
    err = capsys.readouterr().err
    assert rc == 2 and ".gguf" in err and len(err.strip().splitlines()) == 1


def test_q4_k_m_on_rows_below_256_takes_llama_cpps_fallbacks(merged_llama, tmp_path):
    """Hidden 64: no row fills a 256 super-block, so Q4_K becomes Q5_0 and Q6_K becomes Q8_0 (the
    K-quant rules themselves are tested in test_kquants.py)."""
    import gguf

    from nekotune.commands.export import export_command
    from nekotune.export.verify import gguf_file_type

    out = export_command(_cfg(), str(merged_llama), str(tmp_path / "k.gguf"), "q4_k_m")
    assert gguf_file_type(out) == "MOSTLY_Q4_K_M"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert len(types) == 20
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output matrix, Q6_K's fallback
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q5_0"
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"  # last eighth: Q6_K
    assert types["blk.1.attn_q.weight"] == "Q5_0" and types["blk.1.attn_norm.weight"] == "F32"


# -- Ollama ----------------------------------------------------------------------------------
CHATML_TEMPLATE = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}'''

TWO_TURNS = [{"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": "A cat, nya~"},
             {"role": "user", "content": "What do cats eat?"}]


def _go_equals_jinja(parts, renderer, messages, strip=""):
    from nekotune.export.gotemplate import render_go_template
    from nekotune.export.ollama import ollama_data

    go = render_go_template(parts.template, ollama_data(messages, parts.system))
    if renderer.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": renderer.system_prompt}] + messages
    jinja = renderer.render(messages, add_generation_prompt=True)
    return go, jinja[len(strip):] if strip and jinja.startswith(strip) else jinja


def test_modelfile_chatml_smollm2(smol_tokenizer):
    from nekotune.export.ollama import modelfile_parts

    renderer = Renderer(smol_tokenizer)
    parts = modelfile_parts(renderer, runtime_adds_bos=False)
    assert parts.warning is None
    assert parts.template == CHATML_TEMPLATE
    assert parts.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert parts.stops == ["<|im_end|>"]
    go, jinja = _go_equals_jinja(parts, renderer, TWO_TURNS)
    assert go == jinja and jinja.count("<|im_start|>") == 5
    go, jinja = _go_equals_jinja(parts, renderer, [{"role": "system", "content": "Be brief."}] + TWO_TURNS)
    assert go == jinja and "Be brief." in go and "SmolLM" not in go


def test_modelfile_qwen3_keeps_the_empty_think_block(qwen3_tokenizer):
    from nekotune.export.ollama import modelfile_parts

    renderer = Renderer(qwen3_tokenizer, enable_thinking=False, system_prompt="You are a cat.")
    parts = modelfile_parts(renderer, runtime_adds_bos=False)
    assert parts.warning is None and parts.system == "You are a cat."
    assert parts.template.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n{{ end }}\n{{- end }}")
    go, jinja = _go_equals_jinja(parts, renderer, TWO_TURNS)
    assert go == jinja and go.endswith("<think>\n\n</think>\n\n") and go.startswith("<|im_start|>system\nYou are a cat.")
    thinking = modelfile_parts(Renderer(qwen3_tokenizer), runtime_adds_bos=False)
    assert thinking.warning is None and "<think>" not in thinking.template and thinking.system is None


def test_modelfile_llama3(llama3_tokenizer):
    from nekotune.export.ollama import modelfile_parts

    renderer = Renderer(llama3_tokenizer, system_prompt="You are a cat.")
    parts = modelfile_parts(renderer, runtime_adds_bos=False)
    assert parts.warning is None
    assert parts.template.startswith("<|begin_of_text|>{{- if .System }}<|start_header_id|>system")
    assert "<|eot_id|>" in parts.stops
    go, jinja = _go_equals_jinja(parts, renderer, TWO_TURNS)
    assert go == jinja and go.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # where the runtime adds BOS itself (real Llama 3), the template must not write it again
    runtime_bos = modelfile_parts(renderer, runtime_adds_bos=True)
    assert runtime_bos.warning is None and not runtime_bos.template.startswith("<|begin_of_text|>")
    go, jinja = _go_equals_jinja(runtime_bos, renderer, TWO_TURNS, strip="<|begin_of_text|>")
    assert go == jinja


def test_unknown_template_is_best_effort(smol_tokenizer):
    from nekotune.export.ollama import modelfile_parts

    parts = modelfile_parts(Renderer(smol_tokenizer, chat_template=FALLBACK_TEMPLATE), runtime_adds_bos=False)
    assert parts.template is None and "none of ChatML" in parts.warning


def test_go_template_subset():
    from nekotune.export.gotemplate import GoTemplateError, render_go_template

    data = {"System": "", "Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    template = ('{{ if .System }}S{{ else if eq (len .Messages) 2 }}two{{ else }}other{{ end }} \n'
                '{{- range $i, $m := .Messages }}[{{ $i }}:{{ $m.Role }}={{ .Content }}]{{ end }}  {{- "x" -}}  !')
    assert render_go_template(template, data) == "two[0:user=a][1:assistant=b]x!"
    assert render_go_template('{{ if and .System (not .Messages) }}y{{ else }}n{{ end }}', data) == "n"
    assert render_go_template('{{ range .Messages }}{{ if ne .Role "user" }}{{ .Content }}{{ end }}{{ end }}',
                              data) == "b"
    with pytest.raises(GoTemplateError):
        render_go_template("{{ if .System }}open", data)


def test_ollama_directory(merged_llama, tmp_path, capsys):
    from nekotune.commands.export import ollama_command

    cfg = _cfg("generate.temperature=0.3", "generate.top_k=20")
    out = ollama_command(cfg, str(merged_llama), str(tmp_path / "ollama"), "q4_0")
    modelfile = (out / "Modelfile").read_text()
    gguf_name = modelfile.splitlines()[0].removeprefix("FROM ./")
    assert (out / gguf_name).is_file() and gguf_name.endswith("-q4_0.gguf")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "PARAMETER temperature 0.3" in modelfile and "PARAMETER top_k 20" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    assert f"ollama create llama -f {out / 'Modelfile'}" in capsys.readouterr().err


# -- verify ----------------------------------------------------------------------------------
def test_verify_without_llama_cpp_says_how_to_install(monkeypatch, tmp_path):
    from nekotune.commands.export import verify_command
    from nekotune.export import verify

    real = importlib.util.find_spec
    monkeypatch.setattr(verify.importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real(name))
    with pytest.raises(UserError, match=r"pip install 'nekotune\[verify\]'"):
        verify_command(_cfg(), str(tmp_path / "x.gguf"), None)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'nekotune[verify]')")
def test_llama_cpp_runs_the_export_like_transformers(bases, llama_adapter, merged_llama, tmp_path):
    import llama_cpp
    from transformers import AutoTokenizer

    from nekotune.commands.export import export_command
    from nekotune.commands.export import verify_command

    out = export_command(_cfg(), str(llama_adapter), str(tmp_path / "f16.gguf"), "f16")
    tokenizer = AutoTokenizer.from_pretrained(merged_llama)
    renderer = Renderer(tokenizer)
    text = renderer.render(TWO_TURNS + [{"role": "assistant", "content": "Fish 🐟 and 3333 treats, 喵~"}], False)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        llm.eval(IDS[0].tolist())
        _, peft_logits = _peft_reference(bases["llama"], llama_adapter)
        assert np.abs(np.array(llm.scores[:IDS.shape[1]]) - peft_logits[0].numpy()).max() < 1e-2
    finally:
        llm.close()
    assert verify_command(_cfg(), str(out), str(merged_llama), limit=3) == 0


def _tiny_variant(kind, tokenizer, path):
    """Tiny models whose attention is sharp enough that a wrong rotary layout shows in the logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = {
        "llama3-rope": lambda: LlamaConfig(tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}, **common),
        "mistral": lambda: MistralConfig(sliding_window=None, **common),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(head_dim=16, tie_word_embeddings=True, **common),
    }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'nekotune[verify]')")
@pytest.mark.parametrize("kind", ["llama3-rope", "mistral", "qwen2", "qwen3"])
def test_llama_cpp_logits_match_transformers(smol_tokenizer, tmp_path, kind):
    """Rotary layout (permuted for Llama/Mistral, NEOX for Qwen), Qwen3's q/k norms, Qwen2's biases
    and Llama 3.1's frequency factors, all checked by llama.cpp itself."""
    import llama_cpp

    from nekotune.commands.export import export_command

    model = _tiny_variant(kind, smol_tokenizer, tmp_path / kind)
    out = export_command(_cfg(), str(tmp_path / kind), str(tmp_path / f"{kind}.gguf"), "f32")
    ids = list(range(100, 160))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        assert np.abs(np.array(llm.scores[:len(ids)]) - expected).max() < 5e-3
    finally:
        llm.close()

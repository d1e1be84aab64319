"""Inference engines (issue 19): the registry's auto rule, and the llama.cpp engine against transformers.

Every engine gets Renderer.prompt_ids and the Renderer's stop ids. On the same weights greedy
answers must be equal token for token: the transformers reference runs on the weights the f16
GGUF holds (2-D weights rounded to fp16, as the export writes them), so the comparison is
between engines, not precisions. The llama.cpp parts skip when llama-cpp-python is absent (CI).
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from engine_fixtures import HAS_LLAMA_CPP, cfg, make_adapter, needs_llama_cpp

from nekotune.errors import UserError
from nekotune.generate import GenSettings

pytest_plugins = ["engine_fixtures"]

GREEDY = GenSettings(max_new_tokens=20, temperature=0.0, repetition_penalty=1.0)


# -- the registry ------------------------------------------------------------------------------
def test_auto_picks_llamacpp_on_cpus_and_apple_silicon_only_when_installed(monkeypatch):
    from nekotune.engines import choose

    monkeypatch.setattr(choose, "_llama_cpp_missing", lambda: None)
    assert choose.pick_engine("auto", "cpu").name == "llama.cpp"
    monkeypatch.setattr(choose, "apple_silicon", lambda: True)
    assert choose.pick_engine("auto", "mps").name == "llama.cpp"
    assert choose.pick_engine("auto", "cuda").name == "transformers"
    refused = choose.pick_engine("auto", "cpu", llamacpp_refusal="model_type gpt2 has no GGUF export")
    assert refused.name == "transformers" and "gpt2" in refused.reason
    monkeypatch.setattr(choose, "_llama_cpp_missing", lambda: "llama-cpp-python is not installed")
    choice = choose.pick_engine("auto", "cpu")
    assert choice.name == "transformers" and "nekotune[llamacpp]" in choice.reason


def test_explicit_engine_choices_and_refusals(monkeypatch):
    from nekotune.engines import choose

    from nekotune.registry import ENGINE_CHOICES, ENGINES

    assert choose.CHOICES == ENGINE_CHOICES == ("auto", "transformers", "llama.cpp", "vllm")
    assert ENGINES["vllm"].serve_only and ENGINES["llama.cpp"].python_module == "llama_cpp"
    assert choose.pick_engine("transformers", "cpu").name == "transformers"
    for requested, needle in (("tensorrt", "not one of"), ("vllm", "serves only")):
        with pytest.raises(UserError, match=needle):
            choose.pick_engine(requested, "cuda")
    monkeypatch.setattr(choose, "_llama_cpp_missing", lambda: "llama-cpp-python is not installed")
    with pytest.raises(UserError, match="nekotune\\[llamacpp\\]"):
        choose.pick_engine("llama.cpp", "cpu")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("NEKOTUNE_VLLM", raising=False)
    with pytest.raises(UserError, match="no `vllm` executable"):
        choose.pick_engine("vllm", "cuda", serving=True)


def test_llamacpp_refusal_reasons():
    from nekotune.engines.choose import llamacpp_refusal

    assert llamacpp_refusal({"model_type": "llama"}) is None
    assert "gpt2" in llamacpp_refusal({"model_type": "gpt2"})
    assert "remote code" in llamacpp_refusal({"model_type": "llama"}, trust_remote_code=True)
    assert "bitsandbytes" in llamacpp_refusal({"model_type": "llama"}, quantization="4bit")
    assert "IA3" in llamacpp_refusal({"model_type": "llama"}, {"peft_type": "IA3"})


def test_detokenizer_pieces_add_up_to_the_decoded_text(smol_tokenizer):
    from nekotune.engines.base import Detokenizer

    text = "Nya~ 猫は可愛い! 🐱 ok"
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(smol_tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# -- llama.cpp against transformers -----------------------------------------------------------
def _f16_weights(model, only_lora: bool = False):
    """Round 2-D weights to fp16 (what an f16 GGUF holds); vectors stay fp32, as the export writes them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and (not only_lora or "lora_" in name):
                param.copy_(param.half().float())
    return model.eval()


def _plain(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def _hf(base, adapters=()):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for i, path in enumerate(adapters):
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=f"a{i}")
        else:
            model.load_adapter(path, adapter_name=f"a{i}")
    return model.eval()


@pytest.fixture(scope="module")
def built(engine_bases, tmp_path_factory):
    """f16 base GGUFs, two adapters per architecture and their LoRA GGUFs."""
    if not HAS_LLAMA_CPP:
        pytest.skip("llama-cpp-python is not installed")
    import json

    from nekotune.export.gguf import gguf_file
    from nekotune.export.gguf_lora import write_lora_gguf

    root = tmp_path_factory.mktemp("engines")
    out = {}
    for arch, base in engine_bases.items():
        config = json.loads((base / "config.json").read_text())
        extra = {"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]} if arch == "qwen2" else {}
        ads = [make_adapter(base, root / f"{arch}-ad{i}", seed=i + 1, std=0.1, **extra) for i in range(2)]
        loras = [write_lora_gguf(a, config, root / f"{arch}-lora{i}.gguf").path for i, a in enumerate(ads)]
        gguf = gguf_file(cfg(), str(base), str(root / f"{arch}-f16.gguf"), "f16").path
        f32 = gguf_file(cfg(), str(base), str(root / f"{arch}-f32.gguf"), "f32").path
        out[arch] = {"base": base, "gguf": gguf, "f32": f32, "adapters": ads, "loras": loras}
    return out


def _llama(path, tokenizer, adapters=None, **options):
    from nekotune.engines.llamacpp import LlamaCppEngine, LlamaCppOptions

    return LlamaCppEngine(path, tokenizer, adapters, LlamaCppOptions(n_threads=1, **options))


@needs_llama_cpp
@pytest.mark.parametrize("settings", [GREEDY, GenSettings(max_new_tokens=20, temperature=0.0, repetition_penalty=1.3),
                                      GenSettings(max_new_tokens=20, temperature=0.7, top_k=1, seed=3,
                                                  repetition_penalty=1.2)],
                         ids=["greedy", "repetition-penalty", "top-k-1-sampling"])
def test_f16_llamacpp_answers_equal_transformers(built, renderer, prompts, settings):
    from nekotune.engines.transformers import TransformersEngine

    item = built["llama"]
    hf = TransformersEngine(_f16_weights(_plain(item["base"])), renderer.tokenizer).generate_batch(
        prompts, settings, renderer.stop_token_ids, batch_size=1)
    with _llama(item["gguf"], renderer.tokenizer) as engine:
        lc = engine.generate_batch(prompts, settings, renderer.stop_token_ids)
    assert lc == hf
    assert all(len(a) > 20 for a in lc)  # real answers, not empty strings that would agree anyway
    if settings.repetition_penalty != 1.0:  # the penalty changed them: it ran over the prompt too
        with _llama(item["gguf"], renderer.tokenizer) as engine:
            plain = engine.generate_batch(prompts, GREEDY, renderer.stop_token_ids)
        assert plain != lc


@needs_llama_cpp
def test_both_engines_receive_the_renderer_prompt_ids(built, renderer, prompts):
    from nekotune.engines.transformers import TransformersEngine

    item = built["llama"]
    prompt = prompts[1]
    seen = []
    model = _plain(item["base"])
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()),
                                             with_kwargs=True)
    TransformersEngine(model, renderer.tokenizer).generate_batch([prompt], GREEDY, renderer.stop_token_ids)
    handle.remove()
    assert seen[0] == prompt
    with _llama(item["gguf"], renderer.tokenizer) as engine:
        list(engine.generate_ids(prompt, GREEDY, renderer.stop_token_ids))
        assert engine.llm.input_ids[:len(prompt)].tolist() == prompt
        # llama.cpp's own tokenizer agrees, so a server that gets text (llama_cpp.server) sees the same prompt
        text = renderer.tokenizer.decode(prompt)
        assert engine.llm.tokenize(text.encode(), add_bos=False, special=True) == prompt


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama-rslora"])
def test_lora_gguf_on_llamacpp_answers_as_the_merged_model(built, renderer, prompts, arch, tmp_path):
    """f32 base + f32 LoRA GGUF on llama.cpp = transformers' merged model (merge_and_unload), and
    f16 base + f16 LoRA = the adapter on transformers over the same fp16 weights. (f16 base + LoRA
    and an f16 merged file differ by where fp16 rounding happens, so near-ties may part them.)
    qwen2 carries embedding LoRA (untied); llama-rslora has folded rsLoRA/rank/alpha-pattern scales."""
    import json

    from nekotune.engines.transformers import TransformersEngine
    from nekotune.export.gguf_lora import write_lora_gguf

    item = built[arch.split("-")[0]]
    adapter, lora = item["adapters"][0], item["loras"][0]
    config = json.loads((item["base"] / "config.json").read_text())
    if arch == "llama-rslora":
        adapter = make_adapter(item["base"], tmp_path / "rs", r=8, lora_alpha=16, use_rslora=True, std=0.1,
                               rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 32})
        lora = write_lora_gguf(adapter, config, tmp_path / "rs.gguf").path
    lora32 = write_lora_gguf(adapter, config, tmp_path / "lora32.gguf", dtype="f32").path
    merged = TransformersEngine(_hf(item["base"], [adapter]).merge_and_unload().eval(), renderer.tokenizer)
    want = merged.generate_batch(prompts, GREEDY, renderer.stop_token_ids, batch_size=1)
    with _llama(item["f32"], renderer.tokenizer, {"neko": lora32}) as engine:
        got = engine.generate_batch(prompts, GREEDY, renderer.stop_token_ids, adapter="neko")
        base = engine.generate_batch(prompts, GREEDY, renderer.stop_token_ids)
    assert got == want
    assert sum(a != b for a, b in zip(got, base, strict=True)) >= len(prompts) - 1  # the adapter changes the answers
    if arch == "llama-rslora":
        return  # f32 above checks the folded scales exactly; f16 activation rounding parts near-ties here
    hf16 = TransformersEngine(_f16_weights(_hf(item["base"], [adapter])), renderer.tokenizer, {"neko": "a0"})
    want16 = hf16.generate_batch(prompts, GREEDY, renderer.stop_token_ids, adapter="neko", batch_size=1)
    with _llama(item["gguf"], renderer.tokenizer, {"neko": lora}) as engine:
        assert engine.generate_batch(prompts, GREEDY, renderer.stop_token_ids, adapter="neko") == want16


@needs_llama_cpp
def test_adapters_switch_per_request_on_one_loaded_model(built, renderer, prompts):
    item = built["llama"]
    loras = dict(zip(("a", "b"), item["loras"], strict=True))
    fresh = {}
    for name in (None, "a", "b"):
        with _llama(item["gguf"], renderer.tokenizer, {name: loras[name]} if name else None) as engine:
            fresh[name] = [engine.generate_batch([p], GREEDY, renderer.stop_token_ids, adapter=name)[0]
                           for p in prompts[:2]]
    assert len({tuple(v) for v in fresh.values()}) == 3  # base, a and b all answer differently
    with _llama(item["gguf"], renderer.tokenizer, loras) as engine:
        assert engine.adapters == ["a", "b"]
        for name in ("a", None, "b", "a", "b", None):
            for i, p in enumerate(prompts[:2]):
                assert engine.generate_batch([p], GREEDY, renderer.stop_token_ids, adapter=name)[0] == fresh[name][i]
        with pytest.raises(UserError, match="not loaded"):
            engine.generate_batch(prompts[:1], GREEDY, renderer.stop_token_ids, adapter="c")


@needs_llama_cpp
def test_prompt_prefix_reuse_keeps_the_answers_of_a_cold_start(built, renderer, prompts):
    """A chat's next turn, and prompts that share the system prompt, reuse the cached prefix."""
    from nekotune.data.formats import Conversation, Turn

    item, stop = built["llama"], renderer.stop_token_ids
    with _llama(item["gguf"], renderer.tokenizer, reuse_prefix=False) as cold:
        first = cold.generate_batch(prompts[:1], GREEDY, stop)[0]
        turn2 = renderer.prompt_ids(Conversation(turns=[Turn("user", "What is the capital of France?"),
                                                        Turn("assistant", first), Turn("user", "And of Italy?")]))
        series = [prompts[0], turn2, prompts[1], prompts[2], prompts[1]]
        want = [cold.generate_batch([p], GREEDY, stop)[0] for p in series]
    with _llama(item["gguf"], renderer.tokenizer) as warm:
        evaluated: list[int] = []
        original = warm.llm.eval
        warm.llm.eval = lambda tokens: (evaluated.append(len(tokens)), original(tokens))[1]
        got = []
        for p in series:
            evaluated.clear()
            got.append(warm.generate_batch([p], GREEDY, stop)[0])
            if p is not series[0]:
                assert evaluated[0] < len(p) // 2  # most of the prompt came from the cache
    assert got == want


@needs_llama_cpp
def test_sampling_is_seeded_by_its_own_rng(built, renderer, prompts):
    item = built["llama"]
    settings = GenSettings(max_new_tokens=32, temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=7)
    with _llama(item["gguf"], renderer.tokenizer) as engine:
        first = engine.generate_batch(prompts[:2], settings, renderer.stop_token_ids)
        torch.manual_seed(123)  # torch's global RNG plays no part
        assert engine.generate_batch(prompts[:2], settings, renderer.stop_token_ids) == first
        other = GenSettings(**{**settings.__dict__, "seed": 8})
        assert engine.generate_batch(prompts[:2], other, renderer.stop_token_ids) != first


@needs_llama_cpp
def test_stream_pieces_stop_event_and_context_limit(built, renderer, prompts):
    item = built["llama"]
    with _llama(item["gguf"], renderer.tokenizer, n_ctx=64) as engine:
        whole = engine.generate_batch(prompts[:1], GREEDY, renderer.stop_token_ids)[0]
        assert "".join(engine.stream(prompts[0], GREEDY, renderer.stop_token_ids)).strip() == whole
        stop = threading.Event()
        stop.set()
        assert list(engine.stream(prompts[0], GREEDY, renderer.stop_token_ids, stop_event=stop)) == []
        stop.clear()
        pieces = engine.stream(prompts[0], GREEDY, renderer.stop_token_ids, stop_event=stop)
        next(pieces)
        stop.set()
        assert len(list(pieces)) <= 1  # at most the text held back for an unfinished character
        with pytest.raises(UserError, match="context holds 64"):
            list(engine.stream(list(range(100, 170)), GREEDY, renderer.stop_token_ids))
        # the answer is cut at the context's end, not past it
        long_prompt = prompts[0] + prompts[0][:20]
        assert len(long_prompt) + GREEDY.max_new_tokens > 64
        assert len(list(engine.generate_ids(long_prompt, GREEDY, []))) == 64 - len(long_prompt)


@needs_llama_cpp
def test_refuses_a_lora_gguf_for_another_base(built, renderer):
    with pytest.raises(UserError, match="refused this LoRA GGUF"):
        _llama(built["llama"]["gguf"], renderer.tokenizer, {"x": built["qwen3"]["loras"][0]})


QUANTIZED = """
import sys
from transformers import AutoTokenizer
from nekotune.engines.llamacpp import LlamaCppEngine, LlamaCppOptions
from nekotune.generate import GenSettings
tok = AutoTokenizer.from_pretrained(sys.argv[2])
with LlamaCppEngine(sys.argv[1], tok, options=LlamaCppOptions(n_threads=1)) as engine:
    ids = list(engine.generate_ids(list(range(100, 120)), GenSettings(max_new_tokens=8, temperature=0.0), []))
print(len(ids))
"""


@needs_llama_cpp
def test_q8_0_decodes_on_this_cpu(built, tmp_path):
    """On AMX CPUs llama.cpp's repacked q8_0 segfaults on multi-token decodes unless repacking is
    off; a child process, so that a crash fails this test instead of ending the suite."""
    from nekotune.export.gguf import gguf_file

    item = built["llama"]
    q8 = gguf_file(cfg(), str(item["base"]), str(tmp_path / "q8.gguf"), "q8_0").path
    run = subprocess.run([sys.executable, "-c", QUANTIZED, str(q8), str(item["base"])], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "8"


@needs_llama_cpp
def test_cached_files_for_a_run_and_extra_adapters(built, renderer, prompts, gguf_cache):
    from nekotune.engines.gguf_files import llamacpp_files, open_llamacpp
    from nekotune.engines.transformers import TransformersEngine

    item = built["llama"]
    run, extra = str(item["adapters"][0]), [("two", str(item["adapters"][1]))]
    files = llamacpp_files(cfg(), run, "f32", adapters=extra)
    assert files.model.parent == gguf_cache and not files.merged and set(files.adapters) == {"llama-ad0", "two"}
    again = llamacpp_files(cfg(), run, "f32", adapters=extra)
    assert again.model == files.model and again.adapters == files.adapters
    assert files.model.stat().st_mtime_ns == again.model.stat().st_mtime_ns  # not rebuilt
    hf = TransformersEngine(_f16_weights(_hf(item["base"], [run]), only_lora=True), renderer.tokenizer, {"x": "a0"})
    with _llama(files.model, renderer.tokenizer, files.adapters) as engine:
        assert engine.generate_batch(prompts[:3], GREEDY, renderer.stop_token_ids, adapter="llama-ad0") == \
            hf.generate_batch(prompts[:3], GREEDY, renderer.stop_token_ids, adapter="x", batch_size=1)
    engine, merged = open_llamacpp(cfg(), run, "f32", merge=True)
    with engine:
        assert merged.merged and merged.model != files.model and merged.model.parent == gguf_cache
        via_merged = engine.generate_batch(prompts[:3], GREEDY, merged.renderer.stop_token_ids)
    reference = TransformersEngine(_hf(item["base"], [run]).merge_and_unload().eval(), renderer.tokenizer)
    assert via_merged == reference.generate_batch(prompts[:3], GREEDY, renderer.stop_token_ids, batch_size=1)

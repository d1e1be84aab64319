"""The estimator against hand-computed numbers, presets and --fit, and its command line."""

import json
from pathlib import Path

import pytest

from nekotune.cli import main
from nekotune.config import PRESETS, load_config
from nekotune.memory import MB, Arch, Settings, estimate, fit, lora_params, settings_from_config

CONFIGS = Path(__file__).parent / "data" / "configs"
TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": True}


def test_parameter_counts_by_hand():
    arch = Arch.from_config(TINY)
    # per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up/down 3 x 64x128
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128
    assert arch.layer_linear_params == per_layer == 36864
    assert arch.params == 2 * per_layer + 1000 * 64 + 2 * (2 * 64) + 64
    # LoRA r=8: r * (in + out) for each projection
    by_hand = 2 * 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert lora_params(arch, 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) == by_hand
    assert lora_params(arch, 8, ("q_proj", "v_proj")) == 2 * 8 * ((64 + 64) + (64 + 32))


def test_breakdown_by_hand():
    arch = Arch.from_config(TINY)
    s = Settings(device="cuda", weight_bytes=2, act_bytes=2, batch=2, seq=16, lora_r=8)
    est = estimate(arch, s)
    assert est.items["base weights"] == pytest.approx(arch.params * 2 / MB)
    assert est.items["LoRA weights + grads + AdamW (fp32)"] == pytest.approx(lora_params(arch, 8, s.targets) * 16 / MB)
    per_token_layer = 5 * 64 + (3 * 64 + 3 * 32 + 4) + 4 * 128 + 7 * 8
    assert est.items["activations"] == pytest.approx(32 * per_token_layer * 2 * 2 / MB)
    assert est.items["logits + loss"] == pytest.approx(3 * 32 * 1000 * 4 / MB)  # 32 tokens < one chunk
    assert est.items["CUDA context (outside torch allocations)"] == 600
    assert est.total_mb == pytest.approx(sum(est.items.values()))


def test_checkpointing_and_4bit_shrink_the_right_items():
    arch = Arch.from_config(json.loads((CONFIGS / "Qwen3-1.7B" / "config.json").read_text()))
    plain = estimate(arch, Settings(batch=4, seq=2048))
    ckpt = estimate(arch, Settings(batch=4, seq=2048, grad_ckpt=True))
    q4 = estimate(arch, Settings(batch=4, seq=2048, quant4=True))
    assert ckpt.items["activations (gradient checkpointing)"] < plain.items["activations"] / 5
    linear = arch.layers * arch.layer_linear_params  # NF4 + double-quant constants; embeddings/norms bf16
    by_hand = linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + (arch.embedding_params + arch.norm_params) * 2
    assert q4.items["base weights"] == pytest.approx(by_hand / MB)
    assert q4.items["base weights"] < plain.items["base weights"] / 2
    assert abs(arch.params / 1e9 - 1.72) < 0.01


@pytest.mark.parametrize("name,budget", [("8gb", 8), ("12gb", 12), ("16gb", 16), ("24gb", 24)])
def test_presets_fit_their_budget_for_qwen3_1_7b(name, budget):
    cfg = load_config(None, [f"preset={name}", "model.device=cuda"], default_to_demo=False)
    arch = Arch.from_config(json.loads((CONFIGS / "Qwen3-1.7B" / "config.json").read_text()))
    assert estimate(arch, settings_from_config(cfg, "cuda")).total_mb <= budget * 1024
    assert cfg.train.batch_size == PRESETS[name]["train"]["batch_size"]


def test_cpu_preset_fits_smollm2_in_8gb():
    from nekotune.memory import read_model_config

    cfg = load_config(None, ["preset=cpu"], default_to_demo=False)
    arch = Arch.from_config(read_model_config("smollm2")[0])
    assert estimate(arch, settings_from_config(cfg, "cpu")).total_mb <= 8 * 1024


def test_fit_prefers_accumulation_then_checkpointing_then_shorter_then_4bit():
    arch = Arch.from_config(json.loads((CONFIGS / "Qwen3-8B" / "config.json").read_text()))
    start = Settings(batch=4, seq=2048, grad_accum=4)
    roomy, _ = fit(arch, start, 80 * 1024)
    assert (roomy.batch, roomy.grad_ckpt, roomy.quant4) == (4, False, False)
    mid, _ = fit(arch, start, 24 * 1024)
    assert mid.batch * mid.grad_accum == 16 and not mid.quant4
    tight, est = fit(arch, start, 10 * 1024)
    assert tight.quant4 and est.total_mb <= 10 * 1024
    assert fit(arch, start, 2 * 1024) is None


def test_cli_breakdown_json_and_fit(capsys):
    assert main(["estimate", "--model", str(CONFIGS / "Qwen3-1.7B"), "train.batch_size=4", "data.max_seq_len=1024",
                 "--fit", "8GB", "--json", "model.device=cuda"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] > 1.7e9 and out["fit"]["total_mb"] <= 8192
    assert "train.batch_size=" in " ".join(out["fit"]["overrides"])
    assert out["plain_hf_loss_logits_mb"] > 5 * out["estimate"]["items_mb"]["logits + loss"]
    assert main(["estimate", "--model", str(CONFIGS / "Meta-Llama-3-8B" / "config.json")]) == 0
    assert "peak training memory" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["estimate", "--model", "/nope/model"], "not found"),
    (["estimate", "--model", "Qwen/Qwen3-1.7B"], "cannot fetch config.json"),
    (["estimate", "--model", str(CONFIGS / "Qwen3-1.7B"), "--fit", "lots"], "--fit"),
])
def test_cli_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_qlora_on_cpu_is_refused_before_loading(tiny_llama, qa_file, tmp_path, capsys, monkeypatch):
    import nekotune.model as M

    def boom(*a, **k):
        raise AssertionError("no model may be loaded")

    monkeypatch.setattr(M, "load_model", boom)
    rc = main(["train", f"model.name_or_path={tiny_llama}", f"data.path={qa_file}", "model.quantization=4bit",
               f"output.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs an NVIDIA GPU with CUDA" in err and "remove model.quantization" in err


def test_doctor_on_this_cpu_machine(capsys):
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("this test describes a machine without a GPU")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "GPU: none" in out and "no GPU: training runs on the CPU" in out and "preset=cpu" in out
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cuda_available"] is False and info["gpus"] == [] and info["torch"]
    assert info["packages"]["transformers"] and info["problems"] == []

"""Issue 15 through the real config loader and CLI: other tools' configs and command lines,
presets as layers, and Chinese errors."""

from __future__ import annotations

from pathlib import Path

import yaml
from alias_fixtures import ALPACA_KIT_ARGV, LORA_FRAMEWORK_YAML, QWEN3_LORA_SFT

from nekotune.cli import main
from nekotune.config import PRESETS, load_config, load_config_notes

EXAMPLE = Path(__file__).parents[1] / "examples" / "qwen3-1.7b-nekoqa.yaml"


def _show(capsys, *args: str) -> tuple[dict, list[str]]:
    assert main(["config", "show", *args]) == 0
    out = capsys.readouterr().out
    comments = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    return yaml.safe_load(out), comments


def test_config_show_example_with_preset_6gb_is_qlora(capsys):
    shown, _ = _show(capsys, str(EXAMPLE), "preset=6gb")
    assert shown["preset"] == "6gb" and shown["model"]["quantization"] == "4bit"
    # the command-line preset overrides the YAML's batch 4 x accumulation 4
    assert (shown["train"]["batch_size"], shown["train"]["grad_accum"]) == (2, 8)
    assert shown["train"]["grad_checkpointing"] is True
    shown, _ = _show(capsys, str(EXAMPLE), "preset=8gb")
    assert shown["model"]["quantization"] == "4bit" and shown["train"]["grad_checkpointing"] is True
    shown, _ = _show(capsys, str(EXAMPLE))
    assert shown["model"]["quantization"] is None and shown["train"]["batch_size"] == 4


def test_preset_precedence(tmp_path: Path):
    """preset in the YAML < YAML keys < command-line preset < command-line keys."""
    f = tmp_path / "c.yaml"
    f.write_text("preset: 8gb\ntrain:\n  batch_size: 3\n", encoding="utf-8")
    cfg = load_config(f)
    assert cfg.train.batch_size == 3 and cfg.model.quantization == "4bit"  # YAML beats its own preset
    assert cfg.train.grad_accum == PRESETS["8gb"]["train"]["grad_accum"]
    cfg = load_config(f, ["preset=6gb"])
    assert cfg.preset == "6gb" and cfg.train.batch_size == PRESETS["6gb"]["train"]["batch_size"]
    cfg = load_config(f, ["preset=6gb", "train.batch_size=1"])
    assert cfg.train.batch_size == 1
    cfg = load_config(f, ["train.batch_size=1", "preset=cpu"])  # order on the command line does not matter
    assert cfg.train.batch_size == 1 and cfg.data.max_seq_len == PRESETS["cpu"]["data"]["max_seq_len"]


def test_lora_framework_yaml_loads(tmp_path: Path, capsys):
    f = tmp_path / "config.yaml"
    f.write_text(LORA_FRAMEWORK_YAML, encoding="utf-8")
    cfg = load_config(f)
    assert (cfg.model.name_or_path, cfg.model.dtype, cfg.train.epochs, cfg.train.batch_size) == (
        "Qwen/Qwen2.5-0.5B-Instruct", "fp16", 3, 2)
    assert (cfg.train.grad_accum, cfg.train.lr, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 2e-4, 16, 32,
                                                                                                0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and cfg.output.dir == "outputs/lora-qwen"
    _, comments = _show(capsys, str(f), "learning_rate=1e-5")
    assert "learning_rate -> train.lr" in comments and "torch_dtype -> model.dtype ('float16' -> 'fp16')" in comments
    assert load_config(f, ["learning_rate=1e-5"]).train.lr == 1e-5  # the command line beats the YAML


def test_alpaca_kit_command_line_through_the_cli(capsys):
    shown, comments = _show(capsys, *ALPACA_KIT_ARGV)
    assert shown["model"]["name_or_path"] == "Qwen/Qwen2.5-3B-Instruct"
    assert shown["data"]["path"] == "RAG/data/qa_gen/animals_alpaca.jsonl"
    assert (shown["data"]["val_size"], shown["data"]["max_seq_len"], shown["model"]["quantization"]) == (0.1, 1024,
                                                                                                       "4bit")
    assert (shown["train"]["epochs"], shown["train"]["batch_size"], shown["train"]["grad_accum"]) == (3, 1, 16)
    assert shown["lora"]["target_modules"] == ["q_proj", "v_proj"] and shown["train"]["grad_checkpointing"] is True
    assert shown["preset"] == "8gb" and shown["output"]["dir"] == "lora/out/x"
    assert "val_split -> data.val_size" in comments and "model_id -> model.name_or_path" in comments


def test_llamafactory_example_loads_to_nested_values(tiny_qwen3: Path, tmp_path: Path):
    raw = yaml.safe_load(QWEN3_LORA_SFT)
    raw["model_name_or_path"] = str(tiny_qwen3)
    f = tmp_path / "qwen3_lora_sft.yaml"
    f.write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg, notes = load_config_notes(f)
    assert (cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.model.dtype) == (str(tiny_qwen3), True, "bf16")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 16, "all-linear")
    assert (cfg.data.dataset, cfg.data.max_seq_len, cfg.data.max_rows, cfg.data.enable_thinking) == (
        ["identity", "alpaca_en_demo"], 2048, 1000, False)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr, cfg.train.epochs, cfg.train.scheduler) == (
        1, 8, 1e-4, 3, "cosine")
    assert (cfg.train.warmup_ratio, cfg.train.logging_steps, cfg.train.save_steps) == (0.1, 10, 500)
    assert cfg.output.dir == "saves/qwen3-4b/lora/sft" and cfg.output.plot is True
    warned = {n.split(":")[0].split("=")[0] for n in notes if n.kind == "warning"}
    assert {"do_train", "overwrite_output_dir", "ddp_timeout"} <= warned  # named, never dropped silently


def test_errors_in_chinese(monkeypatch, capsys):
    monkeypatch.setenv("NEKOTUNE_LANG", "zh")
    assert main(["config", "show", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nekotune: 错误: 命令行 中有未知的配置项 `train.lrr`") and "`train.lr`" in err
    monkeypatch.setenv("NEKOTUNE_LANG", "en")
    assert main(["config", "show", "train.lrr=1"]) == 2
    assert "error: unknown config key `train.lrr`" in capsys.readouterr().err


def test_flat_and_nested_forms_of_one_key_are_refused(capsys):
    assert main(["config", "show", "lr=1e-4", "train.lr=2e-4"]) == 2
    assert "`lr` and `train.lr` are both set" in capsys.readouterr().err

"""Other tools' config keys and command lines -> nekotune's nested config (aliases.py).

Every translation is checked against nekotune's real Config: the nested mapping, minus the keys
that phase B adds (alias_fixtures.NEW_KEYS), must validate and hold the expected values.
"""

from __future__ import annotations

import argparse

import pytest
import yaml
from alias_fixtures import ALPACA_KIT_ARGV, LORA_FRAMEWORK_YAML, NEW_KEYS, QWEN3_LORA_SFT, without_new_keys

from nekotune import aliases
from nekotune.cli import build_parser
from nekotune.config import Config, all_keys
from nekotune.errors import UserError


def _config(nested: dict) -> Config:
    return Config.model_validate(without_new_keys(nested))


def _parse(tokens: list[str]) -> dict:
    """What config.parse_override does with `key=value` tokens."""
    return {k: yaml.safe_load(v) for k, v in (t.split("=", 1) for t in tokens)}


def test_every_target_is_a_config_key_or_a_listed_new_one():
    keys = set(all_keys())
    targets = {a.target for a in aliases.ALIASES.values()} | set(aliases.SAME_NAME.values())
    assert targets - keys <= NEW_KEYS, targets - keys - NEW_KEYS
    # each name is in one table only, so what it means is never ambiguous
    tables = [set(aliases.ALIASES), set(aliases.SAME_NAME), set(aliases.IGNORED), set(aliases.UNSUPPORTED)]
    for i, a in enumerate(tables):
        for b in tables[i + 1:]:
            assert not a & b, a & b
    assert not (aliases.known_names() - aliases.CONTEXTUAL) & set(aliases.SECTIONS)


def test_lora_framework_yaml():
    nested, notes = aliases.translate(yaml.safe_load(LORA_FRAMEWORK_YAML), "config.yaml")
    cfg = _config(nested)
    assert (cfg.model.name_or_path, cfg.model.dtype) == ("Qwen/Qwen2.5-0.5B-Instruct", "fp16")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr) == (3, 2, 8, 2e-4)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.output.dir == "outputs/lora-qwen"
    assert "learning_rate -> train.lr" in notes
    assert "torch_dtype -> model.dtype ('float16' -> 'fp16')" in notes
    assert all(n.kind == "alias" for n in notes) and len(notes) == 11  # one line per key


def test_alpaca_kit_command_line():
    tokens = aliases.normalize_argv(ALPACA_KIT_ARGV)
    assert tokens[-1] == "preset=8gb"
    assert "load_in_4bit=true" in tokens and "max_steps=-1" in tokens and "max_seq_len=1024" in tokens
    assert "lora_target_modules=q_proj,v_proj" in tokens
    nested, notes = aliases.translate(_parse(tokens[:-1]), "the command line")
    cfg = _config(nested)
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-3B-Instruct" and cfg.model.quantization == "4bit"
    assert cfg.model.device == "cuda" and cfg.data.val_size == 0.1 and cfg.data.max_seq_len == 1024
    assert cfg.data.path == "RAG/data/qa_gen/animals_alpaca.jsonl" and cfg.output.dir == "lora/out/x"
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.save_total_limit) == (1, 16, 50)
    assert cfg.train.grad_checkpointing is True and cfg.lora.target_modules == ["q_proj", "v_proj"]
    # the kit's checkpoint fraction is already a fraction of an epoch: both saves and evals
    assert nested["train"]["save_steps"] == nested["train"]["eval_steps"] == 0.1
    # the hints of today's config.py were wrong for these two
    assert "model_id -> model.name_or_path" in notes and "val_split -> data.val_size" in notes


def test_alpaca_lora_batch_semantics():
    raw = {"base_model": "m", "batch_size": 128, "micro_batch_size": 4, "num_epochs": 3, "cutoff_len": 256,
           "val_set_size": 2000, "train_on_inputs": True, "lora_target_modules": ["q_proj", "v_proj"],
           "group_by_length": False, "prompt_template_name": "alpaca"}
    nested, notes = aliases.translate(raw)
    cfg = _config(nested)
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (4, 32)
    assert cfg.data.val_size == 2000 and cfg.data.train_on_prompt is True and cfg.data.max_seq_len == 256
    warned = {n.split(":")[0] for n in notes if n.kind == "warning"}
    assert warned == {"group_by_length", "prompt_template_name"}
    assert not any(n.startswith("batch_size -> ") for n in notes)


def test_hf_step_ratios_become_epoch_fractions():
    nested, _ = aliases.translate({"num_train_epochs": 3, "save_steps": 0.1, "eval_strategy": "steps",
                                   "eval_steps": 0.05})
    assert nested["train"]["save_steps"] == pytest.approx(0.3)
    assert nested["train"]["eval_steps"] == pytest.approx(0.15)
    nested, _ = aliases.translate({"max_steps": 1000, "save_steps": 0.1})
    assert nested["train"]["save_steps"] == 100
    nested, notes = aliases.translate({"eval_strategy": "epoch", "eval_steps": 50})
    assert "eval_steps" not in nested.get("train", {}) and any("each epoch" in n for n in notes)
    nested, _ = aliases.translate({"save_strategy": "steps", "logging_steps": 20, "eval_strategy": "steps"})
    assert (nested["train"]["save_steps"], nested["train"]["eval_steps"]) == (500, 20)  # the Trainer's fallbacks
    nested, _ = aliases.translate({"save_strategy": "best", "load_best_model_at_end": True,
                                   "metric_for_best_model": "loss"})
    assert nested["train"]["load_best"] is True and nested["train"]["best_metric"] == "eval_loss"


def test_warmup_and_value_translations():
    nested, _ = aliases.translate({"warmup_steps": 0.05, "lr_scheduler_type": "COSINE", "report_to": "wandb,mlflow",
                                   "flash_attn": "fa2", "dtype": "torch.bfloat16", "device_map": "cuda:0",
                                   "validation_split_percentage": 5, "quantization_bit": 4, "do_sample": False})
    cfg = _config(nested)
    assert (cfg.train.warmup_ratio, cfg.train.scheduler, cfg.model.attn_implementation) == (
        0.05, "cosine", "flash_attention_2")
    assert (cfg.model.dtype, cfg.model.device, cfg.data.val_size, cfg.model.quantization) == (
        "bf16", "cuda", 0.05, "4bit")
    assert cfg.generate.temperature == 0.0 and nested["train"]["report_to"] == ["wandb", "mlflow"]
    nested, notes = aliases.translate({"warmup_steps": 100, "bf16": False, "resume_from_checkpoint": True})
    assert nested["train"]["warmup_steps"] == 100 and "model" not in nested
    assert nested["train"]["resume"] is True and "bf16: False -> model.dtype keeps nekotune's default" in notes


@pytest.mark.parametrize("raw, words", [
    ({"label_smoothing_factor": 0.1}, ["label_smoothing_factor", "remove it"]),
    ({"lr_scheduler_type": "polynomial"}, ["lr_scheduler_type", "polynomial", "cosine"]),
    ({"report_to": "comet_ml"}, ["comet_ml", "wandb"]),
    ({"resume_from_checkpoint": "out/checkpoint-50"}, ["resume_from_checkpoint", "output.dir", "train.resume=true"]),
    ({"greater_is_better": True}, ["greater_is_better"]),
    ({"torch_dtype": "int8"}, ["torch_dtype", "bfloat16"]),
    ({"device_map": {"": 0}}, ["device_map", "model.device"]),
    ({"dataset": "alpaca"}, ["dataset", "data.path", "dataset_dir"]),
    ({"learning_rate": 1e-4, "train": {"lr": 2e-4}}, ["`learning_rate` and `train.lr` are both set"]),
    ({"deepspeed": "ds.json", "fsdp": "full_shard", "adam_beta1": 0.8, "neftune_noise_alpha": 5},
     ["deepspeed", "--nproc", "(and 1 more)"]),
])
def test_keys_with_no_equivalent_are_one_line_errors(raw: dict, words: list[str]):
    with pytest.raises(UserError) as err:
        aliases.translate(raw, "cfg.yaml")
    text = str(err.value)
    assert text.startswith("cfg.yaml: ") and "\n" not in text
    for word in words:
        assert word in text, text


def test_defaults_of_unsupported_keys_and_unknown_keys():
    nested, notes = aliases.translate({"bias": "none", "adam_beta2": 0.999, "wat": 1, "train": {"lr": 1e-3}})
    assert nested == {"wat": 1, "train": {"lr": 1e-3}}  # unknown keys are left for config validation to name
    assert sum("that tool's default" in n for n in notes) == 2


def test_flat_model_and_data_and_same_names():
    nested, notes = aliases.translate({"model": "Qwen/Qwen3-0.6B", "data": "train.json", "lr": 1e-4, "seed": 7,
                                       "r": 4, "max_seq_len": 512, "dataset": "my/hub-set"})
    cfg = _config(nested)
    assert (cfg.model.name_or_path, cfg.train.lr, cfg.train.seed, cfg.lora.r, cfg.data.max_seq_len) == (
        "Qwen/Qwen3-0.6B", 1e-4, 7, 4, 512)
    assert cfg.data.path == "my/hub-set"  # qlora/TRL `dataset` as a hub id (it came last)
    assert "lr -> train.lr" in notes


def test_llamafactory_qwen3_lora_sft(tiny_qwen3):
    raw = yaml.safe_load(QWEN3_LORA_SFT)
    raw["model_name_or_path"] = str(tiny_qwen3)
    nested, notes = aliases.translate(raw, "qwen3_lora_sft.yaml")
    cfg = _config(nested)
    assert cfg.model.name_or_path == str(tiny_qwen3)
    assert cfg.model.trust_remote_code is True and cfg.model.dtype == "bf16"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 16, "all-linear")
    assert (cfg.data.max_seq_len, cfg.data.max_rows, cfg.data.enable_thinking) == (2048, 1000, False)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.lr, cfg.train.epochs) == (1, 8, 1e-4, 3)
    assert (cfg.train.scheduler, cfg.train.warmup_ratio, cfg.train.logging_steps, cfg.train.save_steps) == (
        "cosine", 0.1, 10, 500)
    assert cfg.output.dir == "saves/qwen3-4b/lora/sft" and cfg.output.plot is True and cfg.train.resume is False
    assert nested["train"]["report_to"] == ["none"]
    assert nested["data"]["dataset"] == ["identity", "alpaca_en_demo"] and nested["data"]["dataset_dir"] == "data"
    warned = {n.split(":")[0] for n in notes if n.kind == "warning"}
    assert warned == {"do_train", "preprocessing_num_workers", "dataloader_num_workers", "overwrite_output_dir",
                      "save_only_model", "ddp_timeout"}
    assert "template: qwen3_nothink -> the model's own chat template (Qwen3)" in notes  # tiny-qwen3's path says qwen3
    assert "lora_target -> lora.target_modules ('all' -> 'all-linear')" in notes
    assert "bf16 -> model.dtype (True -> 'bf16')" in notes


def test_llamafactory_defaults_apply_only_to_what_the_yaml_omits():
    nested, notes = aliases.translate({"stage": "sft", "finetuning_type": "lora", "model_name_or_path": "m"})
    cfg = _config(nested)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.data.max_seq_len, cfg.train.lr, cfg.train.batch_size) == (
        8, 16, 2048, 5e-5, 8)
    assert (cfg.train.scheduler, cfg.train.warmup_ratio) == ("linear", 0.0)
    assert sum(n.kind == "default" for n in notes) >= 7
    nested, _ = aliases.translate({"stage": "pt", "lora_rank": 32, "learning_rate": 1e-3})
    cfg = _config(nested)
    assert (cfg.data.format, cfg.lora.r, cfg.lora.alpha, cfg.train.lr) == ("text", 32, 64, 1e-3)
    # a plain HF config gets nekotune's defaults, not LLaMA-Factory's
    nested, _ = aliases.translate({"learning_rate": 1e-3})
    assert nested == {"train": {"lr": 1e-3}}


@pytest.mark.parametrize("raw, word", [({"stage": "dpo"}, "stage: dpo"), ({"stage": "sft", "finetuning_type": "full"},
                                                                          "finetuning_type: full"),
                                       ({"stage": "sft", "mask_history": True}, "mask_history"),
                                       ({"stage": "sft", "use_galore": True}, "use_galore"),
                                       ({"stage": "sft", "adapter_name_or_path": "a"}, "train.resume=true")])
def test_llamafactory_refusals(raw: dict, word: str):
    with pytest.raises(UserError, match=word.replace("(", r"\(")):
        aliases.translate(raw, "lf.yaml")


def test_llamafactory_method_settings_are_warnings():
    _, notes = aliases.translate({"stage": "sft", "pref_beta": 0.1, "galore_rank": 16, "swanlab_project": "p",
                                  "use_swanlab": True, "mask_history": False})
    warned = {n.split(":")[0]: n for n in notes if n.kind == "warning"}
    assert {"pref_beta", "galore_rank", "swanlab_project"} <= set(warned)
    assert "SWANLAB_PROJECT" in warned["swanlab_project"]
    assert "use_swanlab -> train.report_to += swanlab" in notes


# -- the command line ---------------------------------------------------------------------------
def _options(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def test_reserved_holds_every_nekotune_option():
    assert _options(build_parser()) <= aliases.RESERVED


def test_nekotune_options_are_never_rewritten():
    argv = ["serve", "--model", "outputs/run", "--port", "8001", "merge", "--dtype", "bf16", "--out", "m",
            "--json", "-m", "x", "--fit", "8GB", "--no-progress"]
    assert aliases.normalize_argv(argv, all_keys()) == argv


@pytest.mark.parametrize("argv, expected", [
    (["train", "my.yaml", "--learning_rate", "1e-4"], ["train", "my.yaml", "learning_rate=1e-4"]),
    (["train", "--learning-rate=1e-4", "x.yaml"], ["train", "learning_rate=1e-4", "x.yaml"]),
    (["train", "--train.lr", "1e-4", "--lora.r=8"], ["train", "train.lr=1e-4", "lora.r=8"]),
    (["train", "--bf16", "my.yaml"], ["train", "bf16=true", "my.yaml"]),  # a bare flag never takes the config file
    (["train", "--bf16", "false"], ["train", "bf16=false"]),
    (["train", "--target_modules", "q_proj", "v_proj", "cfg.yml"],
     ["train", "target_modules=q_proj,v_proj", "cfg.yml"]),
    (["train", "--max_steps", "-1", "lora.r=4"], ["train", "max_steps=-1", "lora.r=4"]),
    (["train", "--system_prompt", "be brief", "--model_id", "m"], ["train", "system_prompt=be brief", "model_id=m"]),
    (["train", "--not-a-key", "5"], ["train", "--not-a-key", "5"]),
    (["config", "show", "--preset", "6gb"], ["config", "show", "preset=6gb"]),
    (["train", "--system_prompt", "x=y", "lora.r=4"], ["train", "system_prompt=x=y", "lora.r=4"]),
    (["train", "--dataset", "identity,alpaca_en_demo", "--stage", "sft"],
     ["train", "dataset=identity,alpaca_en_demo", "stage=sft"]),
])
def test_normalize_argv(argv: list[str], expected: list[str]):
    assert aliases.normalize_argv(argv, all_keys()) == expected


def test_dotted_keys_need_the_config_keys():
    assert aliases.normalize_argv(["--train.lr", "1"]) == ["--train.lr", "1"]
    assert aliases.normalize_argv(["--train.lr", "1"], all_keys()) == ["train.lr=1"]


@pytest.mark.parametrize("key, hint", [("lr", "train.lr"), ("val_splt", "val_split` (= `data.val_size"),
                                       ("learnig_rate", "learning_rate` (= `train.lr"),
                                       ("train.learning_rat", "learning_rate` (= `train.lr"),
                                       ("lora.rank", "rank` (= `lora.r"), ("zzzzqqq", None)])
def test_suggest(key: str, hint: str | None):
    assert aliases.suggest(key, all_keys()) == hint


def test_nekotune_configs_pass_through_unchanged():
    """Wiring translate into config loading changes nothing for nekotune's own configs."""
    from pathlib import Path

    from nekotune.config import DEMO_CONFIG

    files = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")) + [DEMO_CONFIG]
    assert len(files) >= 4
    for path in files:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        assert aliases.translate(raw, str(path)) == (raw, []), path

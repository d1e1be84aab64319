"""A real transformers Trainer on a tiny random Llama with LoRA, for checkpoint and tracker tests.

Rows are random token ids (no tokenizer, no download); the model is built from a config like
conftest.build_tiny, smaller still, so a few optimizer steps take a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path


def tiny_peft_model(seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def token_rows(n: int, seed: int = 0, length: int = 16):
    import torch
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randint(0, 128, (n, length), generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    return Rows()


def recorder():
    """A callback that records the steps of saves and evaluations (with eval_loss)."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.saves: list[int] = []
            self.evals: list[tuple[int, float]] = []

        def on_save(self, args, state, control, **kw):
            self.saves.append(state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.evals.append((state.global_step, metrics["eval_loss"]))

    return Recorder()


def make_trainer(out: Path, train_rows: int = 8, eval_rows: int | None = 4, callbacks=(), model=None, **args):
    from transformers import Trainer, TrainingArguments

    defaults = dict(per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, report_to="none",
                    use_cpu=True, disable_tqdm=True, save_only_model=False, seed=0)
    targs = TrainingArguments(output_dir=str(out), **{**defaults, **args})
    return Trainer(model=model if model is not None else tiny_peft_model(), args=targs,
                   train_dataset=token_rows(train_rows),
                   eval_dataset=token_rows(eval_rows, seed=1) if eval_rows else None, callbacks=list(callbacks))


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in Path(out).glob("checkpoint-*"))

"""Rows c and c-bf16: TRL's SFTTrainer with its defaults, only the job's settings given.

Chat rows go in as `messages`; TRL applies the chat template itself and, by default, trains on the
whole conversation (assistant_only_loss=False), keeps its default gradient checkpointing and its
default loss. On a CPU-only machine SFTConfig() refuses its own default bf16 unless use_cpu=True;
row c adds bf16=False (fp32), row c-bf16 keeps TRL's default (bf16 autocast). LoRA: peft's
defaults besides r, alpha and the target modules (no dropout).

    python bench/jobs/trl_sft.py <job.json>     (written by bench/train_bench.py)
"""

from common import conversations, job, make_callback, report, rows
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

cfg = job()
data = Dataset.from_list([{"messages": m} for m in conversations(rows(cfg["train_file"]))])
precision = {} if cfg["precision"] == "bf16" else {"bf16": False}
args = SFTConfig(output_dir=cfg["out"] + "/checkpoints", per_device_train_batch_size=cfg["batch"],
                 num_train_epochs=cfg["epochs"], learning_rate=cfg["lr"], lr_scheduler_type="cosine",
                 max_length=cfg["max_len"], logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                 **precision)
callback = make_callback()
trainer = SFTTrainer(model=cfg["model"], args=args, train_dataset=data, callbacks=[callback],
                     peft_config=LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"],
                                            task_type="CAUSAL_LM"))
trainer.train()
trainer.model.save_pretrained(cfg["out"] + "/adapter")
report(cfg, callback, {"precision": "bf16 autocast" if args.bf16 else "fp32",
                       "gradient_checkpointing": bool(args.gradient_checkpointing), "loss_on": "whole sequence"})

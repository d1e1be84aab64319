"""TRL's SFTTrainer with its defaults for chat data (assistant-only loss off), fp32 on CPU."""

import json

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from common import Timer, conversations, job, report

cfg = job()
rows = json.load(open(cfg["train_file"]))
data = Dataset.from_list([{"messages": m} for m in conversations(rows)])
args = SFTConfig(output_dir=cfg["out"] + "/ckpt", per_device_train_batch_size=cfg["batch"], num_train_epochs=cfg["epochs"],
                 learning_rate=cfg["lr"], lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
                 report_to="none", use_cpu=True, bf16=False, max_length=cfg["max_len"], seed=42)
trainer = SFTTrainer(model=cfg["model"], args=args, train_dataset=data,
                     peft_config=LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=0.05,
                                            target_modules=cfg["targets"], task_type="CAUSAL_LM"))
with Timer() as t:
    trainer.train()
trainer.model.save_pretrained(cfg["out"] + "/adapter")
report(cfg["out"], t.seconds, [h["loss"] for h in trainer.state.log_history if "loss" in h])

"""The seeds' recipe (Neko-LoRA train_CAT.py style): Trainer + peft + DataCollatorForSeq2Seq,
prompt and answer both as labels, fp32, LoRA dropout 0.05, padding per batch."""

import json
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                          TrainingArguments)

from common import Timer, conversations, job, report

cfg = job()
tok = AutoTokenizer.from_pretrained(cfg["model"])
rows = json.load(open(cfg["train_file"]))
features = []
for conv in conversations(rows):
    ids = list(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])[: cfg["max_len"]]
    features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=0.05,
                                         target_modules=cfg["targets"], task_type="CAUSAL_LM"))
args = TrainingArguments(output_dir=cfg["out"] + "/ckpt", per_device_train_batch_size=cfg["batch"],
                         num_train_epochs=cfg["epochs"], learning_rate=cfg["lr"], lr_scheduler_type="cosine",
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=42)
trainer = Trainer(model=model, args=args, train_dataset=features,
                  data_collator=DataCollatorForSeq2Seq(tok, padding=True))
with Timer() as t:
    trainer.train()
model.save_pretrained(cfg["out"] + "/adapter")
report(cfg["out"], t.seconds, [h["loss"] for h in trainer.state.log_history if "loss" in h])

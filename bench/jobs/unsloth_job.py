"""Unsloth on CPU (its FastLanguageModel + TRL), run in bench/.venvs/unsloth."""

import json

from common import Timer, conversations, job, report

cfg = job()
from unsloth import FastLanguageModel  # noqa: E402  (must be imported before transformers)
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

model, tok = FastLanguageModel.from_pretrained(cfg["model"], max_seq_length=cfg["max_len"], load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"])
rows = json.load(open(cfg["train_file"]))
data = Dataset.from_list([{"text": tok.apply_chat_template(m, tokenize=False)} for m in conversations(rows)])
args = SFTConfig(output_dir=cfg["out"] + "/ckpt", per_device_train_batch_size=cfg["batch"], num_train_epochs=cfg["epochs"],
                 learning_rate=cfg["lr"], lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
                 report_to="none", use_cpu=True, bf16=False, max_length=cfg["max_len"], seed=42)
trainer = SFTTrainer(model=model, tokenizer=tok, args=args, train_dataset=data)
with Timer() as t:
    trainer.train()
model.save_pretrained(cfg["out"] + "/adapter")
report(cfg["out"], t.seconds, [h["loss"] for h in trainer.state.log_history if "loss" in h])

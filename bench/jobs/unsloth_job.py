"""Rows d and d-bf16: Unsloth on CPU (its FastLanguageModel + its patched TRL SFTTrainer), run in
bench/.venvs/unsloth.

Row d keeps Unsloth's defaults besides the job's settings: fp32 weights and compute, its own
gradient checkpointing ("unsloth"), no LoRA dropout. Row d-bf16 is the fastest setting measured on
a machine like this one (../shared/NOTES-platform.md): bf16 autocast and no gradient
checkpointing. Unsloth's CPU path trains on the whole rendered conversation, like TRL's default.

    bench/.venvs/unsloth/bin/python bench/jobs/unsloth_job.py <job.json>
"""

from common import conversations, job, make_callback, report, rows

cfg = job()
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402  (Unsloth must be imported before transformers)

bf16 = cfg["precision"] == "bf16"
model, tok = FastLanguageModel.from_pretrained(cfg["model"], max_seq_length=cfg["max_len"], load_in_4bit=False,
                                               dtype=torch.float32)
checkpointing = False if bf16 else "unsloth"
model = FastLanguageModel.get_peft_model(model, r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"],
                                         lora_dropout=0, use_gradient_checkpointing=checkpointing, random_state=42)
texts = [tok.apply_chat_template(m, tokenize=False) for m in conversations(rows(cfg["train_file"]))]
data = Dataset.from_list([{"text": t} for t in texts])
args = SFTConfig(output_dir=cfg["out"] + "/checkpoints", per_device_train_batch_size=cfg["batch"],
                 num_train_epochs=cfg["epochs"], learning_rate=cfg["lr"], lr_scheduler_type="cosine",
                 max_length=cfg["max_len"], logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                 bf16=bf16, dataset_text_field="text", seed=42)
callback = make_callback()
trainer = SFTTrainer(model=model, processing_class=tok, args=args, train_dataset=data, callbacks=[callback])
trainer.train()
model.save_pretrained(cfg["out"] + "/adapter")
report(cfg, callback, {"precision": "bf16 autocast" if bf16 else "fp32",
                       "gradient_checkpointing": checkpointing, "loss_on": "whole sequence"})

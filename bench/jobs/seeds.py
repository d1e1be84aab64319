"""Row b, the seeds' recipe: what Neko-LoRA's train_CAT.py does, on this job and on a CPU.

transformers Trainer + peft LoRA + DataCollatorForSeq2Seq; the whole rendered conversation is
tokenized and copied into the labels (prompt AND answer are trained, no masking); padding per
batch (to a multiple of 8, as train_CAT does); LoRA dropout 0.05. Differences from train_CAT,
all forced by the job or the machine: the chat template comes from
tokenizer.apply_chat_template instead of a hand-written ChatML string, weights and compute are
fp32 (train_CAT uses bf16 on a GPU), no validation split, no checkpoints, and no gradient
checkpointing (train_CAT turns it on to save GPU memory; on CPU it only costs time).

    python bench/jobs/seeds.py <job.json>       (written by bench/train_bench.py)
"""

import torch
from common import conversations, job, make_callback, report, rows
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments


def load_data(json_path):
    """The job's training rows as a datasets.Dataset of instruction/output pairs."""
    dataset = Dataset.from_list(rows(json_path))
    print(f"training rows: {len(dataset)}")
    return dataset


def setup_model_and_tokenizer(model_name):
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32)
    print(f"model loaded, dtype: {model.dtype}")
    return model, tokenizer


def setup_lora_model(model, cfg):
    lora_config = LoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["alpha"],
        target_modules=cfg["targets"],
        lora_dropout=0.05,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_config)
    model.print_trainable_parameters()
    return model


def preprocess_data(dataset, tokenizer, max_length):
    def tokenize_function(examples):
        pairs = [{"instruction": i, "output": o} for i, o in zip(examples["instruction"], examples["output"])]
        texts = [tokenizer.apply_chat_template(conv, tokenize=False) for conv in conversations(pairs)]
        tokenized = tokenizer(texts, truncation=True, padding=False, max_length=max_length, return_tensors=None)
        # causal language modelling: the labels are the input ids, prompt included
        tokenized["labels"] = tokenized["input_ids"].copy()
        return tokenized

    return dataset.map(tokenize_function, batched=True, remove_columns=dataset.column_names)


def setup_training_args(cfg):
    return TrainingArguments(
        output_dir=cfg["out"] + "/checkpoints",
        per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=1,
        learning_rate=cfg["lr"],
        num_train_epochs=cfg["epochs"],
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        fp16=False,
        bf16=False,
        use_cpu=True,
        dataloader_pin_memory=False,
        dataloader_num_workers=0,
        seed=42,
    )


def main():
    cfg = job()
    dataset = load_data(cfg["train_file"])
    model, tokenizer = setup_model_and_tokenizer(cfg["model"])
    model = setup_lora_model(model, cfg)
    tokenized = preprocess_data(dataset, tokenizer, cfg["max_len"])
    callback = make_callback()
    trainer = Trainer(
        model=model,
        args=setup_training_args(cfg),
        train_dataset=tokenized,
        data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, pad_to_multiple_of=8, return_tensors="pt",
                                             padding=True),
        callbacks=[callback],
    )
    trainer.train()
    model.save_pretrained(cfg["out"] + "/adapter")
    report(cfg, callback, {"precision": "fp32", "gradient_checkpointing": False, "loss_on": "whole sequence"})


if __name__ == "__main__":
    main()

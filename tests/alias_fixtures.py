"""Configs and command lines users bring from other tools, verbatim, for the alias tests."""

# issue 15's "LoRA framework" config.yaml: flat Hugging Face names
LORA_FRAMEWORK_YAML = """
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
torch_dtype: float16
num_train_epochs: 3
per_device_train_batch_size: 2
learning_rate: 2.0e-4
gradient_accumulation_steps: 8
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
target_modules: [q_proj, k_proj, v_proj, o_proj]
output_dir: outputs/lora-qwen
"""

# The Alpaca kit's command line (its README, written for cmd.exe with ^ continuations)
ALPACA_KIT_ARGV = ["--model_id", "Qwen/Qwen2.5-3B-Instruct", "--data_path", "RAG/data/qa_gen/animals_alpaca.jsonl",
                   "--output_dir", "lora/out/x", "--val_split", "0.1", "--max_seq_len=1024", "--load_in_4bit",
                   "--num_train_epochs", "3", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps",
                   "16", "--device_map", "cuda", "--checkpoint_every_epoch_frac", "0.1", "--save_total_limit", "50",
                   "--gradient_checkpointing", "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "-1",
                   "preset=8gb"]

# LLaMA-Factory examples/train_lora/qwen3_lora_sft.yaml at ff6d4d12, every key verbatim
# (comments dropped); tests swap the model for a tiny one.
QWEN3_LORA_SFT = """
### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

# Config keys the alias tables map to that nekotune's Config does not have yet (phase B adds them).
NEW_KEYS = {"train.report_to", "train.load_best", "train.best_metric", "train.early_stopping_patience",
            "train.early_stopping_threshold", "train.warmup_steps", "generate.no_repeat_ngram_size",
            "data.dataset", "data.dataset_dir", "data.eval_dataset"}


def without_new_keys(nested: dict) -> dict:
    """The nested mapping minus the keys nekotune does not have yet, and minus save/eval steps
    given as fractions of an epoch (floats: nekotune takes whole steps until fractions land)."""
    import copy

    probe = copy.deepcopy(nested)
    for dotted in NEW_KEYS:
        section, leaf = dotted.split(".")
        probe.get(section, {}).pop(leaf, None)
    for leaf in ("save_steps", "eval_steps"):
        if isinstance(probe.get("train", {}).get(leaf), float):
            probe["train"].pop(leaf)
    return probe

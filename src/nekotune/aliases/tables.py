"""The alias tables: every other tool's name -> nekotune's nested key, and the names that are
warned about (no effect in nekotune) or refused (no equivalent)."""

from __future__ import annotations

from typing import Any

from nekotune import llamafactory as lf
from nekotune.aliases.values import (
    SKIP,
    Alias,
    _a,
    bits,
    csv_list,
    device,
    dtype,
    flag_to,
    flash_attn,
    metric,
    negate,
    only_false,
    percent,
    qlora_format,
    report_to,
    resume,
    revision,
    scheduler,
    targets,
    to_bool,
    to_float,
    to_int,
)

# -- the table: every tool's name -> nekotune's key ---------------------------------------------
ALIASES: dict[str, Alias] = {
    # model (HF/TRL/qlora/LF model_name_or_path, alpaca-lora base_model, the Alpaca kit's model_id)
    **{k: _a("model.name_or_path") for k in ("model_name_or_path", "base_model", "model_id", "model_name",
                                               "pretrained_model_name_or_path", "base_model_name_or_path",
                                               "model_path")},
    "torch_dtype": _a("model.dtype", dtype), "dtype": _a("model.dtype", dtype),
    "revision": _a("model.revision", revision), "bf16": _a("model.dtype", flag_to("bf16")),
    "fp16": _a("model.dtype", flag_to("fp16")), "pure_bf16": _a("model.dtype", flag_to("bf16")),
    "load_in_4bit": _a("model.quantization", flag_to("4bit")),
    "load_in_8bit": _a("model.quantization", flag_to("8bit")),
    "quantization_bit": _a("model.quantization", bits), "bits": _a("model.quantization", bits),
    "trust_remote_code": _a("model.trust_remote_code", to_bool),
    "flash_attn": _a("model.attn_implementation", flash_attn),
    "model_revision": _a("model.revision", revision),
    "device_map": _a("model.device", device), "use_cpu": _a("model.device", flag_to("cpu")),
    "no_cuda": _a("model.device", flag_to("cpu")),
    # data
    **{k: _a("data.path") for k in ("data_path", "dataset_path", "train_file", "train_path", "train_jsonl",
                                      "dataset_name")},
    **{k: _a("data.val_path") for k in ("validation_file", "eval_file", "val_jsonl")},
    # a fraction (kit, LF) or a row count (alpaca-lora, qlora): nekotune's val_size reads both
    **{k: _a("data.val_size", to_float) for k in ("val_split", "val_set_size", "eval_dataset_size")},
    "validation_split_percentage": _a("data.val_size", percent),
    **{k: _a("data.max_seq_len", to_int) for k in ("max_seq_length", "cutoff_len", "model_max_length",
                                                     "block_size")},
    **{k: _a("data.train_on_prompt", to_bool) for k in ("train_on_inputs", "train_on_source")},
    "completion_only_loss": _a("data.train_on_prompt", negate),
    **{k: _a("data.max_rows", to_int) for k in ("max_samples", "max_train_samples")},
    "neat_packing": _a("data.packing", flag_to(True)),
    "default_system": _a("data.system_prompt"), "disable_shuffling": _a("data.shuffle", negate),
    "dataset_format": _a("data.format", lambda v: qlora_format(v)),
    "dataset_dir": _a("data.dataset_dir"),  # new key: LLaMA-Factory's dataset_info.json folder
    "eval_dataset": _a("data.eval_dataset", csv_list),  # new key: dataset_info.json names
    # lora (peft LoraConfig and the tools' names for it)
    **{k: _a("lora.r", to_int) for k in ("lora_r", "lora_rank", "rank")},
    "lora_alpha": _a("lora.alpha", to_float), "lora_dropout": _a("lora.dropout", to_float),
    **{k: _a("lora.target_modules", targets) for k in ("lora_target_modules", "lora_target", "lora_modules")},
    "target_modules": _a("lora.target_modules", targets),
    **{k: _a("lora.modules_to_save", csv_list) for k in ("modules_to_save", "additional_target")},
    # train (TrainingArguments and the tools)
    **{k: _a("train.epochs", to_float) for k in ("num_train_epochs", "num_epochs", "epoch")},
    **{k: _a("train.batch_size", to_int) for k in ("per_device_train_batch_size", "micro_batch_size")},
    **{k: _a("train.grad_accum", to_int) for k in ("gradient_accumulation_steps", "grad_accum_steps")},
    "learning_rate": _a("train.lr", to_float), "lr_scheduler_type": _a("train.scheduler", scheduler),
    **{k: _a("train.grad_checkpointing", to_bool) for k in ("gradient_checkpointing", "activation_checkpointing")},
    "disable_gradient_checkpointing": _a("train.grad_checkpointing", only_false(False)),
    "resume_from_checkpoint": _a("train.resume", resume),
    **{k: _a("train.liger", to_bool) for k in ("use_liger_kernel", "enable_liger_kernel")},
    "report_to": _a("train.report_to", report_to),  # new key (trackers)
    "load_best_model_at_end": _a("train.load_best", to_bool),  # new key
    "metric_for_best_model": _a("train.best_metric", metric),  # new key
    **{k: _a("train.early_stopping_patience", to_int) for k in ("early_stopping_patience",
                                                                  "early_stopping_steps")},  # new key
    "early_stopping_threshold": _a("train.early_stopping_threshold", to_float),  # new key
    # output
    "output_dir": _a("output.dir"), "wandb_run_name": _a("output.run_name"), "plot_loss": _a("output.plot", to_bool),
    # generate
    "do_sample": _a("generate.temperature", lambda v: SKIP if to_bool(v) else 0.0),
    "no_repeat_ngram_size": _a("generate.no_repeat_ngram_size", to_int),  # new key
}

# nekotune leaves that the other tools also use under the same name: written flat (`lr: 1e-4`,
# `seed: 1`) they mean nekotune's key. `seed` and `batch_size` are in two sections: the training
# one, as in every trainer. Values are converted by config validation, as for nested keys.
SAME_NAME = {
    **{k: f"train.{k}" for k in ("seed", "batch_size", "max_steps", "warmup_ratio", "weight_decay", "max_grad_norm",
                                 "logging_steps", "save_total_limit", "epochs", "lr", "grad_accum", "scheduler",
                                 "grad_checkpointing", "liger", "nan_policy", "num_threads")},
    **{k: f"data.{k}" for k in ("val_size", "val_path", "split", "max_seq_len", "max_rows", "train_on_prompt",
                                "packing", "shuffle", "system_prompt", "enable_thinking", "truncation", "columns")},
    **{k: f"lora.{k}" for k in ("r", "use_dora", "use_rslora")},
    **{k: f"model.{k}" for k in ("attn_implementation", "quantization", "device", "chat_template", "gguf_file",
                                 "name_or_path")},
    **{k: f"generate.{k}" for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")},
    "run_name": "output.run_name", "sample_prompts": "output.sample_prompts",
}

# Keys that only mean something together with others; `_post` reads them from the raw mapping.
CONTEXTUAL = {"eval_strategy", "evaluation_strategy", "save_strategy", "save_steps", "eval_steps", "warmup_steps",
              "checkpoint_every_epoch_frac", "source_max_len", "target_max_len", "greater_is_better",
              "prompt_template_name", "wandb_project", "dataset", "use_swanlab", *lf.CONTEXTUAL}

# Accepted with a warning: they change nothing nekotune learns (or nekotune does it its own way).
IGNORED: dict[str, str] = {
    "do_train": "nekotune train always trains", "do_eval": "nekotune evaluates when there is validation data",
    "do_predict": "use nekotune predict", "overwrite_output_dir": "nekotune never overwrites a run; "
    "it makes a new run directory, or resumes with train.resume=true",
    "overwrite_cache": "nekotune keeps no tokenized cache", "preprocessing_num_workers": "tokenizing runs in-process",
    "preprocessing_batch_size": "tokenizing runs in-process", "dataloader_num_workers": "batches are built in-process",
    "dataloader_pin_memory": "", "ddp_timeout": "", "ddp_find_unused_parameters": "", "ddp_backend": "",
    "logging_first_step": "nekotune always logs the first step", "logging_strategy": "nekotune logs every "
    "train.logging_steps", "disable_tqdm": "nekotune prints its own progress", "log_level": "", "log_on_each_node": "",
    "remove_unused_columns": "", "save_only_model": "checkpoints keep the optimizer state so they can resume",
    "save_safetensors": "nekotune always writes safetensors", "per_device_eval_batch_size": "evaluation uses "
    "train.batch_size", "group_by_length": "nekotune packs rows without padding, so grouping by length saves "
    "nothing", "optim": "nekotune uses torch AdamW", "data_seed": "train.seed also seeds the data order",
    "logging_dir": "TensorBoard logs go to <run>/tb", "add_eos_token": "the chat template ends every answer",
    "use_fast_tokenizer": "", "cache_dir": "set HF_HOME (or MODELSCOPE_CACHE) instead",
    "use_auth_token": "put the token in HF_TOKEN, never in a config", "hf_hub_token": "put the token in HF_TOKEN",
    "ms_hub_token": "put the token in MODELSCOPE_API_TOKEN", "wandb_watch": "set WANDB_WATCH",
    "wandb_log_model": "set WANDB_LOG_MODEL", "low_cpu_mem_usage": "", "double_quant": "4-bit loading always uses "
    "double quantization", "double_quantization": "4-bit loading always uses double quantization",
    "bnb_4bit_use_double_quant": "4-bit loading always uses double quantization", "bnb_4bit_compute_dtype":
    "4-bit layers compute in model.dtype", "include_effective_tokens_per_second": "run.json records tokens/s",
    "torch_compile": "", "tf32": "", "eval_on_start": "", "task_type": "nekotune trains causal LMs",
    "inference_mode": "", "push_to_hub": "upload the run's adapter/ yourself",
    "hub_model_id": "upload the run's adapter/ yourself", **lf.IGNORED,
}

# Refused: they change what is learned and nekotune has no equivalent. Each says what to do.
UNSUPPORTED: dict[str, str] = {
    "label_smoothing_factor": "remove it", "neftune_noise_alpha": "remove it", "adam_beta1": "remove it",
    "adam_beta2": "remove it", "adam_epsilon": "remove it", "lr_scheduler_kwargs": "use train.scheduler",
    "deepspeed": "nekotune shards with FSDP through --nproc (docs/distributed.md)", "fsdp": "use --nproc",
    "fsdp_config": "use --nproc", "auto_find_batch_size": "use `nekotune estimate --fit <memory>`",
    "num_beams": "nekotune samples or decodes greedily (generate.temperature=0)", "length_penalty": "remove it",
    "bias": "nekotune trains LoRA weights only", "init_lora_weights": "nekotune starts LoRA from peft's default",
    "layers_to_transform": "use lora.target_modules", "layers_pattern": "use lora.target_modules",
    "rank_pattern": "use one lora.r", "alpha_pattern": "use one lora.alpha", "exclude_modules": "list "
    "lora.target_modules instead", "use_qalora": "remove it", "target_parameters": "use lora.target_modules",
    "quant_type": "nekotune quantizes to nf4", "bnb_4bit_quant_type": "nekotune quantizes to nf4",
    "lora_bias": "remove it", "modules_to_save_kwargs": "remove it", **lf.UNSUPPORTED,
}
# The tools' defaults: an UNSUPPORTED key set to its default asks for nothing nekotune lacks.
HARMLESS_DEFAULTS: dict[str, Any] = {
    "bias": "none", "lora_bias": False, "init_lora_weights": True, "quant_type": "nf4", "bnb_4bit_quant_type": "nf4",
    "label_smoothing_factor": 0.0, "neftune_noise_alpha": None, "num_beams": 1, "length_penalty": 1.0,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "auto_find_batch_size": False,
    "use_qalora": False, "deepspeed": None, "fsdp": "", **lf.HARMLESS_DEFAULTS,
}


def known_names() -> set[str]:
    """Every flat name this module translates, warns about or refuses."""
    return set(ALIASES) | set(SAME_NAME) | CONTEXTUAL | set(IGNORED) | set(UNSUPPORTED)



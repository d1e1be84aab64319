"""Rows e and e-bf16: LLaMA-Factory's own training entry point (run_exp), run in
bench/.venvs/llamafactory, on the same rows written as an Alpaca dataset.

Row e keeps LLaMA-Factory's defaults besides the job's settings (fp32 on CPU, its default
gradient checkpointing, loss on the answer only, the chatml template without SmolLM2's default
system prompt). Row e-bf16 adds bf16: true (which on CPU needs use_cpu: true, set for both).

    bench/.venvs/llamafactory/bin/python bench/jobs/llamafactory_job.py <job.json>
"""

import json
import os

from common import job, make_callback, report, rows

cfg = job()
data_dir = cfg["out"] + "/lf_data"
os.makedirs(data_dir, exist_ok=True)
with open(f"{data_dir}/neko.json", "w", encoding="utf-8") as fh:
    json.dump([{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in rows(cfg["train_file"])],
              fh, ensure_ascii=False)
with open(f"{data_dir}/dataset_info.json", "w", encoding="utf-8") as fh:
    json.dump({"neko": {"file_name": "neko.json"}}, fh)

from llamafactory.train.tuner import run_exp  # noqa: E402

bf16 = cfg["precision"] == "bf16"
args = {"model_name_or_path": cfg["model"], "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": cfg["r"], "lora_alpha": cfg["alpha"], "lora_target": ",".join(cfg["targets"]),
        "dataset": "neko", "dataset_dir": data_dir, "template": "chatml", "cutoff_len": cfg["max_len"],
        "output_dir": cfg["out"] + "/adapter", "overwrite_output_dir": True,
        "per_device_train_batch_size": cfg["batch"], "num_train_epochs": cfg["epochs"],
        "learning_rate": cfg["lr"], "lr_scheduler_type": "cosine", "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "use_cpu": True, "bf16": bf16, "seed": 42}
callback = make_callback()
run_exp(args, callbacks=[callback])
report(cfg, callback, {"precision": "bf16 autocast" if bf16 else "fp32", "gradient_checkpointing": "default (on)",
                       "loss_on": "answer tokens"})

"""LLaMA-Factory's own trainer (run in bench/.venvs/llamafactory) on the same rows."""

import json
import os

from common import Timer, job, report

cfg = job()
data_dir = cfg["out"] + "/lf_data"
os.makedirs(data_dir, exist_ok=True)
rows = json.load(open(cfg["train_file"]))
json.dump([{"instruction": r["instruction"], "input": "", "output": r["output"]} for r in rows],
          open(f"{data_dir}/neko.json", "w"), ensure_ascii=False)
json.dump({"neko": {"file_name": "neko.json"}}, open(f"{data_dir}/dataset_info.json", "w"))
from llamafactory.train.tuner import run_exp  # noqa: E402

args = {"model_name_or_path": cfg["model"], "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": cfg["r"], "lora_alpha": cfg["alpha"], "lora_target": ",".join(cfg["targets"]),
        "dataset": "neko", "dataset_dir": data_dir, "template": "chatml", "cutoff_len": cfg["max_len"],
        "output_dir": cfg["out"] + "/adapter", "per_device_train_batch_size": cfg["batch"],
        "num_train_epochs": cfg["epochs"], "learning_rate": cfg["lr"], "lr_scheduler_type": "cosine",
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": True, "bf16": False}
with Timer() as t:
    run_exp(args)
state = json.load(open(cfg["out"] + "/adapter/trainer_state.json")) if os.path.exists(cfg["out"] + "/adapter/trainer_state.json") else {}
report(cfg["out"], t.seconds, [h["loss"] for h in state.get("log_history", []) if "loss" in h])

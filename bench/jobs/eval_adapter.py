"""The one evaluation every row gets (run in the main venv, in its own process).

Loads the job's base model in fp32, attaches a tool's saved PEFT adapter (or none, for the
untrained baseline) and computes nekotune.evaluation.masked_loss on the held-out rows: token-
weighted cross-entropy over the assistant tokens only (the answer and its end-of-turn token),
each row rendered by the model's own chat template (which adds SmolLM2's default system
prompt) and cut at the job's max length. Identical code and settings for every tool, so the
numbers compare even though the tools train on differently rendered and masked sequences.

    python bench/jobs/eval_adapter.py <job.json> <adapter dir | --base>   -> prints EVAL {json}
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nekotune.config import DataConfig
from nekotune.data import load_conversations
from nekotune.data.render import Renderer
from nekotune.evaluation import masked_loss


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    adapter = None if sys.argv[2] == "--base" else Path(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        if not (adapter / "adapter_model.safetensors").is_file():
            raise SystemExit(f"{adapter} has no adapter_model.safetensors")
        model = PeftModel.from_pretrained(model, str(adapter))
    data_cfg = DataConfig(max_seq_len=cfg["max_len"])
    convs, _ = load_conversations(cfg["eval_file"], data_cfg)
    result = masked_loss(model, Renderer.from_config(tok, data_cfg), convs)
    print("EVAL " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

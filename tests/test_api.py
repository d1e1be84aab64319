"""The Python API: the README's example runs (on a tiny model), and `import nekotune` stays light."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "api.py"
MARKER = "# -- the README's example"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def test_the_readme_shows_the_example_that_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    shown = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = EXAMPLE.read_text(encoding="utf-8")
    runs = example[example.index("\n", example.index(MARKER)) + 1:]
    assert shown.strip().endswith(runs.strip())
    assert "import nekotune" in shown


def test_the_example_trains_chats_evaluates_merges_and_exports(tiny_llama, qa_file, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tiny_llama), str(qa_file), str(out)],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next(p for p in out.iterdir() if (p / "run.json").is_file())
    first = proc.stdout.splitlines()[0]
    assert first.startswith(str(run)) and float(first.split()[-1]) > 0  # run.dir and run.metrics["final_loss"]
    assert "| eval_loss |" in proc.stdout and "MB to train" in proc.stdout
    assert (out / "merged" / "config.json").is_file() and (out / "neko.gguf").stat().st_size > 0
    assert (run / "eval" / "eval_results.json").is_file()


def test_import_is_light_and_names_the_api():
    code = ("import sys, nekotune; heavy = [m for m in ('nekotune.api', 'torch', 'transformers', 'pydantic') "
            "if m in sys.modules]; print(heavy); print(nekotune.train.__module__, nekotune.Config.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    heavy, names = proc.stdout.splitlines()
    assert heavy == "[]"  # nothing but the version until an API name is used
    assert names == "nekotune.api Config"


def test_the_api_says_what_it_refuses(tmp_path):
    import pytest

    import nekotune

    cfg = nekotune.Config.load(None, ["data.format=qa"])
    with pytest.raises(nekotune.UserError, match="training stage 'ppo' is not one of sft, pt, dpo, orpo, simpo, kto"):
        nekotune.train(cfg, stage="ppo")
    with pytest.raises(nekotune.UserError, match="trains on data.format text"):
        nekotune.train(cfg, stage="pt")
    with pytest.raises(nekotune.UserError, match="inference engine 'tensorrt' is not one of auto, transformers"):
        nekotune.load(tmp_path, engine="tensorrt")
    with pytest.raises(nekotune.UserError, match="inference engine vllm serves only"):  # issue 19
        nekotune.load(tmp_path, engine="vllm")

"""A run directory is data: opening one (ask, chat, serve, merge, export, eval, the UI) never runs its code.

The hostile run here has an adapter whose tokenizer_config.json maps AutoTokenizer to a .py file in
the adapter that writes a marker file, and a config.yaml that turns trust_remote_code on, names a
revision, a hub attention kernel and a template file outside the run.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nekotune.cli import main
from nekotune.config import load_config

EVIL_CLASS = "EvilTokenizer"


def _cfg(*overrides):
    return load_config(None, list(overrides), default_to_demo=False)


def _hostile_run(root: Path, base: Path, keep_class: bool = True) -> tuple[Path, Path]:
    """(run directory, marker path). The .py is unique per run, so no import cache can hide a run of it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, marker = root / "downloaded-run", root / f"MARKER-{uuid.uuid4().hex}"
    adapter = run / "adapter"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(adapter, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    (adapter / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code from the run ran')\n"
        f"from transformers import PreTrainedTokenizerFast\n\n\nclass {EVIL_CLASS}(PreTrainedTokenizerFast):\n"
        f"    pass\n")
    tok_cfg_path = adapter / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": [None, f"tokenization_evil.{EVIL_CLASS}"]}
    if not keep_class:
        tok_cfg.pop("tokenizer_class", None)
    tok_cfg_path.write_text(json.dumps(tok_cfg))
    outside = root / "outside.jinja"
    outside.write_text("LEAKED {{ messages }}")
    import yaml

    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(base), "trust_remote_code": True, "revision": "evil-branch",
                  "attn_implementation": "kernels-community/evil-kernel", "chat_template": str(outside)},
        "data": {"system_prompt": "Be a cat."},
        "generate": {"max_new_tokens": 4, "temperature": 0.0},
    }))
    return run, marker


@pytest.fixture
def hostile(tiny_llama, tmp_path):
    return _hostile_run(tmp_path, tiny_llama)


def _nekotune(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "nekotune", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_ask_on_a_hostile_run_runs_none_of_its_code(hostile, tmp_path):
    run, marker = hostile
    # a fresh process: nothing imported before can stand in for the run's module
    proc = _nekotune("ask", "hello", "--model", str(run), env_extra={"HF_MODULES_CACHE": str(tmp_path / "mods")})
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "mods").exists()  # transformers never even copied the run's code
    assert "model.revision=evil-branch" in proc.stderr  # the dropped revision is named, with what to do


def test_a_run_passes_on_prompt_settings_but_nothing_that_runs_code(hostile):
    from nekotune.model import effective_config, load_tokenizer, resolve

    run, marker = hostile
    spec = resolve(str(run))
    cfg = effective_config(_cfg(), spec)
    assert cfg.data.system_prompt == "Be a cat." and cfg.generate.max_new_tokens == 4
    assert cfg.model.trust_remote_code is False
    assert cfg.model.revision is None and cfg.model.attn_implementation is None
    assert cfg.model.chat_template is None  # outside the run: never read
    tok = load_tokenizer(spec, cfg.model)
    assert type(tok).__name__ != EVIL_CLASS and "LEAKED" not in (tok.chat_template or "")
    assert not marker.exists()
    # the user's own settings still win, on the command line as in a YAML
    mine = effective_config(_cfg("model.revision=v1", "model.attn_implementation=eager"), spec)
    assert mine.model.revision == "v1" and mine.model.attn_implementation == "eager"
    # a template file inside the run is the run's own data and is kept (relative to the run)
    (run / "template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    text = (run / "config.yaml").read_text().replace(str(run.parent / "outside.jinja"), "template.jinja")
    (run / "config.yaml").write_text(text)
    assert effective_config(_cfg(), resolve(str(run))).model.chat_template == str((run / "template.jinja").resolve())
    # a symlink inside the run that points out of it is outside
    (run / "template.jinja").unlink()
    (run / "template.jinja").symlink_to(run.parent / "outside.jinja")
    assert effective_config(_cfg(), resolve(str(run))).model.chat_template is None


def test_merge_export_and_serve_resolution_run_none_of_its_code(hostile, tmp_path):
    from nekotune.export.gguf import prepare
    from nekotune.commands.export import merge_command
    from nekotune.model import resolve_source
    from nekotune.serve.pool import load_pool

    run, marker = hostile
    _, cfg = resolve_source(_cfg(), str(run))
    assert cfg.model.trust_remote_code is False and cfg.model.revision is None
    source = prepare(_cfg(), str(run))  # export gguf / ollama
    assert type(source.tokenizer).__name__ != EVIL_CLASS and source.cfg.model.trust_remote_code is False
    pool = load_pool(_cfg(), str(run), [])  # serve
    assert type(pool.tokenizer).__name__ != EVIL_CLASS
    out = merge_command(_cfg(), str(run), str(tmp_path / "merged"))
    assert (out / "config.json").is_file()
    assert not list(out.glob("*.py"))  # no code travels into the merged model
    assert not marker.exists()


def test_a_tokenizer_that_needs_its_own_code_is_a_one_line_error(tiny_llama, tmp_path, capsys):
    run, marker = _hostile_run(tmp_path, tiny_llama, keep_class=False)
    capsys.readouterr()
    rc = main(["ask", "hello", "--model", str(run)])
    lines = capsys.readouterr().err.strip().splitlines()
    # the run's revision note comes first (a warning line); the error itself is one line, no traceback
    errors = [line for line in lines if line.startswith("nekotune: error:")]
    assert rc == 2 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in "\n".join(lines)
    err = errors[0]
    assert "tokenization_evil.py" in err and "model.trust_remote_code=true yourself" in err
    assert not marker.exists()


def test_the_users_own_trust_remote_code_runs_it_and_says_what(hostile, tmp_path):
    run, marker = hostile
    proc = _nekotune("ask", "hello", "--model", str(run), "model.trust_remote_code=true",
                     env_extra={"HF_MODULES_CACHE": str(tmp_path / "mods")})
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()  # the user asked for it
    warning = next(line for line in proc.stderr.splitlines() if "trust_remote_code=true" in line)
    assert "tokenization_evil.py" in warning and f"AutoTokenizer -> tokenization_evil.{EVIL_CLASS}" in warning


def test_a_run_trained_with_a_template_file_elsewhere_still_renders_with_it(tiny_llama, qa_file, tmp_path):
    """The template file's path is not passed on, but its text is: the adapter's tokenizer carries it."""
    from conftest import tiny_overrides
    from nekotune.model import load_for_inference
    from nekotune.training import train

    template = tmp_path / "elsewhere" / "custom.jinja"
    template.parent.mkdir()
    template.write_text("{% for m in messages %}<<{{ m.role }}>>{{ m.content }}<</{{ m.role }}>>{% endfor %}"
                        "{% if add_generation_prompt %}<<assistant>>{% endif %}")
    run = train(_cfg(*tiny_overrides(tiny_llama, qa_file, tmp_path / "run", **{
        "train.max_steps": 1, "model.chat_template": str(template), "data.train_on_prompt": "true"})),
        show_progress=False)
    loaded = load_for_inference(_cfg(), str(run))
    assert loaded.cfg.model.chat_template is None
    assert loaded.renderer.template == template.read_text()

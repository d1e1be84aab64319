"""Files: nekotune never deletes or overwrites what it did not write, never writes into what it
reads, keeps UI and config paths inside output.root, and replaces its own outputs atomically."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nekotune.config import load_config
from nekotune.errors import UserError
from nekotune.io import (MARKER, atomic_dir, atomic_file, atomic_write_bytes, check_output_file,
                         claim_output_dir, claim_run_dir, marker_of, recover_dir)


def _cfg(*overrides):
    return load_config(None, list(overrides), default_to_demo=False)


def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work")
    return path


def _one_line_exit_2(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- the rule, in io.py ---------------------------------------------------------------------------
def test_claim_refuses_a_user_directory_and_leaves_it(tmp_path):
    mine = _user_dir(tmp_path / "mine")
    with pytest.raises(UserError, match="not empty and is not an earlier `nekotune merge` output"):
        claim_output_dir(mine, "nekotune merge")
    assert (mine / "thesis.txt").read_text() == "years of work"
    (tmp_path / "empty").mkdir()
    assert claim_output_dir(tmp_path / "empty", "nekotune merge") == tmp_path / "empty"
    assert claim_output_dir(tmp_path / "new", "nekotune merge") == tmp_path / "new"


def test_claim_allows_only_an_earlier_output_of_the_same_command(tmp_path):
    with atomic_dir(tmp_path / "out", "nekotune export ollama") as tmp:
        (tmp / "Modelfile").write_text("FROM ./x.gguf\n")
    info = json.loads((tmp_path / "out" / MARKER).read_text())
    assert info["written_by"] == "nekotune export ollama" and info["nekotune_version"]
    claim_output_dir(tmp_path / "out", "nekotune export ollama")
    with pytest.raises(UserError, match="earlier `nekotune merge` output"):
        claim_output_dir(tmp_path / "out", "nekotune merge")
    legacy = _user_dir(tmp_path / "legacy")
    (legacy / "nekotune_merge.json").write_text("{}")  # a merge written before the marker existed
    assert marker_of(legacy) == "nekotune merge"
    claim_output_dir(legacy, "nekotune merge")


@pytest.mark.parametrize("where", ["equal", "inside", "above"])
def test_claim_refuses_the_source_itself_inside_it_and_above_it(tmp_path, where):
    source = tmp_path / "runs" / "run"
    source.mkdir(parents=True)
    out = {"equal": source, "inside": source / "merged", "above": tmp_path / "runs"}[where]
    word = {"equal": "is", "inside": "is inside", "above": "contains"}[where]
    with pytest.raises(UserError, match=f"{word} {re.escape(str(source.resolve())) if where == 'equal' else '.*'}, "
                                        f"which this command reads"):
        claim_output_dir(out, "nekotune merge", [source])
    with pytest.raises(UserError, match="is inside .*which this command reads"):
        check_output_file(source / "sub" / "m.gguf", [source])


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_claim_refuses_links_and_files(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UserError, match="symbolic link"):
        claim_output_dir(tmp_path / "link", "nekotune merge")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        claim_output_dir(tmp_path / "f", "nekotune merge")


def test_a_directory_filled_while_writing_is_left_alone(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(UserError, match="not empty"):
        with atomic_dir(target, "nekotune merge") as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            _user_dir(target)  # someone put their files there meanwhile
    assert (target / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_output_file_overwrites_only_its_own(tmp_path):
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"GGUF something else")
    with pytest.raises(UserError, match="was not written by nekotune"):
        check_output_file(theirs)
    assert theirs.read_bytes() == b"GGUF something else"
    assert check_output_file(theirs, ours=lambda p: True) == theirs
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(UserError, match="not a file"):
        check_output_file(tmp_path / "d.gguf")


def test_run_dir_may_be_new_empty_or_a_run(tmp_path):
    claim_run_dir(tmp_path / "new")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    claim_run_dir(run)
    with pytest.raises(UserError, match=r"output.dir .* is not a nekotune run"):
        claim_run_dir(_user_dir(tmp_path / "documents"))


# -- atomic_dir: never a moment without the target, and recovery ------------------------------------
def _tree(path: Path) -> dict:
    return {p.name: p.read_text() for p in path.iterdir()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_atomic_dir_swaps_in_one_step(tmp_path, monkeypatch):
    from nekotune import io

    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(io.os, "replace", lambda a, b: (moved.append(Path(a)), real_replace(a, b)))
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert target not in moved  # the old directory was never renamed away: exchanged in one step
    assert _tree(target) == {"a": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


CRASH_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from nekotune import io
io._exchange = lambda a, b: False  # the two-step swap of systems without an exchange
real = os.replace
def replace(a, b):
    real(a, b)
    if Path(b).name.endswith(".old"):
        os._exit(3)  # killed between the two renames
io.os.replace = replace
with io.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "a").write_text("new")
"""


def test_atomic_dir_killed_between_the_renames_recovers(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(target)], env=env)
    assert proc.returncode == 3 and not target.exists()  # the window the exchange closes
    with pytest.raises(RuntimeError):
        with atomic_dir(target):  # the next write starts by putting the previous directory back
            raise RuntimeError("this write fails too")
    assert _tree(target) == {"a": "old"}
    assert not recover_dir(target)


def test_atomic_dir_interrupted_between_the_renames_puts_the_old_one_back(tmp_path, monkeypatch):
    from nekotune import io

    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("old")
    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    real = os.replace

    def replace(a, b):
        if Path(a).name.endswith(".tmp") and Path(b) == target:
            raise KeyboardInterrupt  # Ctrl-C lands between the two renames
        real(a, b)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("new")
    assert _tree(target) == {"a": "old"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_file_modes_are_set_without_touching_the_umask(tmp_path, monkeypatch):
    from nekotune import io

    def no_umask(*a):
        raise AssertionError("os.umask changes the mask of every thread; nekotune must not call it")

    monkeypatch.setattr(os, "umask", no_umask)
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    with atomic_file(tmp_path / "g.gguf") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "d", "nekotune merge") as tmp:
        (tmp / "x").write_text("x")
    monkeypatch.undo()
    if os.name == "posix":
        mask = os.umask(0o022)
        os.umask(mask)
        assert io.UMASK == mask
        for name, mode in (("f.json", 0o666), ("g.gguf", 0o666), ("d", 0o777)):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode & ~mask, name


def test_no_umask_call_left_in_the_code():
    src = Path(__file__).parents[1] / "src" / "nekotune"
    calls = [f"{p.name}:{i}" for p in src.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
             if "os.umask(0)" in line.replace(" ", "")]
    assert calls == []


# -- config and UI paths stay inside output.root ------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "../../etc", "a/b", "..", ".", "a\\b", "c:evil"])
def test_run_name_is_a_plain_name(name):
    with pytest.raises(UserError, match=r"config key `output.run_name` .*plain directory name"):
        _cfg(f"output.run_name={name}")


def test_run_name_from_a_yaml_file_cannot_leave_the_root(tmp_path):
    (tmp_path / "evil.yaml").write_text("output:\n  run_name: ../../home\n")
    from nekotune.cli import main

    assert main(["config", "show", str(tmp_path / "evil.yaml")]) == 2


# -- the commands -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    """A finished run as training leaves it (config.yaml + adapter/), without the seconds of training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("outputs") / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(_cfg(f"model.name_or_path={tiny_llama}").to_yaml())
    return run


def _tree_files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_export_ollama_refuses_a_user_directory(run_dir, tmp_path, capsys):
    from nekotune.cli import main

    mine = _user_dir(tmp_path / "mine")
    rc = main(["export", "ollama", "--model", str(run_dir), "--type", "q8_0", "--out", str(mine)])
    assert "not an earlier `nekotune export ollama` output" in _one_line_exit_2(capsys, rc)
    assert _tree_files(mine) == ["thesis.txt"] and (mine / "thesis.txt").read_text() == "years of work"


@pytest.mark.parametrize("out", ["run", "run/ollama", "run/adapter", "base"])
def test_export_ollama_refuses_to_write_into_what_it_reads(run_dir, tiny_llama, capsys, out):
    from nekotune.cli import main

    before = _tree_files(run_dir)
    target = {"run": run_dir, "run/ollama": run_dir / "ollama", "run/adapter": run_dir / "adapter",
              "base": tiny_llama}[out]
    rc = main(["export", "ollama", "--model", str(run_dir), "--type", "q8_0", "--out", str(target)])
    assert "which this command reads" in _one_line_exit_2(capsys, rc)
    assert _tree_files(run_dir) == before and (Path(tiny_llama) / "config.json").is_file()


def test_export_ollama_rewrites_its_own_output(run_dir, tmp_path, capsys):
    from nekotune.commands.export import ollama_command

    out = ollama_command(_cfg(), str(run_dir), str(tmp_path / "ollama"), "q8_0")
    assert marker_of(out) == "nekotune export ollama"
    (out / "Modelfile").write_text("stale")
    out = ollama_command(_cfg(), str(run_dir), str(tmp_path / "ollama"), "f16")
    assert (out / "Modelfile").read_text().startswith("FROM ./run-f16.gguf")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "Modelfile", "run-f16.gguf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ollama"]  # nothing left aside


def test_merge_refuses_the_adapter_dir_and_a_user_dir(run_dir, tmp_path, capsys):
    from nekotune.cli import main

    for out in (run_dir / "adapter" / "merged", run_dir / "adapter", run_dir / "merged"):
        rc = main(["merge", "--model", str(run_dir), "--out", str(out)])
        assert "which this command reads" in _one_line_exit_2(capsys, rc)
    assert not (run_dir / "merged").exists() and not (run_dir / "adapter" / "merged").exists()
    rc = main(["merge", "--model", str(run_dir), "--out", str(_user_dir(tmp_path / "mine"))])
    assert "nekotune merge" in _one_line_exit_2(capsys, rc)
    assert _tree_files(tmp_path / "mine") == ["thesis.txt"]


def test_merge_rewrites_its_own_output_and_exports_next_to_it(run_dir, tmp_path, capsys):
    from nekotune.cli import main

    assert main(["merge", "--model", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    assert main(["merge", "--model", str(run_dir), "--out", str(tmp_path / "merged"), "--dtype", "bf16"]) == 0
    assert marker_of(tmp_path / "merged") == "nekotune merge"
    capsys.readouterr()
    rc = main(["export", "gguf", "--model", str(tmp_path / "merged"), "--out", str(tmp_path / "merged" / "m.gguf")])
    assert "which this command reads" in _one_line_exit_2(capsys, rc)


def test_export_gguf_overwrites_only_a_gguf_it_wrote(run_dir, tmp_path, capsys):
    import gguf

    from nekotune.cli import main
    from nekotune.export.gguf import WRITTEN_BY_KEY

    theirs = tmp_path / "theirs.gguf"
    writer = gguf.GGUFWriter(theirs, "llama")  # a valid GGUF from another tool
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    before = theirs.read_bytes()
    for out in (theirs, run_dir / "m.gguf", run_dir / "adapter" / "m.gguf"):
        rc = main(["export", "gguf", "--model", str(run_dir), "--type", "f16", "--out", str(out)])
        _one_line_exit_2(capsys, rc)
    assert theirs.read_bytes() == before and not (run_dir / "m.gguf").exists()
    ours = tmp_path / "ours.gguf"
    assert main(["export", "gguf", "--model", str(run_dir), "--type", "f16", "--out", str(ours)]) == 0
    # again over it; with llama.cpp's quantizer (Q4_K_M), which must keep the mark for the file to stay ours
    again = "q4_k_m" if importlib.util.find_spec("llama_cpp") else "q8_0"
    assert main(["export", "gguf", "--model", str(run_dir), "--type", again, "--out", str(ours)]) == 0
    assert gguf.GGUFReader(ours).fields[WRITTEN_BY_KEY].contents() == "nekotune export gguf"


# -- the web UI's Train and Export tabs ----------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path, tiny_llama):
    pytest.importorskip("gradio")
    from nekotune.ui.workspace import Workspace

    return Workspace(_cfg(f"output.root={tmp_path / 'outputs'}", f"model.name_or_path={tiny_llama}"))


def _train_values(run_name, data="data.json"):
    return ["", data, "", 4, 8, 1e-3, 1, 2, 2, 64, run_name]


def test_ui_train_tab_keeps_runs_inside_the_root(workspace, tmp_path):
    from nekotune.ui.tabs import training_config

    with pytest.raises(UserError, match="output.run_name"):
        training_config(workspace, *_train_values("../../escape"))
    _user_dir(tmp_path / "outputs" / "notes")
    with pytest.raises(UserError, match="not a nekotune run"):
        training_config(workspace, *_train_values("notes"))
    if os.name != "nt":  # a link inside the root that leads out of it
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "outputs" / "link").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(UserError, match="outside output.root"):
            training_config(workspace, *_train_values("link"))
    assert training_config(workspace, *_train_values("fresh")).output.run_name == "fresh"


def test_ui_export_tab_writes_only_inside_the_root_and_never_into_the_run(workspace, tmp_path):
    import gradio as gr

    from nekotune.ui.tabs import default_export_path, export_path, run_export

    run = str(tmp_path / "outputs" / "run")
    root = tmp_path / "outputs"
    for action in ("merge", "gguf", "ollama"):
        default = default_export_path(run, action, "q8_0", root)
        assert default.parent == root and not default.is_relative_to(run)
    assert export_path(workspace, "x/y", run, "merge", "q8_0") == root / "x" / "y"
    for bad in ("../../escape", str(tmp_path / "elsewhere"), str(root)):
        with pytest.raises(UserError, match="outside output.root"):
            export_path(workspace, bad, run, "merge", "q8_0")
    with pytest.raises(gr.Error, match="outside output.root"):
        run_export(workspace, run, "ollama", "q8_0", "auto", False, "/tmp/anywhere")

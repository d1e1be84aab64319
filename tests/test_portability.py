"""nekotune on native Windows (and any non-UTF-8 console), checked from Linux.

1. The CLI runs in a child Python where nekotune's own imports of Unix-only modules fail and
   signal/os lack their POSIX-only names, as on Windows (tests/portability_fixtures.py).
2. A source-level check: no unguarded Unix-only import or call in src/nekotune.
3. Every text file nekotune opens names its encoding, and the CLI reads Chinese configs and
   data in a process whose locale encoding is ASCII (a stand-in for a GBK code page).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from portability_fixtures import POSIX_ONLY_OS, UNIX_ONLY_MODULES, WINDOWS_LIKE_SITECUSTOMIZE, WINDOWS_SIGNAL_NAMES

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "nekotune"
TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "vocab_size": 1000, "tie_word_embeddings": True}


def _child_env(tmp_path: Path, windows_like: bool = True, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_"))}
    paths = [str(SRC)]
    if windows_like:
        site = tmp_path / "windows-like-site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(WINDOWS_LIKE_SITECUSTOMIZE, encoding="utf-8")
        paths.insert(0, str(site))
    env.update({"PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "NEKOTUNE_LANG": "en", **extra})
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=600)


@pytest.fixture
def project(tmp_path: Path, tiny_llama: Path) -> dict[str, Path]:
    """A user's folder with spaces in its name: a config, a dataset, a model config."""
    home = tmp_path / "My Documents" / "neko project"
    home.mkdir(parents=True)
    data = home / "train data.json"
    data.write_text(json.dumps([{"instruction": f"问题 {i}？", "output": f"回答 {i}，喵~"} for i in range(6)],
                               ensure_ascii=False), encoding="utf-8")
    config = home / "my config.yaml"
    config.write_text(f"model:\n  name_or_path: '{tiny_llama}'\ndata:\n  path: '{data}'\n"
                      f"  system_prompt: 你是一只猫娘。\n  max_seq_len: 64\ntrain:\n  batch_size: 2\n",
                      encoding="utf-8")
    model_config = home / "tiny model" / "config.json"
    model_config.parent.mkdir()
    model_config.write_text(json.dumps(TINY_CONFIG), encoding="utf-8")
    return {"home": home, "data": data, "config": config, "model_config": model_config, "model": tiny_llama}


def test_the_blocker_blocks(tmp_path: Path):
    """The fixture itself: inside a nekotune.* module the Unix-only names are gone."""
    probe = tmp_path / "probe" / "nekotune"
    probe.mkdir(parents=True)
    (probe / "__init__.py").write_text("", encoding="utf-8")
    (probe / "p.py").write_text(
        "import os, signal\nout = {'sigkill': hasattr(signal, 'SIGKILL'), 'sigint': hasattr(signal, 'SIGINT'),\n"
        "       'fork': hasattr(os, 'fork'), 'replace': hasattr(os, 'replace')}\n"
        "try:\n    import resource\n    out['resource'] = True\nexcept ImportError:\n    out['resource'] = False\n",
        encoding="utf-8")
    env = _child_env(tmp_path)
    env["PYTHONPATH"] = env["PYTHONPATH"].split(os.pathsep)[0] + os.pathsep + str(probe.parent)
    done = _run(["-c", "import resource, signal; from nekotune import p; print(p.out, hasattr(signal, 'SIGKILL'))"],
                env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("{'sigkill': False, 'sigint': True, 'fork': False, 'replace': True, "
                                   "'resource': False} True")


@pytest.mark.parametrize("command", ["help", "config show", "data check", "estimate"])
def test_cli_runs_without_unix_only_modules(command: str, project: dict[str, Path], tmp_path: Path):
    args = {"help": ["--help"],
            "config show": ["config", "show", str(project["config"])],
            "data check": ["data", "check", str(project["data"]), str(project["config"]), "--model",
                           str(project["model"])],
            "estimate": ["estimate", "--model", str(project["model_config"]), str(project["config"])]}[command]
    done = _run(["-m", "nekotune.cli", *args], _child_env(tmp_path), project["home"])
    assert done.returncode == 0, f"`nekotune {command}` failed without Unix-only modules:\n{done.stderr[-3000:]}"
    expected = {"help": "fine-tune", "config show": "你是一只猫娘。", "data check": "6", "estimate": "total"}[command]
    assert expected in done.stdout


def test_every_module_imports_without_unix_only_modules(tmp_path: Path):
    modules = sorted(".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                     for p in PACKAGE.rglob("*.py"))
    script = ("import importlib, json, sys\nfailed = {}\n"
              f"for name in {modules!r}:\n"
              "    try:\n        importlib.import_module(name)\n"
              "    except Exception as exc:\n        failed[name] = f'{type(exc).__name__}: {exc}'\n"
              "print(json.dumps(failed))\n")
    done = _run(["-c", script], _child_env(tmp_path), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert failed == {}, f"modules that do not import on Windows: {failed}"


# -- the source-level check --------------------------------------------------------------------
UNIX_ONLY_SIGNALS = {"SIGKILL", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGQUIT", "SIGCHLD", "SIGPIPE", "SIGSTOP",
                     "SIGCONT", "SIGTSTP", "SIGWINCH", "alarm", "setitimer", "getitimer", "pause", "siginterrupt",
                     "pthread_kill", "pthread_sigmask", "sigwait"} - set(WINDOWS_SIGNAL_NAMES)
GUARD_WORDS = ("sys.platform", "os.name", "platform.system", "hasattr(", "getattr(")


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST], catches: tuple[str, ...]) -> bool:
    """Inside `if sys.platform ...` / `if hasattr(...)`, or a try that catches `catches`."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, (ast.If, ast.IfExp)) and any(w in ast.unparse(parent.test) for w in GUARD_WORDS):
            return True
        if isinstance(parent, ast.Try) and node in parent.body:
            caught = " ".join(ast.unparse(h.type) if h.type else "BaseException" for h in parent.handlers)
            if any(c in caught for c in catches + ("Exception",)):
                return True
        node = parent
    return False


def unix_only_uses(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = _parents(tree)
        rel = path.relative_to(package.parent)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module") and node.args \
                    and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value).split(".")[0]]
            for name in names:
                if name in UNIX_ONLY_MODULES and not _guarded(node, parents, ("ImportError",)):
                    found.append(f"{rel}:{node.lineno}: import {name}")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                bad = (node.value.id == "signal" and node.attr in UNIX_ONLY_SIGNALS) or \
                      (node.value.id == "os" and node.attr in POSIX_ONLY_OS)
                if bad and not _guarded(node, parents, ("AttributeError",)):
                    found.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_unguarded_unix_only_imports_or_calls():
    assert unix_only_uses() == [], "Unix-only code on nekotune's paths (guard it or use psutil/filelock)"


def test_the_source_check_finds_what_it_should(tmp_path: Path):
    pkg = tmp_path / "nekotune"
    pkg.mkdir()
    (pkg / "bad.py").write_text("import os\nimport resource\nimport signal\n\n"
                                "def f():\n    os.killpg(1, signal.SIGKILL)\n", encoding="utf-8")
    (pkg / "good.py").write_text(
        "import os\nimport signal\nimport sys\ntry:\n    import resource\nexcept ImportError:\n    resource = None\n"
        "if sys.platform != 'win32':\n    os.setsid()\nSIG = getattr(signal, 'SIGHUP', None)\n"
        "if hasattr(signal, 'SIGUSR1'):\n    signal.signal(signal.SIGUSR1, print)\n", encoding="utf-8")
    assert unix_only_uses(pkg) == ["nekotune/bad.py:2: import resource", "nekotune/bad.py:6: os.killpg",
                                   "nekotune/bad.py:6: signal.SIGKILL"]


# -- text files and encodings --------------------------------------------------------------------
def _text_mode(node: ast.Call, position: int) -> bool:
    mode = next((k.value for k in node.keywords if k.arg == "mode"), None)
    if mode is None and len(node.args) > position:
        mode = node.args[position]
    if mode is None:
        return True  # the default mode "r" is text
    return not (isinstance(mode, ast.Constant) and "b" in str(mode.value))


def opens_without_encoding(package: Path = PACKAGE) -> list[str]:
    """Text-mode opens, read_text and write_text without `encoding=`: on Windows they use the
    console code page (cp936 on a Chinese system) instead of UTF-8."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
                continue
            func = ast.unparse(node.func)
            text = False
            if func in ("open", "io.open", "codecs.open"):
                text = _text_mode(node, 1)
            elif func == "os.fdopen":
                text = _text_mode(node, 1)
            elif isinstance(node.func, ast.Attribute) and node.func.attr in ("read_text", "write_text"):
                text = True
            elif isinstance(node.func, ast.Attribute) and node.func.attr == "open" and not (
                    isinstance(node.func.value, ast.Name) and (node.func.value.id[:1].isupper()
                                                               or node.func.value.id == "os")):
                text = not node.args or _text_mode(node, 0)  # Path.open(mode); os.open is bytes
            if text:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {ast.unparse(node)[:90]}")
    return found


def test_every_text_file_is_opened_with_an_encoding():
    assert opens_without_encoding() == [], "add encoding='utf-8' (the console code page is not UTF-8 on Windows)"


def test_chinese_config_and_data_with_an_ascii_locale(project: dict[str, Path], tmp_path: Path):
    """LC_ALL=C without UTF-8 mode: Python's locale encoding is ASCII, like a console whose code
    page cannot decode UTF-8. stdout stays UTF-8 (Windows consoles print Unicode)."""
    env = _child_env(tmp_path, windows_like=False, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0",
                     PYTHONIOENCODING="utf-8")
    probe = _run(["-c", "import locale; print(locale.getpreferredencoding(False))"], env, tmp_path)
    assert probe.stdout.strip() in ("ANSI_X3.4-1968", "ascii", "US-ASCII"), probe.stdout
    shown = _run(["-m", "nekotune.cli", "config", "show", str(project["config"])], env, project["home"])
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "你是一只猫娘。" in shown.stdout
    checked = _run(["-m", "nekotune.cli", "data", "check", str(project["data"]), str(project["config"]), "--model",
                    str(project["model"])], env, project["home"])
    assert checked.returncode == 0, checked.stderr[-2000:]

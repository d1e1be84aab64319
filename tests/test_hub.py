"""Model/dataset hubs (nekotune.hub): ModelScope through its package (stubbed), Hugging Face's
bounded probe, unreachable hosts and offline mode, all without the network."""

from __future__ import annotations

import socket
import sys
import threading
import types
from pathlib import Path

import pytest

from nekotune import hub
from nekotune.errors import UserError

MS_ENV = ("MODELSCOPE_REPO_TREE_PAGE_TIMEOUT_SECONDS", "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS",
          "MODELSCOPE_API_CONNECT_TIMEOUT")


@pytest.fixture
def online(monkeypatch):
    """Undo conftest's HF_HUB_OFFLINE=1 for this test (huggingface_hub froze it at import)."""
    import huggingface_hub.constants as constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in MS_ENV + ("NEKOTUNE_HUB", "USE_MODELSCOPE_HUB", "HF_ENDPOINT"):
        monkeypatch.setenv(var, "x")  # recorded, so whatever the code sets is undone after the test
        monkeypatch.delenv(var)


def _one_line(exc: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


# -- choosing the hub ------------------------------------------------------------------------
def test_hub_name(online, monkeypatch):
    assert hub.hub_name(None) == "huggingface"
    assert hub.hub_name("ModelScope") == "modelscope"
    monkeypatch.setenv("NEKOTUNE_HUB", "modelscope")
    assert hub.hub_name(None) == "modelscope"
    assert hub.hub_name("huggingface") == "huggingface"  # the config wins over the environment
    monkeypatch.delenv("NEKOTUNE_HUB")
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")  # LLaMA-Factory's switch
    assert hub.hub_name(None) == "modelscope"
    with pytest.raises(UserError) as e:
        hub.hub_name("gitee", key="data.hub")
    _one_line(e, "data.hub='gitee'", "huggingface, modelscope")
    monkeypatch.setenv("NEKOTUNE_HUB", "civitai")
    with pytest.raises(UserError, match="NEKOTUNE_HUB='civitai'"):
        hub.hub_name(None)


# -- ModelScope through its own package, stubbed ----------------------------------------------
def _fake_modelscope(monkeypatch, calls: list, files: dict[str, str], tmp_path: Path, fail: Exception | None = None):
    def download(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kw):
        calls.append(dict(repo_id=repo_id, revision=revision, allow=allow_patterns, ignore=ignore_patterns, **kw))
        if fail is not None:
            raise fail
        root = tmp_path / "ms-cache" / repo_id
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        return str(root)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(
        snapshot_download=download, dataset_snapshot_download=download))


def test_modelscope_model_resolves_through_the_package(online, monkeypatch, tmp_path):
    import os

    calls: list = []
    _fake_modelscope(monkeypatch, calls, {"config.json": "{}", "model.safetensors": "", "tokenizer.json": "{}"},
                     tmp_path)
    path = hub.download_model("Qwen/Qwen3-0.6B", "modelscope", revision="v1.0")
    assert path == tmp_path / "ms-cache" / "Qwen/Qwen3-0.6B" and (path / "config.json").is_file()
    (call,) = calls
    assert call["repo_id"] == "Qwen/Qwen3-0.6B" and call["revision"] == "v1.0"
    assert "*.safetensors" in call["allow"] and "*.py" not in call["allow"]
    assert {"*.py", "*.bin", "*.pt", "*.pkl"} <= set(call["ignore"])
    assert "local_files_only" not in call
    # its timeouts were bounded before the (lazy) import
    assert os.environ["MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS"] == "1"
    assert os.environ["MODELSCOPE_REPO_TREE_PAGE_TIMEOUT_SECONDS"] == "5"


def test_modelscope_code_only_when_the_user_trusts_it(online, monkeypatch, tmp_path):
    calls: list = []
    _fake_modelscope(monkeypatch, calls, {"config.json": "{}", "model.safetensors": ""}, tmp_path)
    hub.download_model("org/custom", "modelscope", allow_code=True)
    assert "*.py" in calls[0]["allow"] and "*.py" not in calls[0]["ignore"] and "*.bin" in calls[0]["ignore"]


def test_modelscope_repo_without_safetensors_is_refused(online, monkeypatch, tmp_path):
    _fake_modelscope(monkeypatch, [], {"config.json": "{}"}, tmp_path)  # its .bin was never downloaded
    with pytest.raises(UserError) as e:
        hub.download_model("org/pickled", "modelscope")
    _one_line(e, "ModelScope model org/pickled", "safetensors")


def test_modelscope_failure_is_one_line(online, monkeypatch, tmp_path):
    err = ConnectionError("[E1020] Connection failed: HTTPSConnectionPool(host='modelscope.cn')\nTraceback ...")
    _fake_modelscope(monkeypatch, [], {}, tmp_path, fail=err)
    with pytest.raises(UserError) as e:
        hub.download_model("Qwen/Qwen3-0.6B", "modelscope")
    _one_line(e, "ModelScope", "Qwen/Qwen3-0.6B", "E1020", "local path", "model.hub=huggingface")


def test_modelscope_offline_uses_the_cache_only(online, monkeypatch, tmp_path):
    calls: list = []
    _fake_modelscope(monkeypatch, calls, {"config.json": "{}", "model.safetensors": ""}, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.download_model("Qwen/Qwen3-0.6B", "modelscope")
    assert calls[0]["local_files_only"] is True


def test_modelscope_dataset_split_files(online, monkeypatch, tmp_path):
    from nekotune.data.sources import read_rows

    rows = '{"instruction": "hi", "output": "meow"}\n'
    _fake_modelscope(monkeypatch, [], {"train.jsonl": rows, "test.jsonl": rows, "README.md": "# card"}, tmp_path)
    files = hub.download_dataset("AI-ModelScope/alpaca-gpt4-data-zh", "modelscope", split="train")
    assert [f.name for f in files] == ["train.jsonl"]
    assert read_rows(str(files[0]))[0].data["output"] == "meow"
    with pytest.raises(UserError) as e:
        hub.download_dataset("AI-ModelScope/alpaca-gpt4-data-zh", "modelscope", split="validation")
    _one_line(e, "no split 'validation'", "test, train", "data.split")


def test_modelscope_package_missing(online, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import raises ImportError
    with pytest.raises(UserError) as e:
        hub.download_dataset("a/b", "modelscope")
    _one_line(e, "data.hub=modelscope", "pip install 'nekotune[modelscope]'")


def test_bad_ids(online):
    for bad in ("../etc", "a/b/c", "", "https://huggingface.co/x/y"):
        with pytest.raises(UserError, match="not a Hugging Face model id"):
            hub.download_model(bad)


# -- Hugging Face: the bounded probe, then a download at its commit ---------------------------
def test_huggingface_downloads_at_the_probed_commit(online, monkeypatch, tmp_path):
    import huggingface_hub

    sha = "0123456789abcdef0123456789abcdef01234567"
    probed, downloaded = {}, {}

    def model_info(self, repo_id, revision=None, timeout=None, **kw):
        probed.update(repo_id=repo_id, revision=revision, timeout=timeout, endpoint=self.endpoint)
        return types.SimpleNamespace(sha=sha, siblings=[types.SimpleNamespace(rfilename=n) for n in
                                                        ("config.json", "model.safetensors", "modeling_x.py")])

    def snapshot_download(repo_id, **kw):
        downloaded.update(repo_id=repo_id, **kw)
        (tmp_path / "config.json").write_text("{}")
        (tmp_path / "model.safetensors").write_text("")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    assert hub.download_model("Qwen/Qwen3-0.6B", revision="main", timeout=3) == tmp_path
    assert probed == dict(repo_id="Qwen/Qwen3-0.6B", revision="main", timeout=3, endpoint="https://hf-mirror.com")
    assert downloaded["revision"] == sha and downloaded["endpoint"] == "https://hf-mirror.com"
    assert downloaded["etag_timeout"] == 3 and "*.py" in downloaded["ignore_patterns"]


def test_huggingface_pickle_only_repo_refused_before_downloading(online, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: types.SimpleNamespace(
        sha="0" * 40, siblings=[types.SimpleNamespace(rfilename=n) for n in ("config.json", "pytorch_model.bin")]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded anyway"))
    with pytest.raises(UserError) as e:
        hub.download_model("old/model")
    _one_line(e, "old/model", "pytorch_model.bin", "safetensors only")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_refused_connection_fails_with_one_line(online, monkeypatch, kind):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(UserError) as e:
        if kind == "model":
            hub.download_model("Qwen/Qwen3-0.6B", timeout=2)
        else:
            hub.download_dataset("tatsu-lab/alpaca", timeout=2)
    key = "model.hub=modelscope" if kind == "model" else "data.hub=modelscope"
    _one_line(e, "cannot reach Hugging Face", endpoint, "Qwen/Qwen3-0.6B" if kind == "model" else "tatsu-lab/alpaca",
              "HF_ENDPOINT", "hf-mirror.com", key)


@pytest.fixture
def silent_server():
    """A host that accepts connections and never answers (a hung proxy, a black-holed mirror)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:  # timeout: look at the stop flag again
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_silent_host_fails_within_the_probe_timeout(online, monkeypatch, silent_server):
    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    with pytest.raises(UserError) as e:  # bounded by the probe's own timeout, never a hang
        hub.download_model("Qwen/Qwen3-0.6B", timeout=1)
    _one_line(e, "cannot reach Hugging Face", silent_server, "Timeout", "local path", "model.hub=modelscope")


def test_offline_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        hub.download_model("nekotune-tests/never-downloaded")
    _one_line(e, "nekotune-tests/never-downloaded", "not in the local cache", "HF_HUB_OFFLINE", "local path")
    with pytest.raises(UserError) as e:
        hub.download_dataset("nekotune-tests/never-downloaded")
    _one_line(e, "dataset", "HF_HUB_OFFLINE", "data.path")


def test_timeout_setting(monkeypatch):
    monkeypatch.setenv("NEKOTUNE_HUB_TIMEOUT", "2.5")
    assert hub.hub_timeout() == 2.5
    monkeypatch.setenv("NEKOTUNE_HUB_TIMEOUT", "soon")
    with pytest.raises(UserError, match="NEKOTUNE_HUB_TIMEOUT"):
        hub.hub_timeout()

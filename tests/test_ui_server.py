"""`nekotune ui` as a server, without a browser: the Host/Origin check (DNS rebinding), the
login, and no event of the page offered as a public API endpoint (issue 13)."""

from __future__ import annotations

import socket

import httpx
import pytest

gr = pytest.importorskip("gradio")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def page(tiny_llama, tmp_path_factory):
    """The whole nekotune page, served as `nekotune ui --allow-host mybox.lan` would."""
    from nekotune.config import load_config
    from nekotune.ui.app import build_app, launch

    cfg = load_config(None, [f"output.root={tmp_path_factory.mktemp('ui-outputs')}"], default_to_demo=False)
    app = build_app(cfg, model_arg=str(tiny_llama))
    port = free_port()
    launch(app, "127.0.0.1", port, block=False, allow_hosts=["mybox.lan"])
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "app": app}
    app.close()


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}", "[::2]:{port}", ""])
def test_foreign_host_is_403(page, host):
    for path in ("/", "/config", "/gradio_api/info", "/gradio_api/queue/join"):
        resp = httpx.get(page["url"] + path, headers={"Host": host.format(port=page["port"])})
        assert resp.status_code == 403, (path, resp.status_code)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "mybox.lan:{port}",
                                  "MYBOX.LAN"])
def test_own_names_are_served(page, host):
    assert httpx.get(page["url"] + "/", headers={"Host": host.format(port=page["port"])}).status_code == 200


def test_cross_site_requests_are_403(page):
    """Gradio would echo any Origin back; the guard refuses the request before Gradio sees it."""
    join = page["url"] + "/gradio_api/queue/join"
    for origin in ("http://evil.example", "https://evil.example:7860", "null"):
        resp = httpx.post(join, json={"data": [], "fn_index": 0, "session_hash": "x"}, headers={"Origin": origin})
        assert resp.status_code == 403 and "access-control-allow-origin" not in resp.headers
    own = httpx.get(page["url"] + "/config", headers={"Origin": page["url"]})
    assert own.status_code == 200 and own.headers["access-control-allow-origin"] == page["url"]


def test_no_event_is_a_public_api(page):
    """Train, export, upload and chat start work or write files: none is listed as an API endpoint."""
    fns = list(page["app"].fns.values())
    assert fns and all(fn.api_visibility == "private" for fn in fns)
    info = httpx.get(page["url"] + "/gradio_api/info").json()
    assert info["named_endpoints"] == {} and info["unnamed_endpoints"] == {}


def test_auth_requires_a_login():
    from nekotune.ui.app import launch

    with gr.Blocks() as app:
        gr.Markdown("hello")
    port = free_port()
    launch(app, "127.0.0.1", port, block=False, auth=("neko", "a-long-password"))
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(url + "/config").status_code == 401
        assert httpx.post(url + "/login", data={"username": "neko", "password": "wrong"}).status_code == 400
        with httpx.Client() as session:
            login = session.post(url + "/login", data={"username": "neko", "password": "a-long-password"})
            assert login.status_code == 200
            assert session.get(url + "/config").status_code == 200
    finally:
        app.close()


def test_auth_value_is_user_colon_password():
    from nekotune.errors import UserError
    from nekotune.ui.app import parse_auth

    assert parse_auth("neko:pa:ss") == ("neko", "pa:ss")
    assert parse_auth(None) is None and parse_auth("") is None
    for bad in ("neko", ":pw", "neko:"):
        with pytest.raises(UserError, match="USER:PASS"):
            parse_auth(bad)


def test_ui_command_passes_the_flags(monkeypatch, tmp_path):
    """`nekotune ui --allow-host NAME` and NEKOTUNE_UI_AUTH reach launch()."""
    import nekotune.ui.app as ui_app
    from nekotune.cli import main

    seen = {}
    monkeypatch.setenv("NEKOTUNE_UI_AUTH", "neko:from-env")
    monkeypatch.setattr(ui_app, "launch", lambda app, host, port, block, allow_hosts, auth: seen.update(
        host=host, allow_hosts=allow_hosts, auth=auth))
    assert main(["ui", "--allow-host", "mybox.lan", "--port", "0", f"output.root={tmp_path}"]) == 0
    assert seen == {"host": "127.0.0.1", "allow_hosts": ["mybox.lan"], "auth": ("neko", "from-env")}
    assert main(["ui", "--allow-host", "http://mybox.lan"]) == 2
    monkeypatch.setenv("NEKOTUNE_UI_AUTH", "no-colon")
    assert main(["ui"]) == 2

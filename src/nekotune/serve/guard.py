"""What a request must be before `nekotune serve` or `nekotune ui` looks at it.

Both servers listen on this machine, and any web page the user opens can send requests to
them. DNS rebinding points a name the attacker owns at 127.0.0.1, so the browser sends the
attacker's name as `Host`; a plain cross-site request keeps a loopback `Host` but carries the
attacker's page as `Origin`. HostGuard answers 403 to both: it serves only `Host` names that
name the address the server bound (plus names given with --allow-host) and only `Origin`s on
those names (plus the API's --cors origins).

Pure ASGI on purpose: the API (FastAPI) and the UI (Gradio's own FastAPI app) both take it,
and it answers before any route, body parser or queue runs. uvicorn checks no `Host`,
Starlette's TrustedHostMiddleware checks no `Origin`, and Gradio echoes any `Origin` it is sent.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlsplit

from nekotune.errors import UserError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?)*")
_PORT = re.compile(r"\d{1,5}")


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _canonical(name: str) -> str:
    """Lower case, no brackets, no trailing dot: the forms a browser may send for one name."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name[:-1] if name.endswith(".") else name


def _check_allow_host(name: str) -> str:
    canon = _canonical(name)
    if canon == "*" or _ip(canon) is not None or _NAME.fullmatch(canon):
        return canon
    raise UserError(f"--allow-host {name!r}: give a host name or an IP address without scheme or port, "
                    f"e.g. --allow-host mybox.lan (or '*' to turn the Host check off)")


@dataclass(frozen=True)
class HostPolicy:
    """The `Host` names one server answers, and the `Origin`s it lets in."""

    names: frozenset[str]
    any_ip: bool = False  # bound to every interface: an IP literal cannot be rebound to another site
    any_host: bool = False  # --allow-host '*'
    origins: frozenset[str] = frozenset()  # extra exact origins (the API's --cors); "*" lets any in

    def host_ok(self, name: str | None) -> bool:
        if name is None:
            return False
        return self.any_host or name in self.names or (self.any_ip and _ip(name) is not None)

    def origin_ok(self, origin: str) -> bool:
        if "*" in self.origins or origin.rstrip("/").lower() in self.origins:
            return True
        try:
            parts = urlsplit(origin)
            hostname = parts.hostname
        except ValueError:
            return False
        # "null" (sandboxed frames, file:// pages) and other schemes have no host: refused.
        return parts.scheme in ("http", "https") and hostname is not None and self.host_ok(_canonical(hostname))


def host_policy(bind: str, allow_hosts: Iterable[str] = (), cors_origins: Iterable[str] = ()) -> HostPolicy:
    """The allowed set for a server bound to `bind`: loopback names on loopback, the bound name otherwise."""
    bind = _canonical(bind)
    ip = _ip(bind)
    if bind == "localhost" or (ip is not None and ip.is_loopback):
        names, any_ip = set(LOOPBACK_NAMES) | {bind}, False
    elif bind in WILDCARD_BINDS:
        names, any_ip = set(LOOPBACK_NAMES), True
    else:
        names, any_ip = {bind}, False
    extra = {_check_allow_host(h) for h in allow_hosts if h.strip()}
    origins = frozenset(o.strip().rstrip("/").lower() for o in cors_origins if o.strip())
    return HostPolicy(frozenset(names | (extra - {"*"})), any_ip=any_ip, any_host="*" in extra, origins=origins)


def host_name(header: str | None) -> str | None:
    """The name in a `Host` header ("[::1]:8000" -> "::1"), or None when it is malformed."""
    if not header:
        return None
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        name, rest = header[1:end], header[end + 1:]
        if rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:])):
            return None
        return _canonical(name) if _ip(name) is not None else None
    name, sep, port = header.partition(":")
    if sep and not _PORT.fullmatch(port):
        return None  # also an IPv6 literal without brackets, which no browser sends
    return _canonical(name) or None


def _headers(scope) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in scope.get("headers", []):
        found.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return found


async def send_error(send: Any, status: int, message: str, code: str) -> None:
    """An OpenAI-shaped JSON error, written straight to the ASGI channel."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class HostGuard:
    """403 for a `Host` this server does not answer to, or an `Origin` it does not let in."""

    def __init__(self, app: Any, policy: HostPolicy):
        self.app = app
        self.policy = policy

    def refusal(self, scope: dict) -> str | None:
        headers = _headers(scope)
        hosts = headers.get("host", [])
        if len(hosts) != 1 or not self.policy.host_ok(host_name(hosts[0])):
            # The rejected name is not echoed back: the page that sent it should learn nothing.
            return ("this server does not answer to that Host name; if you reach it by another name, "
                    "start it with --allow-host NAME")
        origins = headers.get("origin", [])
        if any(not self.policy.origin_ok(o) for o in origins):
            return "requests from other web sites are refused (the Origin is not allowed)"
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        if scope["type"] in ("http", "websocket") and (reason := self.refusal(scope)) is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # before accept: the server answers 403
            else:
                await send_error(send, 403, reason, "host_not_allowed")
            return
        await self.app(scope, receive, send)

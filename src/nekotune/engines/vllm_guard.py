"""ASGI middleware for `vllm serve --middleware nekotune.engines.vllm_guard.Guard`.

vLLM has no Host check, lets any Origin in (CORS "*" by default) and checks its API key only
under /v1, /v2 and /inference (/invocations runs the same inference without it). This puts
`nekotune serve`'s rules in front of every path: serve/guard.py's Host and Origin policy (403),
then the key (401) everywhere but /health.

vLLM calls `app.add_middleware(Guard)` with no arguments, so the settings come from the vllm
process's environment, which engines/vllm.py's command sets: NEKOTUNE_GUARD_BIND (the address
vLLM binds), NEKOTUNE_GUARD_ALLOW_HOSTS and NEKOTUNE_GUARD_CORS (comma-separated), and
VLLM_API_KEY, the variable vLLM reads its own key from. This module imports only the standard
library and nekotune.serve.guard, which is all the vllm process can see of nekotune.
"""

from __future__ import annotations

import hmac
import os

from nekotune.serve.guard import HostGuard, host_policy, send_error

OPEN_PATHS = frozenset({"/health"})


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


class Guard:
    def __init__(self, app, environ: dict | None = None):
        env = os.environ if environ is None else environ
        self.app = app
        policy = host_policy(env.get("NEKOTUNE_GUARD_BIND", "127.0.0.1"), _split(env.get("NEKOTUNE_GUARD_ALLOW_HOSTS")),
                             _split(env.get("NEKOTUNE_GUARD_CORS")))
        self.hosts = HostGuard(app, policy)
        key = env.get("VLLM_API_KEY") or None
        self.expected = f"Bearer {key}".encode() if key else None

    def _key_ok(self, scope) -> bool:
        if self.expected is None or scope.get("path") in OPEN_PATHS:
            return True
        given = [v for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        return len(given) == 1 and hmac.compare_digest(given[0], self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refusal = self.hosts.refusal(scope)
        status, code = 403, "host_not_allowed"
        if refusal is None and not self._key_ok(scope):
            refusal, status, code = ("missing or wrong API key: send the header 'Authorization: Bearer <key>'", 401,
                                     "invalid_api_key")
        if refusal is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send_error(send, status, refusal, code)

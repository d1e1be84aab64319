"""OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions, /health.

FastAPI does the HTTP; nekotune.generate.stream makes the tokens, from prompts rendered by the
same Renderer as training. The event loop only moves bytes: checking and tokenizing a prompt
runs in a thread, and each answer is generated, cut at its stop strings and counted in a worker
thread that hands the loop finished text piece by piece. A semaphore bounds how many
generations run at once and the line behind it is bounded too (429 when full). A client that
goes away sets its generation's stop event, which ends it within one token and frees the slot.

Before any route runs, guard.HostGuard refuses foreign `Host` and `Origin` headers (403) and
FastAPI's body limit refuses bodies over --max-body (413); serve/limits.py bounds every field.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncGenerator

from fastapi import Depends, Request  # module level: FastAPI resolves route annotations from module globals

from nekotune.data.formats import Conversation, Turn
from nekotune.errors import UserError
from nekotune.generate import GenSettings, stream
from nekotune.serve.limits import (
    ChatRequest,
    CompletionRequest,
    DeclaredLength,
    OpenAIError,
    StopScanner,
    bad_request,
    check_chat,
    check_common,
    check_completion,
    check_prompt_chars,
    install_error_handlers,
    to_conversation,
)
from nekotune.serve.pool import Entry, ModelPool

log = logging.getLogger("nekotune.serve")

DISCONNECT_POLL_S = 0.25
DEFAULT_MAX_BODY = 8 * 2**20
DEFAULT_MAX_QUEUE = 64
RETRY_AFTER_S = 1


# -- generation ------------------------------------------------------------------------------
_END = object()


class Server:
    """Shared state of one running API: the models, the slots, the line and the counters /health shows."""

    def __init__(self, pool: ModelPool, max_concurrency: int, max_tokens_cap: int,
                 max_queue: int = DEFAULT_MAX_QUEUE):
        self.pool = pool
        self.max_concurrency = max_concurrency
        self.max_tokens_cap = max_tokens_cap
        self.max_queue = max_queue
        self.slots = asyncio.Semaphore(max_concurrency)
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="nekotune-generate")
        self.admitted = 0  # requests let in and not yet answered: generating or in line
        self.active = self.waiting = self.cancelled = self.completed = 0

    def admit(self) -> None:
        if self.admitted >= self.max_concurrency + self.max_queue:
            raise OpenAIError(429, f"the server is busy ({self.max_concurrency} answers generating and "
                                   f"{self.max_queue} in line); retry in a moment", type="requests",
                              code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.admitted += 1

    def _produce(self, gen: "Generation", put) -> None:
        """Worker thread: generate and hand each finished piece to the event loop."""
        try:
            with self.pool.lease(gen.entry):
                if not gen.stop.is_set():
                    gen.produce(put)
            put(_END)
        except BaseException as exc:  # re-raised in the request's task
            put(exc)

    async def pieces(self, gen: "Generation") -> AsyncGenerator[str, None]:
        """The answer's text pieces, generated in a slot once one is free."""
        import anyio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
                loop.call_soon_threadsafe(queue.put_nowait, item)

        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        job = loop.run_in_executor(self.executor, self._produce, gen, put)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            gen.stop.set()
            # Keep the slot until the worker has really stopped (within one token), even when
            # this task is being cancelled because the client left.
            with anyio.CancelScope(shield=True):
                await job
            self.active -= 1
            self.slots.release()


class Generation:
    """One answer: stop strings applied, leading whitespace dropped, finish reason and usage kept."""

    def __init__(self, server: Server, entry: Entry, conv: Conversation, settings: GenSettings,
                 stops: list[str], prompt_tokens: int):
        self.server, self.entry, self.conv, self.settings = server, entry, conv, settings
        self.stops = stops
        self.prompt_tokens = prompt_tokens
        self.stop = threading.Event()
        self.parts: list[str] = []
        self.hit_stop_string = False
        self.completion_tokens = 0
        self.inputs: dict | None = None  # the prompt's tensors, built once by prepare()

    def produce(self, put: Any) -> None:
        """Worker thread: the CPU work of an answer (generating, scanning for stops, counting) stays here."""
        scanner = StopScanner(self.stops)
        pool = self.server.pool
        if pool.engine is None:  # transformers on the pool's model, looked up here (tests replace it)
            pieces = stream(pool.model, self.entry.renderer, self.conv, self.settings, stop=self.stop,
                            inputs=self.inputs)
        else:  # issue 19: another engine (llama.cpp) renders nothing itself: the entry's ids go in
            pieces = pool.stream(self.entry, self.conv, self.settings, self.stop)
        with contextlib.closing(pieces):
            for piece in pieces:
                out, self.hit_stop_string = scanner.feed(piece)
                self._emit(out, put)
                if self.hit_stop_string:
                    break
            else:
                self._emit(scanner.flush(), put)
        # generate.stream yields text, not ids, so the answer is re-encoded to count it;
        # re-encoding can merge or split differently, hence the clamp.
        self.completion_tokens = min(self.server.pool.count_tokens(self.text), self.settings.max_new_tokens)

    def _emit(self, text: str, put) -> None:
        text = text.lstrip() if not self.parts else text
        if text:
            self.parts.append(text)
            put(text)

    async def deltas(self) -> AsyncGenerator[str, None]:
        async with contextlib.aclosing(self.server.pieces(self)) as pieces:
            async for piece in pieces:
                yield piece
        self.server.completed += 1

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def finish_reason(self) -> str:
        if self.hit_stop_string:
            return "stop"
        return "length" if self.completion_tokens >= self.settings.max_new_tokens else "stop"

    def usage(self) -> dict:
        done = self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    async def run_to_end(self, request: Any) -> None:
        """Non-streaming: generate it all, stopping early if the client goes away meanwhile."""
        watcher = asyncio.create_task(self._watch_disconnect(request))
        try:
            async for _ in self.deltas():
                pass
        finally:
            watcher.cancel()

    async def _watch_disconnect(self, request) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                self.server.cancelled += 1
                self.stop.set()


def _pick(value, default):
    return default if value is None else value


def prepare(server: Server, req: Any, conv: Conversation, stops: list[str]) -> Generation:
    """Everything that can be refused is checked here, in a thread, before a slot is taken."""
    entry = server.pool.get(req.model)
    if entry is None:
        raise OpenAIError(404, f"model {req.model!r} does not exist; GET /v1/models lists "
                               f"{', '.join(server.pool.names)}", param="model", code="model_not_found")
    context = server.pool.context_length
    check_prompt_chars(conv, context)
    try:
        # the model's inputs, built here, in a thread: a request's images are decoded once, never on
        # the event loop, and a bad one is a 400 before a slot is taken (issue 17)
        inputs = entry.renderer.prompt_inputs(conv)
    except UserError as exc:
        raise bad_request(str(exc), "messages") from None
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if prompt_tokens >= context:
        raise bad_request(f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens. "
                          f"Shorten the messages", "messages", "context_length_exceeded")
    d = entry.defaults
    asked = _pick(getattr(req, "max_completion_tokens", None), _pick(req.max_tokens, d.max_new_tokens))
    # Capped by the server's limit and by the room left in the context window.
    max_new = max(1, min(asked, server.max_tokens_cap, context - prompt_tokens))
    try:
        settings = GenSettings(max_new_tokens=max_new, temperature=_pick(req.temperature, d.temperature),
                               top_p=_pick(req.top_p, d.top_p), top_k=_pick(req.top_k, d.top_k),
                               repetition_penalty=_pick(req.repetition_penalty, d.repetition_penalty),
                               seed=_pick(req.seed, d.seed), no_repeat_ngram_size=d.no_repeat_ngram_size).validated()
    except UserError as exc:
        raise bad_request(str(exc)) from None
    gen = Generation(server, entry, conv, settings, stops, prompt_tokens)
    gen.inputs = inputs
    return gen


def _prepare_chat(server: Server, req: ChatRequest) -> Generation:
    stops = check_common(req)
    check_chat(req)
    return prepare(server, req, to_conversation(req.messages), stops)


def _prepare_completions(server: Server, req: CompletionRequest) -> list[Generation]:
    stops = check_common(req)
    # nekotune models are chat models: a prompt is answered as one user message, rendered with
    # the same chat template and system prompt as in training.
    return [prepare(server, req, Conversation(turns=[Turn("user", p)]), stops) for p in check_completion(req)]


class Admission:
    """A request's place among the admitted; given back once its response is over."""

    def __init__(self, server: Server):
        self.server, self.held = server, False

    def enter(self) -> None:
        self.server.admit()
        self.held = True


def _admission(server: Server):
    # FastAPI runs a yield dependency's exit after the response has been sent, also for a
    # stream that ended early or never started, so a place is never lost.
    async def admission():
        ticket = Admission(server)
        try:
            yield ticket
        finally:
            if ticket.held:
                server.admitted -= 1

    return admission


# -- responses -------------------------------------------------------------------------------
def _sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _chat_chunk(rid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _completion_chunk(rid: str, created: int, model: str, text: str, finish: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


async def _event_stream(server: Server, gen: Generation, chunk, first: dict | None, include_usage: bool):
    """Server-sent events for one streamed answer; the slot is freed if the client leaves."""
    finished = False
    try:
        if first is not None:
            yield _sse(chunk(first))
        try:
            async for delta in gen.deltas():
                yield _sse(chunk(delta))
        except UserError as exc:
            yield _sse(OpenAIError(400, str(exc)).body())
        except Exception:  # headers are sent: the error has to travel as an event
            log.exception("generation failed")
            yield _sse(OpenAIError(500, "generation failed; the server's log has the details",
                                   type="server_error").body())
        else:
            yield _sse(chunk(None, gen.finish_reason))
            if include_usage:
                yield _sse({**chunk(None, None), "choices": [], "usage": gen.usage()})
        yield _sse("[DONE]")
        finished = True
    finally:
        if not finished:
            server.cancelled += 1


def _streaming_response(body):
    from fastapi.responses import StreamingResponse

    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _admit(server: Server, prepare_fn, req, admission: Admission, prefix: str):
    """Check and tokenize in a thread, then take a place in line: (prepared, response id, created)."""
    import anyio

    prepared = await anyio.to_thread.run_sync(prepare_fn, server, req)
    admission.enter()
    return prepared, f"{prefix}-{uuid.uuid4().hex}", int(time.time())


def _stream(server: Server, gen: Generation, chunk, first: dict | None, req):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _streaming_response(_event_stream(server, gen, chunk, first, include_usage))


async def chat_completions(server: Server, req: ChatRequest, request: Any, admission: Admission) -> Any:
    gen, rid, created = await _admit(server, _prepare_chat, req, admission, "chatcmpl")
    if req.stream:
        def chunk(delta, finish=None):
            return _chat_chunk(rid, created, req.model, delta if isinstance(delta, dict) else
                               ({"content": delta} if delta is not None else {}), finish)

        return _stream(server, gen, chunk, {"role": "assistant", "content": ""}, req)
    await _run_or_fail(gen, request)
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "logprobs": None, "finish_reason": gen.finish_reason}],
            "usage": gen.usage()}


async def completions(server: Server, req: CompletionRequest, request: Any, admission: Admission) -> Any:
    gens, rid, created = await _admit(server, _prepare_completions, req, admission, "cmpl")
    if req.stream:
        def chunk(text, finish=None):
            return _completion_chunk(rid, created, req.model, text or "", finish)

        return _stream(server, gens[0], chunk, None, req)
    for gen in gens:
        await _run_or_fail(gen, request)
    usage = {k: sum(g.usage()[k] for g in gens) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
                        for i, g in enumerate(gens)], "usage": usage}


async def _run_or_fail(gen: Generation, request) -> None:
    try:
        await gen.run_to_end(request)
    except UserError as exc:
        raise bad_request(str(exc)) from None


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "nekotune"}


# -- the app ---------------------------------------------------------------------------------
def key_checker(api_key: str | None) -> Any:
    """The API key check (a FastAPI dependency): 401 unless 'Authorization: Bearer <key>'; compared in
    constant time."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise OpenAIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key")

    return check


def create_app(pool: ModelPool, api_key: str | None = None, max_concurrency: int = 4, max_tokens_cap: int = 1024,
               cors_origins: list[str] | None = None, host: str = "127.0.0.1", allow_hosts: list[str] | None = None,
               max_body: int = DEFAULT_MAX_BODY, max_queue: int = DEFAULT_MAX_QUEUE) -> Any:
    """The FastAPI app for a loaded ModelPool (tests build one directly; `nekotune serve` runs it).

    `host` is the address it will be served on: the Host check answers that name (and the
    loopback names when it is loopback), plus `allow_hosts`."""
    from fastapi import FastAPI

    from nekotune.serve.guard import HostGuard, host_policy

    if max_concurrency < 1 or max_tokens_cap < 1 or max_body < 1 or max_queue < 0:
        raise UserError("--max-concurrency, --max-tokens-cap and --max-body must be at least 1, "
                        "--max-queue at least 0")
    policy = host_policy(host, allow_hosts or [], cors_origins or [])
    server = Server(pool, max_concurrency, max_tokens_cap, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.executor.shutdown(wait=False, cancel_futures=True)

    # With a key, the schema and the docs pages would describe the API to anyone without one.
    docs: dict[str, Any] = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="nekotune", lifespan=lifespan, **docs)
    app.state.server = server
    install_error_handlers(app, max_body)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(DeclaredLength, max_body=max_body)
    app.add_middleware(HostGuard, policy=policy)  # added last: runs first
    app.include_router(_v1_routes(server, api_key, max_body))

    @app.get("/health")
    async def health():
        # No model names here: /health answers without the API key.
        return {"status": "ok", "active": server.active, "waiting": server.waiting, "completed": server.completed,
                "cancelled": server.cancelled, "max_concurrency": server.max_concurrency,
                "max_queue": server.max_queue}

    return app


def _v1_routes(server: Server, api_key: str | None, max_body: int):
    """The OpenAI routes, behind the API key."""
    from fastapi import APIRouter

    pool = server.pool
    # FastAPI counts the body as it arrives (chunked bodies too); on the router, inside
    # DeclaredLength, so every 413 is answered in OpenAI's shape.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(key_checker(api_key))], max_body_size=max_body)
    place_in_line = Depends(_admission(server), scope="request")

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in pool.names]}

    @v1.get("/models/{name}")
    async def get_model(name: str):
        entry = pool.get(name)
        if entry is None:
            raise OpenAIError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return model_card(entry.name)

    @v1.post("/chat/completions")
    async def chat(req: ChatRequest, request: Request, place: Admission = place_in_line):
        return await chat_completions(server, req, request, place)

    @v1.post("/completions")
    async def complete(req: CompletionRequest, request: Request, place: Admission = place_in_line):
        return await completions(server, req, request, place)

    return v1

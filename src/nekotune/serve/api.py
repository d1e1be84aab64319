"""OpenAI-compatible HTTP API: /v1/models, /v1/chat/completions, /v1/completions, /health.

FastAPI does the HTTP; nekotune.generate.stream makes the tokens, from prompts rendered by the
same Renderer as training. torch generation blocks, so each answer is produced in a worker
thread and handed to the event loop piece by piece. A semaphore bounds how many generations
run at once: the others wait in line and none is dropped. A client that goes away sets its
generation's stop event, which ends it within one token and frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import os
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Optional, Union

from fastapi import Request  # module level: FastAPI resolves route annotations from module globals
from pydantic import BaseModel, ConfigDict, Field

from nekotune.data.formats import Conversation, Turn
from nekotune.errors import UserError
from nekotune.generate import GenSettings, stream
from nekotune.serve.pool import Entry, ModelPool, load_pool, parse_adapter_args

MAX_STOP_STRINGS = 4
MAX_PROMPTS = 16  # /v1/completions with a list of prompts
DISCONNECT_POLL_S = 0.25


# -- errors in OpenAI's shape ----------------------------------------------------------------
class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# -- request bodies --------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, metadata ...)


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)  # nekotune extension (extra_body)
    repetition_penalty: Optional[float] = Field(None, gt=0)  # nekotune extension (extra_body)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)  # accepted for compatibility, not applied
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)  # accepted for compatibility, not applied
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


def _check_common(req: _Sampling) -> list[str]:
    """Refuse what nekotune cannot honour rather than silently ignoring it; returns the stop strings."""
    if req.n != 1:
        raise bad_request("n: only one choice per request is supported (n=1)", "n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} stop sequences", "stop")
    return [s for s in stops if s]


def _check_chat(req: ChatRequest) -> None:
    if req.logprobs:
        raise bad_request("logprobs are not supported", "logprobs")
    if req.tools:
        raise bad_request("tools / function calling is not supported", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("response_format: only {'type': 'text'} is supported", "response_format")


def _check_completion(req: CompletionRequest) -> list[str]:
    unsupported = {"echo": req.echo, "logprobs": req.logprobs, "suffix": req.suffix,
                   "best_of": req.best_of not in (None, 1)}
    for field, used in unsupported.items():
        if used:
            raise bad_request(f"{field} is not supported", field)
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt: give a string or a list of 1 to {MAX_PROMPTS} strings", "prompt")
    if req.stream and len(prompts) > 1:
        raise bad_request("prompt: streaming takes a single prompt", "prompt")
    return prompts


def _text_of(content, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text":
            raise bad_request(f"messages[{index}].content: only text parts are supported, got {part.type!r}",
                              f"messages[{index}].content")
        parts.append(part.text or "")
    return "".join(parts)


def to_conversation(messages: list[Message]) -> Conversation:
    """OpenAI messages -> nekotune's Conversation (system messages become its system prompt)."""
    systems, turns = [], []
    for i, msg in enumerate(messages):
        text = _text_of(msg.content, i)
        if msg.role in ("system", "developer"):
            systems.append(text)
        else:
            turns.append(Turn(msg.role, text))
    if not turns or turns[-1].role != "user":
        raise bad_request("messages: the conversation must end with a user message", "messages")
    return Conversation(turns=turns, system="\n\n".join(systems) if systems else None)


# -- generation ------------------------------------------------------------------------------
class StopScanner:
    """Cuts an answer at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest


_END = object()


class Server:
    """Shared state of one running API: the models, the slots and the counters /health shows."""

    def __init__(self, pool: ModelPool, max_concurrency: int, max_tokens_cap: int):
        self.pool = pool
        self.max_concurrency = max_concurrency
        self.max_tokens_cap = max_tokens_cap
        self.slots = asyncio.Semaphore(max_concurrency)
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="nekotune-generate")
        self.active = self.waiting = self.cancelled = self.completed = 0

    def _produce(self, entry: Entry, conv: Conversation, settings: GenSettings, stop: threading.Event, put) -> None:
        """Worker thread: generate and hand each piece to the event loop."""
        try:
            with self.pool.lease(entry):
                if not stop.is_set():
                    for piece in stream(self.pool.model, entry.renderer, conv, settings, stop=stop):
                        put(piece)
            put(_END)
        except BaseException as exc:  # re-raised in the request's task
            put(exc)

    async def pieces(self, entry: Entry, conv: Conversation, settings: GenSettings, stop: threading.Event):
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
        job = loop.run_in_executor(self.executor, self._produce, entry, conv, settings, stop, put)
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
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

    def _visible(self, text: str) -> str:
        return text.lstrip() if not self.parts else text

    async def deltas(self):
        scanner = StopScanner(self.stops)
        async with contextlib.aclosing(self.server.pieces(self.entry, self.conv, self.settings, self.stop)) as pieces:
            async for piece in pieces:
                out, self.hit_stop_string = scanner.feed(piece)
                if out := self._visible(out):
                    self.parts.append(out)
                    yield out
                if self.hit_stop_string:
                    break
        if not self.hit_stop_string and (rest := self._visible(scanner.flush())):
            self.parts.append(rest)
            yield rest
        self.server.completed += 1

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @functools.cached_property
    def completion_tokens(self) -> int:
        """Read once the answer is complete. generate.stream yields text, not ids, so the answer is
        re-encoded to count it; re-encoding can merge or split differently, hence the clamp."""
        return min(self.server.pool.count_tokens(self.text), self.settings.max_new_tokens)

    @property
    def finish_reason(self) -> str:
        if self.hit_stop_string:
            return "stop"
        return "length" if self.completion_tokens >= self.settings.max_new_tokens else "stop"

    def usage(self) -> dict:
        done = self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    async def run_to_end(self, request) -> None:
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


def prepare(server: Server, req: _Sampling, conv: Conversation, stops: list[str]) -> Generation:
    """Everything that can be refused is checked here, before a slot is taken."""
    entry = server.pool.get(req.model)
    if entry is None:
        raise OpenAIError(404, f"model {req.model!r} does not exist; GET /v1/models lists "
                               f"{', '.join(server.pool.names)}", param="model", code="model_not_found")
    try:
        prompt_tokens = len(entry.renderer.prompt_ids(conv))
    except UserError as exc:
        raise bad_request(str(exc), "messages") from None
    context = server.pool.context_length
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
                               seed=_pick(req.seed, d.seed)).validated()
    except UserError as exc:
        raise bad_request(str(exc)) from None
    return Generation(server, entry, conv, settings, stops, prompt_tokens)


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
        except Exception as exc:  # headers are sent: the error has to travel as an event
            yield _sse(OpenAIError(500, f"generation failed: {exc}", type="server_error").body())
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


async def chat_completions(server: Server, req: ChatRequest, request):
    stops = _check_common(req)
    _check_chat(req)
    gen = prepare(server, req, to_conversation(req.messages), stops)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        def chunk(delta, finish=None):
            return _chat_chunk(rid, created, req.model, delta if isinstance(delta, dict) else
                               ({"content": delta} if delta is not None else {}), finish)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _streaming_response(_event_stream(server, gen, chunk, {"role": "assistant", "content": ""},
                                                 include_usage))
    await _run_or_fail(gen, request)
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "logprobs": None, "finish_reason": gen.finish_reason}],
            "usage": gen.usage()}


async def completions(server: Server, req: CompletionRequest, request):
    stops = _check_common(req)
    prompts = _check_completion(req)
    # nekotune models are chat models: a prompt is answered as one user message, rendered with
    # the same chat template and system prompt as in training.
    gens = [prepare(server, req, Conversation(turns=[Turn("user", p)]), stops) for p in prompts]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        def chunk(text, finish=None):
            return _completion_chunk(rid, created, req.model, text or "", finish)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _streaming_response(_event_stream(server, gens[0], chunk, None, include_usage))
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
def _install_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return JSONResponse(bad_request("the request body is not valid JSON").body(), status_code=400)
        param = ".".join(loc) or None
        message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return JSONResponse(bad_request(message, param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(OpenAIError(exc.status_code, str(exc.detail), code=code).body(),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return JSONResponse(OpenAIError(500, f"internal error: {exc}", type="server_error").body(), status_code=500)


def _key_checker(api_key: str | None):
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
               cors_origins: list[str] | None = None):
    """The FastAPI app for a loaded ModelPool (tests build one directly; `nekotune serve` runs it)."""
    from fastapi import APIRouter, Depends, FastAPI

    if max_concurrency < 1 or max_tokens_cap < 1:
        raise UserError("--max-concurrency and --max-tokens-cap must be at least 1")
    server = Server(pool, max_concurrency, max_tokens_cap)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nekotune", lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_checker(api_key))])

    @v1.get("/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in pool.names]}

    @v1.get("/models/{name}")
    async def get_model(name: str):
        if pool.get(name) is None:
            raise OpenAIError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return model_card(pool.get(name).name)

    @v1.post("/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        return await chat_completions(server, req, request)

    @v1.post("/completions")
    async def complete(req: CompletionRequest, request: Request):
        return await completions(server, req, request)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        # No model names here: /health answers without the API key.
        return {"status": "ok", "active": server.active, "waiting": server.waiting, "completed": server.completed,
                "cancelled": server.cancelled, "max_concurrency": server.max_concurrency}

    return app


# -- `nekotune serve` ------------------------------------------------------------------------
def _check_port_free(host: str, port: int) -> None:
    """Say so before a minute of model loading, not after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
                            f"or stop what uses it") from None


def _model_arg(args) -> str | None:
    pos, opt = getattr(args, "model_pos", None), getattr(args, "model", None)
    if pos and opt and pos != opt:
        raise UserError(f"two models given ({pos} and --model {opt}); give one")
    return pos or opt


def serve_command(cfg, args) -> int:
    import uvicorn

    api_key = args.api_key or os.environ.get("NEKOTUNE_API_KEY") or None
    cors = [o.strip() for o in (args.cors or "").split(",") if o.strip()] or None
    adapters = parse_adapter_args(args.adapter)
    if args.max_concurrency < 1 or args.max_tokens_cap < 1:
        raise UserError("--max-concurrency and --max-tokens-cap must be at least 1")
    _check_port_free(args.host, args.port)
    pool = load_pool(cfg, _model_arg(args), adapters)
    app = create_app(pool, api_key=api_key, max_concurrency=args.max_concurrency,
                     max_tokens_cap=args.max_tokens_cap, cors_origins=cors)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"nekotune serve: warning: listening on {args.host} without an API key; anyone who can reach "
              f"this port can use it (set --api-key or NEKOTUNE_API_KEY)", file=sys.stderr)
    print(f"nekotune serve: models {', '.join(pool.names)} (context {pool.context_length} tokens)\n"
          f"  OpenAI base URL: http://{args.host}:{args.port}/v1"
          f"{'  (API key required)' if api_key else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

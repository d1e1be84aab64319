"""What one API request may ask for: the bodies, their bounds, the body size and the stop scanner.

Every number has a range (OpenAI's own where it has one), every string must be valid Unicode,
stop strings are bounded in count and length, and a prompt far too long for the model is refused
by its length in characters before anything tokenizes it. Whatever passes here cannot make
generation fail, so a bad request is always a 400 and never a 500.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from nekotune.data.formats import Conversation, Turn
from nekotune.errors import UserError

log = logging.getLogger("nekotune.serve")

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_PROMPTS = 16  # /v1/completions with a list of prompts
MAX_MESSAGES = 4096
# A prompt of more characters than this per token of context cannot fit: refused before tokenizing.
CHARS_PER_TOKEN_CEILING = 64
INT64 = 2**63


# -- errors in OpenAI's shape ----------------------------------------------------------------
class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _error_response(err: OpenAIError):
    from fastapi.responses import Response

    # ASCII JSON: an error message may quote a client's text, which must never fail to encode.
    return Response(json.dumps(err.body()), status_code=err.status, media_type="application/json",
                    headers=err.headers)


def install_error_handlers(app: Any, max_body: int) -> None:
    """Every error the API answers, in OpenAI's shape; an internal one says only where its log is."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        # Of several errors (one per member of a union), the deepest says most about what is wrong.
        err = max(exc.errors(), key=lambda e: len(e.get("loc", ())), default={"loc": (), "msg": "invalid request"})
        if err.get("type") == "json_invalid":
            return _error_response(bad_request("the request body is not valid JSON"))
        # Union members show up in the location as tags like "list[...]": not a field name.
        param = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and "[" not in str(p)) or None
        message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return _error_response(bad_request(message, param))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 413:
            message = f"the request body is over this server's limit of {max_body} bytes (--max-body)"
        return _error_response(OpenAIError(exc.status_code, message, code=code,
                                           headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        # The details stay in the server's log: an exception's text can hold paths and internals.
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return _error_response(OpenAIError(500, f"internal error (reference {ref} in the server's log)",
                                           type="server_error"))


# -- request bodies --------------------------------------------------------------------------
def _valid_text(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows "\ud800"; no tokenizer can encode it, so it is refused here.
        raise ValueError("text must be valid Unicode (it holds a lone surrogate such as \\ud800)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_text)]


def _real(lo=None, hi=None, *, gt=None):
    return Field(None, ge=lo, le=hi, gt=gt, allow_inf_nan=False)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, metadata ...)


class ImageURL(_Body):
    url: str  # a data URL (remote URLs only with --allow-remote-images); bounded by --max-body
    detail: Optional[str] = None  # OpenAI's resolution hint; nekotune uses data.image_max_pixels


class ContentPart(_Body):
    type: Annotated[Text, Field(max_length=64)]
    text: Optional[Text] = None
    image_url: Optional[ImageURL] = None  # issue 17: vision-language models


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[ContentPart], None] = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Annotated[Text, Field(max_length=256)]
    max_tokens: Optional[int] = Field(None, ge=1, le=2**31 - 1)
    temperature: Optional[float] = _real(0, 2)
    top_p: Optional[float] = _real(hi=1, gt=0)
    top_k: Optional[int] = Field(None, ge=0, le=1_000_000)  # nekotune extension (extra_body)
    # nekotune extension (extra_body); below 0.01 the penalty divides logits into overflow
    repetition_penalty: Optional[float] = _real(0.01, 10)
    frequency_penalty: Optional[float] = _real(-2, 2)  # accepted for compatibility, not applied
    presence_penalty: Optional[float] = _real(-2, 2)  # accepted for compatibility, not applied
    seed: Optional[int] = Field(None, ge=-INT64, le=INT64 - 1)  # what torch.Generator.manual_seed takes
    stop: Union[Text, list[Text], None] = None
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=2**31 - 1)
    logprobs: Optional[bool] = None
    tools: Optional[list] = None
    response_format: Optional[dict] = None


class CompletionRequest(_Sampling):
    prompt: Union[Text, list[Text]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[Text] = None
    best_of: Optional[int] = Field(None, ge=1, le=20)


# -- checks ----------------------------------------------------------------------------------
def check_common(req: _Sampling) -> list[str]:
    """Refuse what nekotune cannot honour rather than silently ignoring it; returns the stop strings."""
    if req.n != 1:
        raise bad_request("n: only one choice per request is supported (n=1)", "n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} stop sequences", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"stop: each stop sequence may be at most {MAX_STOP_CHARS} characters", "stop")
    return [s for s in stops if s]


def check_chat(req: ChatRequest) -> None:
    if req.logprobs:
        raise bad_request("logprobs are not supported", "logprobs")
    if req.tools:
        raise bad_request("tools / function calling is not supported", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("response_format: only {'type': 'text'} is supported", "response_format")


def check_completion(req: CompletionRequest) -> list[str]:
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


def check_prompt_chars(conv: Conversation, context: int) -> None:
    """A cheap bound before tokenizing: no tokenizer packs this many characters into one token."""
    chars = len(conv.system or "") + sum(len(t.content) + 16 for t in conv.turns)  # 16: a turn's template
    if chars > context * CHARS_PER_TOKEN_CEILING:
        raise bad_request(f"the messages are {chars} characters, far more than this model's context of "
                          f"{context} tokens holds. Shorten them", "messages", "context_length_exceeded")


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


MAX_IMAGES = 8  # images per request: each is decoded and becomes up to thousands of tokens


def _has_images(content) -> bool:
    return isinstance(content, list) and any(part.type != "text" for part in content)


def _image_turn(msg: Message, index: int) -> Turn:
    """A message with image_url parts (issue 17) -> a Turn with images; never a 500."""
    from nekotune.data.image_rows import turn_from_content

    where = f"messages[{index}].content"
    if msg.role not in ("user",):
        raise bad_request(f"{where}: the {msg.role} message has an image; images go in user messages", where)
    try:
        parts = msg.content if isinstance(msg.content, list) else []
        return turn_from_content("user", [part.model_dump(exclude_none=True) for part in parts], where)
    except UserError as exc:
        raise bad_request(str(exc), where) from None


def to_conversation(messages: list[Message]) -> Conversation:
    """OpenAI messages -> nekotune's Conversation (system messages become its system prompt)."""
    systems, turns = [], []
    for i, msg in enumerate(messages):
        if _has_images(msg.content):
            turns.append(_image_turn(msg, i))
            continue
        text = _text_of(msg.content, i)
        if msg.role in ("system", "developer"):
            systems.append(text)
        else:
            turns.append(Turn(msg.role, text))
    if sum(len(t.images) for t in turns) > MAX_IMAGES:
        raise bad_request(f"messages: more than {MAX_IMAGES} images in one request", "messages")
    if not turns or turns[-1].role != "user":
        raise bad_request("messages: the conversation must end with a user message", "messages")
    return Conversation(turns=turns, system="\n\n".join(systems) if systems else None)


# -- the body -------------------------------------------------------------------------------
class DeclaredLength:
    """413 for a body that says up front it is over the limit, answered in OpenAI's shape.

    FastAPI's max_body_size (Starlette's RequestBodyLimitMiddleware) counts the body as it
    arrives, chunked bodies too, and its 413 reaches the API's error handlers; but a
    Content-Length already over the limit it answers itself, in plain text, over any response
    the app sends. This middleware answers that case before the request gets there."""

    def __init__(self, app: Any, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        from nekotune.serve.guard import send_error

        if scope["type"] == "http":
            lengths = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
            if any(v.strip().isdigit() and int(v) > self.max_body for v in lengths):
                return await send_error(send, 413, f"the request body is over this server's limit of "
                                                   f"{self.max_body} bytes (--max-body)", "request_too_large")
        await self.app(scope, receive, send)


# -- stop strings ----------------------------------------------------------------------------
def _failure(s: str) -> list[int]:
    """Knuth-Morris-Pratt: for each prefix of s, the longest proper prefix that is also its suffix."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        if s[i] == s[k]:
            k += 1
        table[i] = k
    return table


class StopScanner:
    """Cuts an answer at the first stop string, holding back text that may be the start of one.

    One Knuth-Morris-Pratt automaton per stop string, fed each character of the answer once, so
    the scan is linear in the answer's length (checking every prefix of every stop against the
    text's end is quadratic in the stops' length). transformers' StopStringCriteria only ends
    generation; the text still has to be cut and held back, which this does.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.tables = [_failure(s) for s in self.stops]
        self.states = [0] * len(self.stops)  # per stop: how much of it the text ends with
        self.pending = ""
        self.work = 0  # automaton steps taken, so tests can check the scan stays linear

    def _step(self, j: int, ch: str) -> bool:
        s, table, k = self.stops[j], self.tables[j], self.states[j]
        while k and s[k] != ch:
            k = table[k - 1]
            self.work += 1
        self.work += 1
        if s[k] == ch:
            k += 1
        matched = k == len(s)
        self.states[j] = table[k - 1] if matched else k
        return matched

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text, base = self.pending + piece, len(self.pending)
        for i, ch in enumerate(piece):
            starts = [base + i + 1 - len(self.stops[j]) for j in range(len(self.stops)) if self._step(j, ch)]
            if starts:
                self.pending = ""
                return text[:min(starts)], True
        keep = max(self.states)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

"""OpenAI's request bodies and errors as `koala serve` checks them, and the gate in front of every route.

Every field is checked on its own request, with OpenAI's ranges, before anything is queued: a bad value is a 400
that names the field (`param`), and nothing one request carries can reach another request's generation.

    max_tokens (chat: or max_completion_tokens)  >= 1          temperature        0 to 2
    top_p                                        0 to 1        n                  1 (one choice per request)
    frequency_penalty, presence_penalty          -2 to 2       seed               any 64-bit integer
    min_tokens (vLLM's extension)                >= 0
    stop                                         a string or at most 4, each at most 256 characters
    logprobs / top_logprobs                      chat: bool / 0 to 20; completions: 0 to 20

Fields that would change an answer and that this server does not implement (`logit_bias`, `response_format`, `tools`,
`tool_choice`, `functions`, `function_call`) are a 400 naming the field, never dropped; fields that change nothing
here (`user`, `metadata`, `stream_options`, `store`, `service_tier`, ...) are accepted and ignored.

`Gate` is plain ASGI middleware (it sees the body as it streams in): a request body over `max_bytes` gets 413
(from its Content-Length, or counted as it arrives), and with an API key set, `/v1/` routes need
`Authorization: Bearer <key>` (401).
"""

from __future__ import annotations

import hmac
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from koala_lib.data.schema import Turn
from koala_lib.inference.sampling import SEED_RANGE, TOP_LOGPROBS

MAX_STOPS = 4
MAX_STOP_CHARS = 256
UNSUPPORTED = ("logit_bias", "response_format", "tools", "tool_choice", "functions", "function_call")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ----------------------------------------------------------------------------- request bodies

Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # strict: "max_tokens": "7" is a 400, not 7

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # None: the server's default (the profile's)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    min_tokens: int | None = Field(None, ge=0)  # vLLM's extension: no end-of-turn token before this many tokens
    logit_bias: Any = None  # the UNSUPPORTED fields: declared so that a value is refused by name, not ignored
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    @field_validator(*UNSUPPORTED, mode="before")
    @classmethod
    def _not_implemented(cls, value, info):
        if value is not None:
            raise ValueError("not supported by this server: it would change the answer, and it is not implemented")
        return value

    @field_validator("temperature", "top_p", "n", "stream", "frequency_penalty", "presence_penalty", "min_tokens", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):  # OpenAI's API takes null for "the default"
        return cls.model_fields[info.field_name].default if value is None else value

    def logprob_count(self) -> int | None:  # Sampling.logprobs: alternatives per token, None = no logprobs
        return None

    def token_limit(self) -> int | None:
        return self.max_tokens

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _null_is_false(cls, value):
        return False if value is None else value

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(_Body):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)  # the legacy API's: alternatives per token

    def logprob_count(self) -> int | None:
        return self.logprobs


def http_error(exc: HTTPException) -> ApiError:
    """The framework's HTTP errors (413, an unknown route, a wrong method) in OpenAI's error shape."""
    code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, str(exc.detail), code=code)


def validation_error(errors: list[dict]) -> ApiError:
    """A 400 naming the first bad field of a pydantic validation error."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, "the body is not valid JSON")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not str(p).startswith(("list[", "constrained-str", "str")))
    return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None)


def conversation(messages: list[Message]) -> tuple[str, list[Turn], str]:
    """(system text, history, query) from chat messages; turns after the system messages must alternate."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "the last message must come from the user", param="messages")
    for i, m in enumerate(turns):
        if m.role != ("user" if i % 2 == 0 else "assistant"):
            raise ApiError(400, f"messages must alternate user and assistant; message {i} is {m.role!r}", param="messages")
    texts = [m.content for m in turns]
    history = [Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts[:-1])]
    return system, history, texts[-1]


# ----------------------------------------------------------------------------- the gate


class TooLarge(HTTPException):
    """Raised while the body is read: an HTTP error, so the framework's body parsing passes it on as it is."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is over {max_bytes} bytes")


class Gate:
    """ASGI middleware: 413 for a body over `max_bytes`, 401 on `/v1/` without the API key (when one is set)."""

    def __init__(self, app, max_bytes: int, api_key: str | None = None):
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                error = ApiError(401, "missing or wrong API key (send `Authorization: Bearer <key>`)", type_="authentication_error")
                return await self._answer(error, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._answer(self._too_large(), receive, send)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise TooLarge(self.max_bytes)
            return message

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except TooLarge:  # where no handler of the app answered it
            if not started:
                await self._answer(self._too_large(), receive, send)

    def _too_large(self) -> ApiError:
        return http_error(TooLarge(self.max_bytes))

    @staticmethod
    async def _answer(error: ApiError, receive, send) -> None:
        """Send `error`, after reading what is left of the body (up to 64 MiB), so the client sees the answer
        rather than a connection closed while it was still sending."""
        left = 64 << 20
        while left > 0:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
            left -= len(message.get("body", b""))
        payload = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

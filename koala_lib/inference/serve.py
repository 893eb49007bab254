"""`koala serve`: an OpenAI-compatible HTTP server for one model, with a chat page at `/`.

    app = create_app(generator, template, model_name="koala-all")    # a FastAPI app
    with serving(app) as url:                                         # uvicorn on 127.0.0.1, a free port
        OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(model="koala-all", messages=[...])

Routes: `POST /v1/chat/completions` (messages rendered with the Koala template, the positive marker last, or
with the model's own chat template where `generate.native_template` says so: the base instruct model),
`POST /v1/completions` (a raw prompt), `GET /v1/models`, `GET /health`, and the chat page `GET /`.
`stream: true` answers with server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

Errors are OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for malformed JSON,
wrong types, a prompt longer than the context or a flagged request; 401 for a missing or wrong API key
(when one is set); 404 for an unknown model; 429 when the request queue is full. The server keeps serving.

Log-probabilities, as OpenAI's API gives them (`koala_lib/inference/token_text.py` shapes them): chat takes `logprobs: true`
and `top_logprobs` (0-20; without `logprobs: true`, a 400) and answers `choices[0].logprobs.content`, one entry
(`token`, `logprob`, `bytes`, `top_logprobs`) per generated token; `/v1/completions` takes `logprobs` (0-20) and
answers the legacy `tokens`, `token_logprobs`, `top_logprobs`, `text_offset` (from the start of the prompt). The
values are the model's own log-softmax whatever the sampling settings; the token that ended the answer (EOS) and
the tokens of a stop string are reported too. A stream sends each token's entry with the chunk whose text completes
that token, so the chunks' entries add up to the whole answer's.

Moderation: `moderation(text)` returns a reason to refuse, or None. It checks the request's text before
anything is queued (400, code `content_filter`) and the answer as it grows (the answer ends there, with
finish reason `content_filter`), as the original Koala demo filtered through a moderation API. The default
is a case-insensitive word list from `generate.moderation_words`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import socket
import threading
import time
import uuid
from importlib import resources
from typing import Callable, Iterator, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from koala_lib.inference.batching import Batcher, Job, QueueFull
from koala_lib.inference.chat_format import KoalaChat, NativeChat
from koala_lib.conditioning.template import Template
from koala_lib.config import ConfigError
from koala_lib.data.schema import Turn
from koala_lib.inference.generate import TOP_LOGPROBS, Generator, PromptTooLong, Sampling, TokenEvent, TokenLogprob
from koala_lib.inference.token_text import TokenText, chat_logprobs, legacy_logprobs

Moderation = Callable[[str], Union[str, None]]


def word_list(words: tuple[str, ...] | list[str]) -> Moderation:
    """A moderation check that flags any of `words` as a whole word, ignoring case."""
    patterns = [(w, re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE)) for w in words if w.strip()]

    def check(text: str) -> str | None:
        hit = next((w for w, p in patterns if p.search(text)), None)
        return None if hit is None else f"it contains the blocked word {hit!r}"

    return check


# ----------------------------------------------------------------------------- request bodies (OpenAI's fields)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # strict: "max_tokens": "7" is a 400, not 7

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per request
    seed: int | None = None

    def logprob_count(self) -> int | None:  # Sampling.logprobs: alternatives per token, None = no logprobs
        return None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(_Body):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)  # the legacy API's: alternatives per token

    def logprob_count(self) -> int | None:
        return self.logprobs


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


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


# ----------------------------------------------------------------------------- the app


def create_app(
    generator: Generator,
    template: Template | KoalaChat | NativeChat,
    *,
    model_name: str,
    api_key: str | None = None,
    moderation: Moderation | None = None,
    max_queue: int = 64,
    default_max_tokens: int = 256,
    max_batch: int | None = None,
) -> FastAPI:
    """The server's app; its batcher starts now and stops when the app shuts down. Chat messages are rendered with
    `template`: Koala's (a Template), or a chat format of koala_lib.inference.chat_format (e.g. the model's own template)."""
    batcher = Batcher(generator, max_batch=max_batch or generator.max_batch, max_queue=max_queue)
    check = moderation or (lambda text: None)
    chat = KoalaChat(template, generator.tokenizer, (template.cfg.user_marker,)) if isinstance(template, Template) else template
    names = TokenText(generator.tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="koala-kit", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, "the body is not valid JSON").response()
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return ApiError(400, message, param=where or None).response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        given = request.headers.get("authorization", "")
        if api_key and request.url.path.startswith("/v1/") and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return ApiError(401, "missing or wrong API key (send `Authorization: Bearer <key>`)", type_="authentication_error").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "waiting": batcher.jobs.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "koala-kit"}]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return (resources.files("koala_lib.inference") / "static" / "chat.html").read_text(encoding="utf-8")

    def prepare(body: _Body, text: Callable[[], list[int]], said: str, extra_stops: tuple[str, ...]) -> tuple[list[int], Sampling]:
        """Token ids and sampling settings of a request; `said` is what the client wrote (moderated)."""
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server has {model_name!r}", code="model_not_found", param="model")
        reason = check(said)
        if reason:
            raise ApiError(400, f"the request was refused by the moderation check: {reason}", code="content_filter")
        ids = text()
        try:
            generator.check_prompt(ids)
        except PromptTooLong as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded", param="messages") from None
        requested = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        sampling = Sampling(
            max_new_tokens=body.max_tokens or default_max_tokens, temperature=body.temperature, top_p=body.top_p,
            stop=tuple(dict.fromkeys([*extra_stops, *requested])), seed=body.seed if body.seed is not None else int(time.time_ns() % 2**31),
            logprobs=body.logprob_count(),
        )
        return ids, sampling

    async def run(ids: list[int], sampling: Sampling):
        """Queue a job and yield (text delta, finish reason or None, tokens so far, logprob entries) as the worker
        produces them; a token's entry goes with the delta that completes its text."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        text = {"sent": "", "held": ""}  # text passed to the client, and a trailing partial word held back
        held: list[TokenLogprob] = []  # entries of tokens whose text is not all passed on yet

        def on_event(event: TokenEvent | None) -> bool:
            if event is None:
                loop.call_soon_threadsafe(events.put_nowait, None)
                return False
            whole = text["sent"] + text["held"] + event.delta
            held.extend(event.logprobs)
            if check(whole):  # the flagged word never reaches the client (nor its tokens): only whole words are passed on
                loop.call_soon_threadsafe(events.put_nowait, ("", "content_filter", event.tokens, []))
                return True
            cut = len(whole) if event.finish_reason else max(whole.rfind(" "), whole.rfind("\n"), len(text["sent"]) - 1) + 1
            delta, text["sent"], text["held"] = whole[len(text["sent"]):cut], whole[:cut], whole[cut:]
            ready = len(held) if event.finish_reason else next((k for k, e in enumerate(held) if e.end > cut), len(held))
            entries, held[:] = held[:ready], held[ready:]
            loop.call_soon_threadsafe(events.put_nowait, (delta, event.finish_reason, event.tokens, entries))
            return False

        try:
            job: Job = batcher.submit(ids, sampling, on_event)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="rate_limit_exceeded", type_="rate_limit_error") from None
        try:
            while True:
                item = await events.get()
                if item is None:  # the batch ended without a final event for this job: an error
                    raise ApiError(500, f"generation failed: {job.error!r}", type_="server_error")
                yield item
                if item[1] is not None:
                    return
        finally:
            job.cancelled = True  # a client that left, or a finished job: either way nothing more is wanted

    async def respond(body: _Body, ids: list[int], sampling: Sampling, chat: bool, prompt: str = ""):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model_name}
        stream = run(ids, sampling)
        first = await stream.__anext__()  # errors (429, ...) surface before any byte is sent

        def logprobs(entries: list[TokenLogprob]) -> dict | None:
            if sampling.logprobs is None:
                return None
            return {"content": chat_logprobs(entries, names)} if chat else legacy_logprobs(entries, names, len(prompt))

        if not body.stream:
            parts, finish, used, entries = [first[0]], first[1], first[2], list(first[3])
            if finish is None:
                async for delta, finish, used, more in stream:
                    parts.append(delta)
                    entries.extend(more)
            text = "".join(parts)
            choice = {"index": 0, "finish_reason": finish, "logprobs": logprobs(entries)}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            usage = {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used}
            return JSONResponse({**head, "choices": [choice], "usage": usage})

        def chunk(delta: str | None, finish: str | None, role: bool = False, entries: list[TokenLogprob] | None = None) -> str:
            scores = logprobs(entries) if entries else None
            if chat:
                piece = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": piece, "finish_reason": finish, "logprobs": scores}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": scores}
            return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk' if chat else 'text_completion', 'choices': [choice]})}\n\n"

        async def events():
            try:
                if chat:
                    yield chunk(None, None, role=True)
                item = first
                while True:
                    delta, finish, _, entries = item
                    if delta or entries:  # entries of the answer's last tokens (EOS) come before the final chunk
                        yield chunk(delta, None, entries=entries)
                    if finish is not None:
                        yield chunk(None, finish)
                        break
                    item = await stream.__anext__()
            except ApiError as exc:  # after the headers: the error goes into the stream, as OpenAI's API does
                yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.type, 'code': exc.code}})}\n\n"
            finally:
                await stream.aclose()  # ends the job now if the client went away
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        system, history, query = conversation(body.messages)
        said = "\n".join(m.content for m in body.messages)
        ids, sampling = prepare(body, lambda: chat.prompt_ids(history, query, system), said, chat.stops)
        return await respond(body, ids, sampling, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        ids, sampling = prepare(body, lambda: generator.encode(body.prompt), body.prompt, ())
        return await respond(body, ids, sampling, chat=False, prompt=body.prompt)

    return app


# ----------------------------------------------------------------------------- running it


def free_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL and stops it on exit."""
    import uvicorn

    sock = free_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def app_for_profile(cfg, model: str | None = None, checkpoint: str | None = None, api_key: str | None = None) -> FastAPI:
    """The app for one of the profile's models (`base`, a variant, a `generate.extra` name; default: the first
    variant stage 3 has exported, else base), or for any Hugging Face folder / `default` given as `checkpoint`."""
    from koala_lib.inference.answers import Answerer, answerers, load_generator
    from koala_lib.inference.chat_format import format_for
    from koala_lib.model.checkpoints import resolve_checkpoint
    from koala_lib.train.data import variant_name

    if checkpoint:
        folder = resolve_checkpoint(checkpoint)
        who = Answerer(model or folder.name, "checkpoint", folder, extra=True)
    else:
        if model is None:
            trained = [v for v in cfg.variants if (cfg.run_dir / "train" / variant_name(v) / "hf" / "config.json").is_file()]
            model = trained[0] if trained else "base"
        who = answerers(cfg, [model])[0]
        if who.kind in ("outputs", "openai"):
            raise ConfigError(f"--model: {model!r} is {'a file of answers' if who.kind == 'outputs' else 'a model behind another endpoint'}, not a model that can be served")
    gen = load_generator(cfg, who)
    words = cfg.generate.moderation_words
    chat = format_for(cfg, who.name, gen.tokenizer, who.extra, who.stand_in)  # the base model: its own chat template
    return create_app(gen, chat, model_name=who.name, api_key=api_key,
                      moderation=word_list(words) if words else None, max_queue=cfg.generate.max_queue,
                      default_max_tokens=cfg.generate.max_new_tokens)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    print(f"serving {app.title} on http://{host}:{port}/ (chat page), OpenAI API at http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")

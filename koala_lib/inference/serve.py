"""`koala serve`: an OpenAI-compatible HTTP server for one model, with a chat page at `/`.

    app = create_app(generator, template, model_name="koala-all")    # a FastAPI app
    with serving(app) as url:                                         # uvicorn on 127.0.0.1, a free port
        OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(model="koala-all", messages=[...])

Routes: `POST /v1/chat/completions` (messages rendered with the Koala template, the positive marker last, or
with the model's own chat template where `generate.native_template` says so: the base instruct model),
`POST /v1/completions` (a raw prompt), `GET /v1/models`, `GET /health`, and the chat page `GET /`.
`stream: true` answers with server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

Requests are scheduled by continuous batching (koala_lib/inference/scheduler.py; `batching="static"` keeps the
older batcher of koala_lib/inference/batching.py). Each request stands alone: its fields are checked with
OpenAI's ranges (koala_lib/inference/openai_api.py), its moderation scan and tokenization run in a worker thread
off the event loop, and a client that disconnects, streamed or not, has its generation cancelled and its slot freed.
Errors are OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for malformed JSON,
wrong types or out-of-range fields (naming the field), a prompt longer than the context or a flagged request; 401
for a missing or wrong API key (when one is set); 404 for an unknown model or route; 413 for a body over
`max_body_bytes`; 429 when the request queue is full. The server keeps serving. `GET /health` shows the
scheduler's counters (busy and free slots, waiting, finished, cancelled, tokens).

Text streams as soon as it is decodable (a partial UTF-8 character or the possible start of a stop string is
held back); only with moderation on is it passed on in whole words. The space that joins Koala's marker to the
answer belongs to the template: chat replies start at the answer's first character.

Log-probabilities, as OpenAI's API gives them (`koala_lib/inference/token_text.py` shapes them): chat takes `logprobs: true`
and `top_logprobs` (0-20; without `logprobs: true`, a 400) and answers `choices[0].logprobs.content`, one entry
(`token`, `logprob`, `bytes`, `top_logprobs`) per generated token; `/v1/completions` takes `logprobs` (0-20) and
answers the legacy `tokens`, `token_logprobs`, `top_logprobs`, `text_offset` (from the start of the prompt). The
values are the model's own log-softmax whatever the sampling settings; the token that ended the answer (EOS) and
the tokens of a stop string are reported too. A stream sends each token's entry with the chunk whose text completes
that token, so the chunks' entries add up to the whole answer's. A chat reply leaves out the space that joins
Koala's marker to the answer; its first entry is still the model's own token, space included.

Moderation: `moderation(text)` returns a reason to refuse, or None. It checks the request's text before
anything is queued (400, code `content_filter`) and the answer as it grows (the answer ends there, with
finish reason `content_filter`), as the original Koala demo filtered through a moderation API. The default
is a case-insensitive word list from `generate.moderation_words`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sys
import threading
import time
import uuid
from importlib import resources
from typing import Callable, Iterator, Union

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from koala_lib.conditioning.template import Template
from koala_lib.config import ConfigError
from koala_lib.inference.batching import Batcher, Job, QueueFull
from koala_lib.inference.chat_format import KoalaChat, NativeChat
from koala_lib.inference.generate import Generator, PromptTooLong, Sampling, TokenEvent, TokenLogprob
from koala_lib.inference.openai_api import ApiError, ChatBody, CompletionBody, Gate, _Body, conversation, http_error, validation_error
from koala_lib.inference.scheduler import ContinuousBatcher
from koala_lib.inference.token_text import TokenText, chat_logprobs, legacy_logprobs

Moderation = Callable[[str], Union[str, None]]


def word_list(words: tuple[str, ...] | list[str]) -> Moderation:
    """A moderation check that flags any of `words` as a whole word, ignoring case."""
    patterns = [(w, re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", re.IGNORECASE)) for w in words if w.strip()]

    def check(text: str) -> str | None:
        hit = next((w for w, p in patterns if p.search(text)), None)
        return None if hit is None else f"it contains the blocked word {hit!r}"

    return check


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
    batching: str = "continuous",
    max_body_bytes: int = 1 << 20,
    defaults: Sampling | None = None,
) -> FastAPI:
    """The server's app; its batcher starts now and stops when the app shuts down. Chat messages are rendered with
    `template`: Koala's (a Template), or a chat format of koala_lib.inference.chat_format (e.g. the model's own
    template). `batching`: "continuous" (requests join and leave between decode steps, `max_batch` slots) or "static"
    (what waits is decoded together to the end of its longest answer). `defaults`: the temperature, top_p, top_k and
    min_new_tokens of a request that names none (`app_for_profile`: the profile's `generate` settings; else
    OpenAI's, temperature 1)."""
    slots = max_batch or generator.max_batch
    if generator.on_compile is None:
        generator.on_compile = lambda line: print(f"koala serve: {line}", file=sys.stderr, flush=True)
    if batching == "continuous":
        batcher = ContinuousBatcher(generator, slots=slots, max_queue=max_queue)
    elif batching == "static":
        batcher = Batcher(generator, max_batch=slots, max_queue=max_queue)
    else:
        raise ValueError(f"batching={batching!r}: expected 'continuous' or 'static'")
    check = moderation or (lambda text: None)
    chat = KoalaChat(template, generator.tokenizer, (template.cfg.user_marker,)) if isinstance(template, Template) else template
    names = TokenText(generator.tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="koala-kit", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(Gate, max_bytes=max_body_bytes, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors()).response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException):
        return http_error(exc).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **batcher.metrics()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "koala-kit"}]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return (resources.files("koala_lib.inference") / "static" / "chat.html").read_text(encoding="utf-8")

    default = defaults or Sampling(temperature=1.0)  # what a request that names no sampling setting gets (OpenAI's: 1.0)

    def prepare(body: _Body, text: Callable[[], list[int]], said: str, extra_stops: tuple[str, ...]) -> tuple[list[int], Sampling]:
        """Token ids and sampling settings of a request; `said` is what the client wrote (moderated). Runs in a
        worker thread: a long prompt's moderation scan and tokenization never stall the event loop."""
        reason = check(said)
        if reason:
            raise ApiError(400, f"the request was refused by the moderation check: {reason}", code="content_filter")
        try:
            ids = text()
        except (ValueError, TemplateError) as exc:  # e.g. a chat template that refuses a system message
            raise ApiError(400, f"the request could not be rendered into a prompt: {exc}", param="messages") from None
        try:
            generator.check_prompt(ids)
        except PromptTooLong as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded", param="messages") from None
        except ValueError as exc:  # an empty prompt
            raise ApiError(400, str(exc), param="prompt") from None
        sampling = Sampling(
            max_new_tokens=body.token_limit() or default_max_tokens,
            temperature=default.temperature if body.temperature is None else body.temperature,
            top_p=default.top_p if body.top_p is None else body.top_p, top_k=default.top_k,
            stop=tuple(dict.fromkeys([*extra_stops, *body.stops()])), seed=body.seed if body.seed is not None else int(time.time_ns() % 2**63),
            logprobs=body.logprob_count(), frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
            min_new_tokens=default.min_new_tokens if body.min_tokens is None else body.min_tokens,
        )
        return ids, sampling

    async def prepared(body: _Body, *args) -> tuple[list[int], Sampling]:
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server has {model_name!r}", code="model_not_found", param="model")
        body.logprob_count()  # a 400 for top_logprobs without logprobs, before any work
        return await asyncio.to_thread(prepare, body, *args)

    async def run(ids: list[int], sampling: Sampling, lead: str):
        """Queue a job and yield (text delta, finish reason or None, tokens so far, logprob entries) as the worker
        produces them; a token's entry goes with the delta that completes its text. `lead`: text of the template
        that the model writes first (the space after Koala's marker), not passed on."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        text = {"raw": "", "sent": 0, "begun": not lead}  # the answer as generated; its characters passed on (or skipped)
        held: list[TokenLogprob] = []  # entries of tokens whose text is not all passed on yet

        def on_event(event: TokenEvent | None) -> bool:
            if event is None:
                loop.call_soon_threadsafe(events.put_nowait, None)
                return False
            raw = text["raw"] = text["raw"] + event.delta
            held.extend(event.logprobs)
            if not text["begun"]:  # skip the template's lead once the answer shows whether it starts with it
                if lead.startswith(raw) and len(raw) < len(lead) and not event.finish_reason:
                    return False
                text["begun"], text["sent"] = True, len(lead) if raw.startswith(lead) else 0
            if check(raw):  # the flagged word never reaches the client (nor its tokens)
                loop.call_soon_threadsafe(events.put_nowait, ("", "content_filter", event.tokens, []))
                return True
            cut = len(raw)
            if moderation is not None and not event.finish_reason:  # moderation reads whole words: hold a partial one
                cut = max(raw.rfind(" "), raw.rfind("\n"), text["sent"] - 1) + 1
            delta, text["sent"] = raw[text["sent"]:cut], max(cut, text["sent"])
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
                if item is None:  # the job ended without a final event: an error, or the server is closing
                    raise ApiError(500, f"generation failed: {job.error!r}", type_="server_error")
                yield item
                if item[1] is not None:
                    return
        finally:
            job.cancelled = True  # a client that left, or a finished job: either way nothing more is wanted

    async def until_disconnected(request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    async def first_event(stream, request: Request):
        """The job's first event; None if the client left before it (while the request waited for a slot, say),
        in which case the job is cancelled and never takes a slot."""
        gone = asyncio.ensure_future(until_disconnected(request))
        first = asyncio.ensure_future(stream.__anext__())
        try:
            await asyncio.wait({gone, first}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if first.done():
            return first.result()
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await first
        await stream.aclose()
        return None

    async def respond(request: Request, body: _Body, ids: list[int], sampling: Sampling, chat: bool, prompt: str = ""):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model_name}
        stream = run(ids, sampling, chat_lead if chat else "")
        first = await first_event(stream, request)  # errors (429, ...) surface before any byte is sent
        if first is None:
            return JSONResponse(ApiError(499, "the client closed the request").body(), status_code=499)

        def logprobs(entries: list[TokenLogprob]) -> dict | None:
            if sampling.logprobs is None:
                return None
            return {"content": chat_logprobs(entries, names)} if chat else legacy_logprobs(entries, names, len(prompt))

        if not body.stream:
            parts, finish, used, entries = [first[0]], first[1], first[2], list(first[3])

            async def collect():
                nonlocal finish, used
                async for delta, finish, used, more in stream:
                    parts.append(delta)
                    entries.extend(more)

            if finish is None:  # a client that leaves before the answer is complete cancels its generation
                gone = asyncio.ensure_future(until_disconnected(request))
                done = asyncio.ensure_future(collect())
                await asyncio.wait({gone, done}, return_when=asyncio.FIRST_COMPLETED)
                if not done.done():
                    done.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await done
                    await stream.aclose()  # ends the job: its slot is freed at the next step
                    return JSONResponse(ApiError(499, "the client closed the request").body(), status_code=499)
                gone.cancel()
                done.result()  # an error of the generation, if any
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

    chat_lead = getattr(chat, "lead", "")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        system, history, query = conversation(body.messages)
        said = "\n".join(m.content for m in body.messages)
        ids, sampling = await prepared(body, lambda: chat.prompt_ids(history, query, system), said, chat.stops)
        return await respond(request, body, ids, sampling, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        ids, sampling = await prepared(body, lambda: generator.encode(body.prompt), body.prompt, ())
        return await respond(request, body, ids, sampling, chat=False, prompt=body.prompt)

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
    from koala_lib.config import variant_name

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
                      default_max_tokens=cfg.generate.max_new_tokens, max_batch=cfg.generate.slots,
                      batching=cfg.generate.batching, max_body_bytes=cfg.generate.max_body_bytes,
                      defaults=Sampling(temperature=cfg.generate.temperature, top_p=cfg.generate.top_p, top_k=cfg.generate.top_k,
                                        min_new_tokens=cfg.generate.min_new_tokens))


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    print(f"serving {app.title} on http://{host}:{port}/ (chat page), OpenAI API at http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")

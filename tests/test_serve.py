"""`koala serve`: the official openai client against the real server on loopback (tiny random model)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from koala_lib import config
from koala_lib.conditioning.template import template_for
from koala_lib.inference.serve import create_app, serving, word_list

openai = pytest.importorskip("openai")

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def client(url: str, key: str = "unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def post(url: str, body: str | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, str) else json.dumps(body)
    req = urllib.request.Request(url, data=data.encode(), headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def make_app(generator, **kwargs):
    return create_app(generator, template_for(config.load("smoke"), generator.tokenizer), model_name="koala-debug", **kwargs)


def test_chat_non_streaming_and_streaming_agree(tiny_server, tiny_generator):
    url, _ = tiny_server
    c = client(url)
    full = c.chat.completions.create(model="koala-debug", messages=HELLO, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 12 and (choice.finish_reason == "stop" or full.usage.completion_tokens == 12)
    prompt = template_for(config.load("smoke"), tiny_generator.tokenizer).prompt([], HELLO[0]["content"])
    assert prompt.endswith("USER: Hello, who are you? GPT:")
    assert full.usage.prompt_tokens == len(tiny_generator.encode(prompt))
    chunks = list(c.chat.completions.create(model="koala-debug", messages=HELLO, max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == choice.message.content
    assert sum(1 for ch in chunks if ch.choices[0].delta.content) > 1  # it streamed piece by piece
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_completions_stream_and_models(tiny_server):
    url, _ = tiny_server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["koala-debug"]
    full = c.completions.create(model="koala-debug", prompt="Once upon a time", max_tokens=6, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="koala-debug", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert full.choices[0].text and streamed == full.choices[0].text
    assert full.object == "text_completion" and full.usage.completion_tokens == 6


def test_32_concurrent_requests_share_decode_steps_and_are_all_answered(tiny_server):
    url, app = tiny_server
    c = client(url)
    before = app.state.batcher.metrics()

    def ask(i: int) -> str:
        out = c.chat.completions.create(model="koala-debug", messages=[{"role": "user", "content": f"Question number {i}?"}], max_tokens=8, temperature=0.7, seed=i)
        return out.choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32 and all(answers)
    after = app.state.batcher.metrics()
    assert after["finished"] - before["finished"] == 32 and after["busy"] == 0
    tokens, steps = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert tokens > 2 * steps  # rows shared decode steps (one step alone per token would give tokens <= steps + 32)


def test_the_static_batcher_still_serves(tiny_generator):
    app = make_app(tiny_generator, batching="static")
    with serving(app) as url, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: post(f"{url}/v1/completions", {"model": "koala-debug", "prompt": f"n{i}", "max_tokens": 4, "temperature": 0})[0], range(8)))
    assert got == [200] * 8
    sizes = app.state.batcher.batches
    assert sum(sizes) == 8 and max(sizes) > 1


def test_bad_requests_get_4xx_and_the_server_keeps_serving(tiny_server):
    url, _ = tiny_server
    chat = f"{url}/v1/chat/completions"
    ok = {"model": "koala-debug", "messages": HELLO, "max_tokens": 2}
    cases = [
        ("{not json", 400, None),
        ({**ok, "messages": "hello"}, 400, None),
        ({**ok, "max_tokens": "7"}, 400, None),
        ({**ok, "temperature": "hot"}, 400, None),
        ({**ok, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
        ({**ok, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, 400, None),
        ({**ok, "n": 2}, 400, None),
        ({**ok, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "context_length_exceeded"),
        ({**ok, "model": "gpt-4"}, 404, "model_not_found"),
        ({**ok, "messages": [{"role": "user", "content": "something forbidden here"}]}, 400, "content_filter"),
    ]
    for body, status, code in cases:
        got, payload = post(chat, body)
        assert got == status, (body, payload)
        assert payload["error"]["message"]
        if code:
            assert payload["error"]["code"] == code
    assert post(chat, ok)[0] == 200
    with urllib.request.urlopen(f"{url}/health") as resp:
        assert json.loads(resp.read())["status"] == "ok"


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_full_queue_answers_429(tiny_generator, batching):
    app = make_app(tiny_generator, max_queue=2, max_batch=1, batching=batching)
    batcher = app.state.batcher
    body = {"model": "koala-debug", "messages": HELLO, "max_tokens": 2}
    with serving(app) as url:
        results: list[int] = []
        send = lambda: results.append(post(f"{url}/v1/chat/completions", body)[0])  # noqa: E731
        batcher._lock.acquire()  # the worker takes one job, then waits here for the model: the queue fills up
        try:
            sent = [threading.Thread(target=send) for _ in range(3)]
            sent[0].start()
            wait_for(lambda: batcher.metrics()["received"] == 1)  # taken before the others arrive
            for t in sent[1:]:
                t.start()
            wait_for(lambda: batcher.jobs.qsize() == 2 and len(results) == 0)
            status, payload = post(f"{url}/v1/chat/completions", body)
            assert status == 429 and payload["error"]["code"] == "rate_limit_exceeded"
        finally:
            batcher._lock.release()
        for t in sent:
            t.join(timeout=120)
        assert results == [200, 200, 200]


def wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_api_key_is_required_when_set(tiny_generator):
    with serving(make_app(tiny_generator, api_key="s3cret")) as url:
        status, payload = post(f"{url}/v1/chat/completions", {"model": "koala-debug", "messages": HELLO})
        assert status == 401 and "API key" in payload["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        out = client(url, "s3cret").chat.completions.create(model="koala-debug", messages=HELLO, max_tokens=3)
        assert out.choices[0].message.content
        with urllib.request.urlopen(f"{url}/health") as resp:  # health and the chat page stay open
            assert resp.status == 200


def test_moderation_ends_a_flagged_answer(tiny_generator):
    def long_text(text: str) -> str | None:  # a pluggable check: here, anything past 15 characters
        return "too long" if len(text) > 15 else None

    with serving(make_app(tiny_generator, moderation=long_text)) as url:
        c = client(url)
        out = c.chat.completions.create(model="koala-debug", messages=[{"role": "user", "content": "Hi"}], max_tokens=40, temperature=0)
        assert out.choices[0].finish_reason == "content_filter"
        assert len(out.choices[0].message.content) <= 15
        chunks = list(c.chat.completions.create(model="koala-debug", messages=[{"role": "user", "content": "Hi"}], max_tokens=40, temperature=0, stream=True))
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == out.choices[0].message.content


def test_word_list_matches_whole_words_ignoring_case():
    check = word_list(["bomb", "dark web"])
    assert check("How to build a BOMB?") == "it contains the blocked word 'bomb'"
    assert check("the Dark  Web") is None and check("the dark web.") is not None
    assert check("bombastic prose") is None


def test_a_flagged_word_never_reaches_a_streaming_client(tiny_server, tiny_generator):
    url, _ = tiny_server
    ask = dict(model="koala-debug", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=30, temperature=0)
    plain = client(url).chat.completions.create(**ask).choices[0].message.content
    words = plain.split()
    assert len(words) >= 4
    word = words[3]
    with serving(make_app(tiny_generator, moderation=word_list([word]))) as moderated:
        chunks = list(client(moderated).chat.completions.create(**ask, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert plain.startswith(streamed) and word not in streamed and len(streamed.split()) <= 3

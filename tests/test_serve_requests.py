"""`koala serve`, one request at a time: field checks, body limits, clients that leave, how text streams."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from koala_lib import config
from koala_lib.conditioning.template import template_for
from koala_lib.inference.serve import create_app, serving, word_list

openai = pytest.importorskip("openai")

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def make_app(generator, **kwargs):
    return create_app(generator, template_for(config.load("smoke"), generator.tokenizer), model_name="koala-debug", **kwargs)


def request(url: str, path: str, body: bytes | str | dict, *, chunked: bool = False, method: str = "POST") -> tuple[int, dict]:
    """(status, JSON body) of one request on a fresh connection; `chunked` sends the body without a Content-Length."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    try:
        if chunked:
            conn.request(method, path, body=iter([data[i:i + 65536] for i in range(0, len(data), 65536)]),
                         headers={"content-type": "application/json"}, encode_chunked=True)
        else:
            conn.request(method, path, body=data, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def health(url: str) -> dict:
    return request(url, "/health", b"", method="GET")[1]


def wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_odd_seeds_and_penalties_in_one_batch_all_answered_and_bad_fields_named(tiny_generator):
    app = make_app(tiny_generator, max_batch=4)
    batcher = app.state.batcher
    ok = {"model": "koala-debug", "messages": HELLO, "max_tokens": 6, "temperature": 0.7}
    bodies = [{**ok, "seed": -1}, {**ok, "seed": 2**40}, {**ok, "seed": 7, "frequency_penalty": 1.0},
              {**ok, "presence_penalty": -0.5, "top_p": None, "n": None, "user": "u1", "metadata": {"k": "v"}, "store": False,
               "service_tier": "auto", "logit_bias": None, "tools": None}]  # fields that change nothing here, and nulls: accepted
    bad = [({**ok, "seed": 2**64}, "seed"), ({**ok, "seed": -(2**63) - 1}, "seed"), ({**ok, "seed": 1.5}, "seed"),
           ({**ok, "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({**ok, "stop": "x" * 257}, "stop"),
           ({**ok, "temperature": 2.5}, "temperature"), ({**ok, "top_p": 1.5}, "top_p"), ({**ok, "max_tokens": 0}, "max_tokens"),
           ({**ok, "max_completion_tokens": -3}, "max_completion_tokens"), ({**ok, "n": 3}, "n"),
           ({**ok, "frequency_penalty": 2.5}, "frequency_penalty"), ({**ok, "presence_penalty": -3}, "presence_penalty"),
           ({**ok, "top_logprobs": 3}, "top_logprobs"), ({**ok, "logit_bias": {"50256": -100}}, "logit_bias"),
           ({**ok, "response_format": {"type": "json_object"}}, "response_format"),
           ({**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({**ok, "tool_choice": "auto"}, "tool_choice"),
           ({**ok, "functions": [{"name": "f"}]}, "functions"), ({**ok, "function_call": "auto"}, "function_call")]
    with serving(app) as url:
        before = health(url)
        pool = ThreadPoolExecutor(4)
        batcher._lock.acquire()  # hold the model so that the four good requests are admitted together
        try:
            futures = [pool.submit(request, url, "/v1/chat/completions", b) for b in bodies]
            for body, field in bad:  # refused at once, while the good ones wait
                status, payload = request(url, "/v1/chat/completions", body)
                assert status == 400 and payload["error"]["param"] == field, (body, payload)
            wait_for(lambda: batcher.jobs.qsize() == 3)  # and the worker holds the fourth
        finally:
            batcher._lock.release()
        answers = [f.result() for f in futures]
        pool.shutdown()
        assert [status for status, _ in answers] == [200] * 4
        assert all(p["choices"][0]["message"]["content"] is not None and p["usage"]["completion_tokens"] >= 1 for _, p in answers)
        after = health(url)
        assert after["finished"] - before["finished"] == 4 and after["failed"] == 0
        completions = request(url, "/v1/completions", {"model": "koala-debug", "prompt": "hi", "logprobs": 21})
        assert completions[0] == 400 and completions[1]["error"]["param"] == "logprobs"


def test_an_oversized_body_gets_413_and_the_server_keeps_serving(tiny_generator):
    app = make_app(tiny_generator, max_body_bytes=4096)
    big = {"model": "koala-debug", "messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 2}
    with serving(app) as url:
        for chunked in (False, True):  # declared in Content-Length, or counted as the body arrives
            status, payload = request(url, "/v1/chat/completions", big, chunked=chunked)
            assert status == 413 and payload["error"]["code"] == "request_too_large", payload
        status, payload = request(url, "/v1/chat/completions", b"x" * (2 << 20))
        assert status == 413
        status, payload = request(url, "/v1/chat/completions", {"model": "koala-debug", "messages": HELLO, "max_tokens": 2})
        assert status == 200 and payload["choices"][0]["finish_reason"] in ("stop", "length")
        status, payload = request(url, "/v1/nothing-here", b"{}")
        assert status == 404 and payload["error"]["code"] == "not_found"


def send_and_leave(url: str, body: dict) -> socket.socket:
    """Send a request on a raw socket and return it unread (close it to leave)."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_has_its_generation_cancelled_and_its_slot_freed(tiny_generator, stream):
    app = make_app(tiny_generator, max_batch=1)
    batcher = app.state.batcher
    with serving(app) as url:
        batcher._lock.acquire()  # the worker takes the request and waits for the model
        try:
            sock = send_and_leave(url, {"model": "koala-debug", "messages": HELLO, "max_tokens": 400, "stream": stream})
            wait_for(lambda: health(url)["received"] == 1)  # the worker has it, and waits for the model
            sock.close()  # the client leaves before its first token
            time.sleep(0.5)  # the server notices the closed connection (it polls every 50 ms)
        finally:
            batcher._lock.release()
        wait_for(lambda: health(url)["cancelled"] == 1 and health(url)["busy"] == 0)
        assert health(url)["tokens"] <= 1  # not the 400 it asked for
        start = time.monotonic()
        status, payload = request(url, "/v1/chat/completions", {"model": "koala-debug", "messages": HELLO, "max_tokens": 3})
        assert status == 200 and payload["usage"]["completion_tokens"] <= 3
        assert time.monotonic() - start < 30


def test_a_client_that_leaves_while_waiting_never_takes_a_slot(tiny_generator):
    app = make_app(tiny_generator, max_batch=1)
    batcher = app.state.batcher
    with serving(app) as url:
        batcher._lock.acquire()  # the worker takes the first request and waits for the model; the second waits
        try:
            first = send_and_leave(url, {"model": "koala-debug", "messages": HELLO, "max_tokens": 3})
            wait_for(lambda: health(url)["received"] == 1)
            second = send_and_leave(url, {"model": "koala-debug", "messages": HELLO, "max_tokens": 3})
            wait_for(lambda: batcher.jobs.qsize() == 1)
            second.close()
            wait_for(lambda: batcher.jobs.queue[0].cancelled)  # noticed while still in the queue
        finally:
            batcher._lock.release()
        wait_for(lambda: health(url)["cancelled"] == 1 and health(url)["finished"] == 1)
        assert health(url)["admitted"] == 1  # the second request was dropped from the queue, never prefilled
        assert b"200 OK" in first.recv(65536)
        first.close()


def test_streamed_text_without_spaces_arrives_before_the_end(smollm2_generator):
    """Chinese text has no spaces: it streams token by token, and in one piece only where moderation needs words."""
    prompt = "一二三四五六七八九十一二三四五六七八九十一二三四五六七八九十一二三四"
    body = {"model": "koala-debug", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
    pieces = {}
    for moderated in (False, True):
        app = make_app(smollm2_generator, moderation=word_list(["forbidden"]) if moderated else None)
        with serving(app) as url:
            c = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
            chunks = [ch.choices[0].text for ch in c.completions.create(**body)]
            pieces[moderated] = [t for t in chunks if t]
    text = "".join(pieces[False])
    assert text == "".join(pieces[True]) and text.startswith("五六七八") and " " not in text
    assert len(pieces[False]) >= 8  # a piece per character or so, from the first token on
    assert len(pieces[True]) == 1  # moderation reads whole words: the text comes at the end


def test_a_chat_reply_starts_at_the_answers_first_character(smollm2_generator):
    """Koala's template joins marker and answer with a space the model writes: the reply leaves it out."""
    app = make_app(smollm2_generator)
    template = template_for(config.load("smoke"), smollm2_generator.tokenizer)
    question = "What is the capital of France?"
    with serving(app) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
        raw = c.completions.create(model="koala-debug", prompt=template.prompt([], question), max_tokens=12, temperature=0, stop=["USER:"]).choices[0].text
        reply = c.chat.completions.create(model="koala-debug", messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="koala-debug", messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0, stream=True))
    assert raw.startswith(" ") and not raw.startswith("  ")
    assert reply.choices[0].message.content == raw[1:] == streamed


def test_a_request_that_names_no_sampling_setting_gets_the_servers_defaults(tiny_generator):
    from koala_lib.inference.sampling import Sampling

    greedy_app = make_app(tiny_generator, defaults=Sampling(temperature=0.0))
    body = {"model": "koala-debug", "messages": HELLO, "max_tokens": 8}
    with serving(greedy_app) as url:
        texts = {request(url, "/v1/chat/completions", {**body, "seed": s})[1]["choices"][0]["message"]["content"] for s in (1, 2, 3)}
        explicit = request(url, "/v1/chat/completions", {**body, "temperature": 0.0, "top_p": None})[1]["choices"][0]["message"]["content"]
    assert texts == {explicit}  # greedy whatever the seed: the default is the profile's temperature 0
    with serving(make_app(tiny_generator)) as url:  # no defaults given: OpenAI's temperature 1, so seeds differ
        sampled = {request(url, "/v1/chat/completions", {**body, "seed": s})[1]["choices"][0]["message"]["content"] for s in (1, 2, 3)}
    assert len(sampled) > 1

"""The call cache: no judge call or endpoint answer is paid twice, a killed run repeats at most the calls in flight,
and a judge whose canary verdicts changed under the same name is reported. Requests are counted at fake
OpenAI-compatible servers on loopback (real HTTP, the official client)."""

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import openai
from fastapi import FastAPI

from koala_lib.call_cache import CallCache
from koala_lib.config import CardConfig
from koala_lib.evaluation.judge import judge_pairs
from koala_lib.evaluation.judge_card import build_card
from koala_lib.evaluation.probes import CANARY, probe_items
from koala_lib.evaluation.judgments import PairItem
from koala_lib.inference.serve import serving


def _items(n):
    return [PairItem(f"k{i}", "koala", f"Question {i}?", "m1", f"answer one {i}", "m2", f"answer two {i}") for i in range(n)]


def _text_judge(verdict=lambda a, b: "[[A]]", delay=0.0):
    """A text-mode judge that records a hash of every request body it receives (before answering)."""
    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        seen.append(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest())
        user = body["messages"][-1]["content"]
        a = user.split("[The start of assistant A's answer]\n")[1].split("\n[The end")[0]
        b = user.split("[The start of assistant B's answer]\n")[1].split("\n[The end")[0]
        if delay:
            await asyncio.sleep(delay)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": verdict(a, b)}}]}

    return app, seen


def _judge(url, items, cache, **kw):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
    return judge_pairs(items, client, "judge-x", concurrency=4, progress=False, mode="text", cache=cache,
                       identity="endpoint test", **kw)


def test_a_second_run_sends_nothing_and_gives_the_same_verdicts(tmp_path):
    app, seen = _text_judge(lambda a, b: "[[A]]" if "one" in a else "[[B]]")
    with serving(app) as url, CallCache(tmp_path / "cache.sqlite") as cache:
        first = _judge(url, _items(6), cache)
        assert (first.calls, first.cache_hits, len(seen)) == (12, 0, 12)
        second = _judge(url, _items(6), cache)
        assert (second.calls, second.cache_hits, len(seen)) == (0, 12, 12)
        assert [j.verdict for j in second.judgments] == [j.verdict for j in first.judgments] == ["A"] * 6
        # another identity (a different judge model) or another prompt is not served from the cache
        other = judge_pairs(_items(6), openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0), "judge-y",
                            concurrency=4, progress=False, mode="text", cache=cache, identity="endpoint test")
        assert other.calls == 12 and len(seen) == 24


def test_a_failed_call_is_not_cached(tmp_path):
    app = FastAPI()
    calls = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        calls.append(1)
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": {"message": "down", "type": "server_error"}}, status_code=503)

    with serving(app) as url, CallCache(tmp_path / "cache.sqlite") as cache:
        assert _judge(url, _items(2), cache).calls == 4
        assert _judge(url, _items(2), cache).calls == 4 and len(cache) == 0


KILLED_RUN = textwrap.dedent("""
    import sys, openai
    from koala_lib.call_cache import CallCache
    from koala_lib.evaluation.judge import judge_pairs
    from koala_lib.evaluation.judgments import PairItem
    url, db = sys.argv[1:3]
    items = [PairItem(f"k{i}", "koala", f"Question {i}?", "m1", f"answer one {i}", "m2", f"answer two {i}") for i in range(40)]
    with CallCache(db) as cache:
        r = judge_pairs(items, openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0), "judge-x", concurrency=4,
                        progress=False, mode="text", cache=cache, identity="endpoint test")
    print(r.calls, r.cache_hits)
""")


def test_a_run_killed_mid_judging_repeats_at_most_the_calls_in_flight(tmp_path):
    app, seen = _text_judge(delay=0.05)
    db = tmp_path / "cache.sqlite"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with serving(app) as url:
        run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, url, str(db)], env=env, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while len(seen) < 30 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.01)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        assert run.returncode == -signal.SIGKILL and 30 <= len(seen) < 80
        before = set(seen)
        seen.clear()
        done = subprocess.run([sys.executable, "-c", KILLED_RUN, url, str(db)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    calls, hits = map(int, done.stdout.split())
    repeated = before & set(seen)
    assert len(repeated) <= 4  # the concurrency: only the calls in flight at the kill are sent again
    assert calls == len(seen) and calls + hits == 80
    assert len(before | set(seen)) == 80


def test_a_judge_that_changes_its_canary_answers_is_reported(tmp_path):
    probes = [it for it in probe_items() if it.test_set == CANARY][:6]
    better = {it.answer_a for it in probes}
    state = {"honest": True}

    def verdict(a, b):
        right = "[[A]]" if a in better else "[[B]]"
        return right if state["honest"] else ("[[B]]" if right == "[[A]]" else "[[A]]")

    app, seen = _text_judge(verdict)
    with serving(app) as url, CallCache(tmp_path / "cache.sqlite") as cache:
        fresh = [it.key for it in probes[:4]]
        first = _judge(url, probes, cache, fresh=fresh)
        assert first.drift == [] and first.calls == 12
        state["honest"] = False  # a new model behind the same name
        second = _judge(url, probes, cache, fresh=fresh)
        assert second.calls == 8 and second.cache_hits == 4  # the 4 fresh pairs asked again, the other 2 from the cache
        assert len(second.drift) == 8 and {d["before"] for d in second.drift} == {"A", "B"}
    card = build_card("judge-x", "text", probes, second, thresholds=CardConfig(require_human_agreement=False))
    card.drift_checked = 4
    assert "the model behind this name has changed" in card.drift_line()
    assert any(r.startswith("drift: 8 canary games") for r in card.reasons) and not card.fit


def test_endpoint_answers_are_not_paid_twice(make_cfg):
    from koala_lib.inference.endpoint_answers import endpoint_answers
    from koala_lib.inference.testsets import TestPrompt

    app = FastAPI()
    calls = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        calls.append(body["messages"][0]["content"])
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "sure: " + calls[-1]}}]}

    prompts = [TestPrompt(f"p{i}", "koala", f"prompt {i}") for i in range(5)]
    with serving(app) as url:
        cfg = make_cfg("smoke", f"generate.endpoint.base_url={url}/v1")
        first, s1 = endpoint_answers(cfg, "gpt-x", prompts, progress=False)
        second, s2 = endpoint_answers(cfg, "gpt-x", prompts, progress=False)
    assert (s1["calls"], s1["cache_hits"], s2["calls"], s2["cache_hits"], len(calls)) == (5, 0, 0, 5, 5)
    assert [t for _, t, _ in second] == [t for _, t, _ in first] == [f"sure: prompt {i}" for i in range(5)]

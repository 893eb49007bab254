"""Answers from a model behind an OpenAI-compatible endpoint (`generate.extra` entry `NAME=openai:MODEL`).

    answers, stats = endpoint_answers(cfg, "gpt-3.5-turbo", prompts)

The blog's third opponent was ChatGPT; any OpenAI-compatible endpoint serves here (OpenAI's API, a vLLM or
`koala serve` server), at `generate.endpoint.base_url` with the key from `generate.endpoint.api_key_env`, through
the official `openai` client with its retries and backoff (`max_retries`). The prompt is sent as one user
message, at the profile's temperature and `max_new_tokens`. A prompt whose request still fails is counted under
`failed` (by exception type) and gets no answer, so stage 5 leaves it out of that model's pairs. Answers are kept
in the profile's call cache (`call_cache`), keyed by the endpoint, the model and the request: a re-run, or a run
after a kill, pays only for the prompts not yet answered.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from koala_lib.config import Config


def endpoint_client(cfg: Config):
    import openai

    e = cfg.generate.endpoint
    return openai.OpenAI(base_url=e.base_url, api_key=os.environ.get(e.api_key_env, "") or "unused",
                         max_retries=e.max_retries, timeout=600)


def endpoint_answers(cfg: Config, model: str, prompts, client=None, progress: bool = True) -> tuple[list[tuple[object, str, str]], dict]:
    """([(prompt, text, finish reason)] for the prompts answered, stats with `failed` counts, `calls` sent and
    `cache_hits`)."""
    import openai

    from koala_lib.call_cache import CallCache, call_key
    from koala_lib.progress import bar

    client = client or endpoint_client(cfg)
    g = cfg.generate
    identity = f"endpoint {g.endpoint.base_url.rstrip('/')} model {model}"
    cache = CallCache(cfg.call_cache_path)
    sent, hits = [], []

    def ask(p):
        request = {"model": model, "messages": [{"role": "user", "content": p.instruction}], "temperature": g.temperature,
                   "top_p": g.top_p, "max_tokens": g.max_new_tokens}
        key = call_key("answer", identity, request)
        if (cached := cache.get(key)) is not None:
            hits.append(1)
            return p, cached["text"], cached["finish_reason"], None
        sent.append(1)
        try:
            reply = client.chat.completions.create(**request)
            choice = reply.choices[0]
            text, finish = (choice.message.content or ""), choice.finish_reason
        except (openai.OpenAIError, IndexError, AttributeError, ValueError) as exc:
            return p, "", None, type(exc).__name__
        cache.put(key, "answer", identity, {"text": text, "finish_reason": finish})
        return p, text, finish, None

    began, failed, out = time.perf_counter(), Counter(), []
    with bar(total=len(prompts), desc=f"answers: openai:{model}", unit="prompt", disable=not progress) as shown:
        with ThreadPoolExecutor(max_workers=max(1, g.endpoint.concurrency)) as pool:
            for p, text, finish, error in pool.map(ask, prompts):
                if error:
                    failed[error] += 1
                else:
                    out.append((p, text, finish))
                shown.update(1)
    cache.close()
    stats = {"seconds": round(time.perf_counter() - began, 2), "failed": dict(failed), "endpoint": g.endpoint.base_url, "model": model,
             "calls": len(sent), "cache_hits": len(hits)}
    return out, stats

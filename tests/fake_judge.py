"""A fake LLM judge for tests: an OpenAI-compatible chat endpoint (FastAPI, served on loopback by the tests) that
reads the two answers the kit's judge prompt shows and replies with one verdict letter and its logprobs."""

import math

from fastapi import FastAPI


def shown_answers(body: dict) -> tuple[str, str]:
    """The answers shown as assistant A and assistant B in a judge request."""
    user = body["messages"][-1]["content"]
    a = user.split("[The start of assistant A's answer]\n")[1].split("\n[The end")[0]
    b = user.split("[The start of assistant B's answer]\n")[1].split("\n[The end")[0]
    return a, b


def letter_judge(policy) -> FastAPI:
    """`policy(a, b)` returns a letter (A, B or C, given probability 0.9, the others 0.05 each) or a list of
    (token, probability) alternatives, the first one the reply."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        top = policy(*shown_answers(body))
        if isinstance(top, str):
            top = [(top, 0.9)] + [(x, 0.05) for x in "ABC" if x != top]
        rows = [{"token": t, "logprob": math.log(max(p, 1e-9)), "bytes": list(t.encode())} for t, p in top]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": top[0][0]},
                             "logprobs": {"content": [{**rows[0], "top_logprobs": rows}]}}]}

    return app

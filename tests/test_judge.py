"""The LLM judge: verdict parsing, both orders combined, against `koala serve` and against a scripted endpoint."""

import json
from collections import Counter

import openai
import pytest
from fastapi import FastAPI

from koala_lib.evaluation.judge import combine, judge_pairs, parse_verdict
from koala_lib.evaluation.judgments import PairItem
from koala_lib.evaluation.pairwise import position_bias
from koala_lib.inference.serve import serving


def test_parse_verdict():
    assert parse_verdict("B is more precise.\n[[B]]") == "B"
    assert parse_verdict("[[C]]") == "tie"
    assert parse_verdict("Verdict: [[A]]. Again: [[A]]") == "A"
    assert parse_verdict("[[A]] or maybe [[B]]") is None  # contradicting
    assert parse_verdict("A is better") is None
    assert parse_verdict("[A]") is None
    assert parse_verdict("") is None


def test_combine_both_orders():
    # game 2 shows model_a as "B": its verdict is undone before comparing
    assert combine("A", "B") == ("A", "consistent")
    assert combine("B", "A") == ("B", "consistent")
    assert combine("tie", "tie") == ("tie", "consistent")
    assert combine("A", "A") == ("tie", "inconsistent")  # always the first answer: position, not quality
    assert combine("A", "tie") == ("tie", "inconsistent")
    assert combine(None, "B") == ("tie", "no_verdict")


def _items(n=3):
    return [PairItem(f"k{i}", "koala", f"Question {i}?", "m_good", f"good answer {i}", "m_bad", f"bad answer {i}")
            for i in range(n)]


def test_judge_end_to_end_against_koala_serve(tiny_server):
    url, _ = tiny_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    result = judge_pairs(_items(), client, "koala-debug", max_tokens=8, concurrency=4, progress=False)
    assert len(result.fastchat_rows) == 3 and sum(result.outcomes.values()) == 3 and not result.errors
    assert len(result.judgments) == 3 - result.outcomes["no_verdict"]
    for j in result.judgments:
        assert (j.source, j.judge, j.model_a, j.model_b) == ("llm", "koala-debug", "m_good", "m_bad")
    for row in result.fastchat_rows:
        assert set(row) >= {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_judgment", "g2_judgment"}
        assert not row["g1_judgment"].startswith("$ERROR$")  # the server answered both games
        assert row["g1_winner"] in {"model_1", "model_2", "tie", "error"}
    # the winners recorded are the replies' own verdicts (game 2 showed model_1 as "B")
    back1 = {"model_1": "A", "model_2": "B", "tie": "tie", "error": None}
    back2 = {"model_1": "B", "model_2": "A", "tie": "tie", "error": None}
    for row in result.fastchat_rows:
        assert back1[row["g1_winner"]] == parse_verdict(row["g1_judgment"])
        assert back2[row["g2_winner"]] == parse_verdict(row["g2_judgment"])


def _scripted_endpoint(policy):
    """An OpenAI-compatible endpoint standing in for a paid judge API: `policy(first, second)` -> reply text."""
    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        user = body["messages"][-1]["content"]
        first = user.split("[The start of assistant A's answer]\n")[1].split("\n[The end")[0]
        second = user.split("[The start of assistant B's answer]\n")[1].split("\n[The end")[0]
        seen.append((first, second, body["temperature"]))
        text = policy(first, second)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}

    return app, seen


@pytest.mark.parametrize("policy, verdict, outcome, first_share, winners", [
    (lambda a, b: "A is right. [[A]]" if a.startswith("good") else "[[B]]", "A", "consistent", 50.0, ("model_1", "model_1")),
    (lambda a, b: "[[A]]", "tie", "inconsistent", 100.0, ("model_1", "model_2")),  # always the first shown: position bias
    (lambda a, b: "They are equal. [[C]]", "tie", "consistent", None, ("tie", "tie")),
    (lambda a, b: "no idea", None, "no_verdict", None, ("error", "error")),  # no judgment, only the count
])
def test_both_orders_against_a_scripted_judge(policy, verdict, outcome, first_share, winners):
    app, seen = _scripted_endpoint(policy)
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        result = judge_pairs(_items(4), client, "judge-x", concurrency=3, progress=False)
    assert len(seen) == 8 and all(t == 0.0 for *_, t in seen)
    assert Counter((a[:4], b[:4]) for a, b, _ in seen) == {("good", "bad "): 4, ("bad ", "good"): 4}
    assert [j.verdict for j in result.judgments] == ([verdict] * 4 if verdict else [])
    assert result.outcomes == Counter({outcome: 4})
    assert position_bias(result.games).share_first == first_share
    rows = result.fastchat_rows
    assert [(r["g1_winner"], r["g2_winner"]) for r in rows] == [winners] * 4
    assert json.loads(json.dumps(rows)) == rows  # the FastChat rows are plain JSON


def test_a_failing_endpoint_is_counted_not_raised():
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)

    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        result = judge_pairs(_items(2), client, "judge-x", progress=False)
    assert result.errors == Counter({"InternalServerError": 4})
    assert result.outcomes == Counter({"no_verdict": 2}) and result.judgments == []
    assert result.fastchat_rows[0]["g1_winner"] == "error"

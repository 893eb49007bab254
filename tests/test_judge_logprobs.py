"""The judge's logprobs mode against scripted OpenAI-compatible endpoints (real HTTP on loopback, the official
client), and the verdict arithmetic: surface forms summed, both orders averaged, ties by a stated margin."""

import json
import math
from collections import Counter

import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from koala_lib.evaluation.exports import annotation_row
from koala_lib.evaluation.judge import USER_LETTER_CUE, JudgeError, judge_pairs, soft_verdict, verdict_probs
from koala_lib.evaluation.judgments import PairItem
from koala_lib.evaluation.pairwise import position_bias
from koala_lib.inference.serve import serving


def test_verdict_probs_sums_every_surface_form_and_normalises():
    top = [(" A", math.log(0.3)), ("A", math.log(0.1)), ("[B", math.log(0.2)), ("(C", math.log(0.1)),
           ("The", math.log(0.25)), ("a", math.log(0.05))]  # lower-case "a" is an article, not a verdict
    probs = verdict_probs(top)
    assert probs == pytest.approx({"A": 0.4 / 0.7, "B": 0.2 / 0.7, "C": 0.1 / 0.7})
    assert verdict_probs([("The", -0.1), ("I", -2.0)]) is None  # no letter: no verdict, never a tie


def test_soft_verdict_rule():
    assert [soft_verdict(p, 0.05) for p in (0.9, 0.56, 0.55, 0.5, 0.45, 0.44, 0.1)] == ["A", "A", "tie", "tie", "tie", "B", "B"]
    assert soft_verdict(0.51, 0.0) == "A"


def _items(n=4):
    return [PairItem(f"k{i}", "koala", f"Question {i}?", "m_good", f"good answer {i}", "m_bad", f"bad answer {i}")
            for i in range(n)]


def _endpoint(policy):
    """An OpenAI-compatible chat endpoint; `policy(first, second, body)` returns (content, logprobs or None) or a
    status code to fail with. Records every request body."""
    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        user = body["messages"][-1]["content"]
        first = user.split("[The start of assistant A's answer]\n")[1].split("\n[The end")[0]
        second = user.split("[The start of assistant B's answer]\n")[1].split("\n[The end")[0]
        seen.append(body)
        out = policy(first, second, body)
        if isinstance(out, int):
            return JSONResponse({"error": {"message": "down", "type": "server_error"}}, status_code=out)
        content, logprobs = out
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": content},
                             "logprobs": logprobs}]}

    return app, seen


def _top(pairs):
    """OpenAI's chat logprobs layout for one token with the given (token, probability) alternatives."""
    top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in pairs]
    return {"content": [{**top[0], "top_logprobs": top}]}


def _judge(app, n=4, **kw):
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        return judge_pairs(_items(n), client, "judge-x", concurrency=3, progress=False, **kw)


def test_a_judge_that_reads_quality_gives_a_soft_preference():
    # the good answer gets 0.7 (split over " A" and "A"), the other 0.2, a tie 0.1, in whichever position
    def policy(first, second, body):
        good, bad = ("A", "B") if first.startswith("good") else ("B", "A")
        return good, _top([(f" {good}", 0.4), (good, 0.3), (bad, 0.2), ("C", 0.1)])

    app, seen = _endpoint(policy)
    result = _judge(app, mode="logprobs", tie_margin=0.05)
    assert result.mode == "logprobs" and result.mode_note == ""
    assert len(seen) == 8 and all(b["max_tokens"] == 1 and b["logprobs"] is True and b["top_logprobs"] == 20
                                  and b["temperature"] == 0.0 for b in seen)
    assert [j.verdict for j in result.judgments] == ["A"] * 4
    assert [j.preference for j in result.judgments] == pytest.approx([0.75] * 4)  # 0.7 + 0.1 / 2 in both orders
    assert result.outcomes == Counter({"consistent": 4})
    # AlpacaEval's layout: model_a is the model evaluated (output_2), preference 2 = output_2 better
    rows = [annotation_row(item, j, result.judge) for item, j in zip(_items(), result.judgments)]
    assert [r["preference"] for r in rows] == pytest.approx([1.75] * 4)
    assert rows[0] == {"instruction": "Question 0?", "output_1": "bad answer 0", "generator_1": "m_bad", "output_2": "good answer 0",
                       "generator_2": "m_good", "annotator": "judge-x", "preference": pytest.approx(1.75), "dataset": "koala", "id": "k0"}


def test_a_judge_that_always_prefers_position_a_gives_ties():
    app, _ = _endpoint(lambda first, second, body: ("A", _top([("A", 0.8), ("B", 0.15), ("C", 0.05)])))
    result = _judge(app, mode="auto")
    assert result.mode == "logprobs" and "returned logprobs" in result.mode_note
    assert [j.verdict for j in result.judgments] == ["tie"] * 4  # (0.825 + 0.175) / 2 = 0.5
    assert [j.preference for j in result.judgments] == pytest.approx([0.5] * 4)
    assert result.outcomes == Counter({"inconsistent": 4})  # each order alone picks the first shown
    assert position_bias(result.games).share_first == 100.0


def test_no_logprobs_auto_falls_back_to_text_and_logprobs_mode_stops():
    def policy(first, second, body):
        return ("Better. [[A]]" if first.startswith("good") else "Better. [[B]]"), None

    app, seen = _endpoint(policy)
    result = _judge(app, mode="auto")
    assert result.mode == "text" and "no logprobs" in result.mode_note
    assert [j.verdict for j in result.judgments] == ["A"] * 4 and all(j.preference is None for j in result.judgments)
    assert [annotation_row(i, j, "x")["preference"] for i, j in zip(_items(), result.judgments)] == [2.0] * 4  # hard: 1 / 1.5 / 2
    assert seen[0]["max_tokens"] == 1 and all(b["max_tokens"] == 512 for b in seen[1:])  # one probe, then text
    app, _ = _endpoint(policy)
    with pytest.raises(JudgeError, match="eval.judge.mode"):
        _judge(app, mode="logprobs")


def test_top_tokens_without_a_verdict_letter_are_no_verdict_not_ties():
    app, _ = _endpoint(lambda first, second, body: ("The", _top([("The", 0.6), ("I", 0.3), ("Both", 0.1)])))
    result = _judge(app, mode="logprobs")
    assert result.judgments == [] and result.games == []
    assert result.outcomes == Counter({"no_verdict": 4})
    assert "no verdict letter" in result.fastchat_rows[0]["g1_judgment"]
    assert result.fastchat_rows[0]["g1_user_prompt"].endswith(USER_LETTER_CUE)  # the message as it was sent


def test_a_failing_endpoint_is_counted():
    app, _ = _endpoint(lambda first, second, body: 503)
    result = _judge(app, n=3, mode="auto")
    assert result.mode == "logprobs" and result.mode_note.startswith("no answer to the first 3 games")  # probes stop at 3
    assert result.errors == Counter({"InternalServerError": 6})
    assert result.outcomes == Counter({"no_verdict": 3}) and result.judgments == []


def test_answers_are_cut_for_the_judge():
    app, seen = _endpoint(lambda first, second, body: ("C", _top([("C", 1.0)])))
    items = [PairItem("k", "koala", "Q" * 50, "a", "x" * 100, "b", "short")]
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        result = judge_pairs(items, client, "judge-x", progress=False, mode="logprobs", max_chars=20)
    user = seen[0]["messages"][-1]["content"]
    assert "x" * 20 + " [...cut]" in user and "x" * 21 not in user and "Q" * 20 + " [...cut]" in user
    assert [j.verdict for j in result.judgments] == ["tie"]


def test_a_judgments_soft_preference_turns_with_its_sides_and_is_checked_when_read(tmp_path):
    from koala_lib.evaluation.judgments import Judgment, JudgmentError, read_judgments, write_judgments

    j = Judgment("k0", "koala", "a", "b", "A", "judge", False, "2026-01-01T00:00:00+00:00", "llm", 0.8)
    back = j.oriented("b", "a")
    assert (back.verdict, back.swapped, back.preference) == ("B", True, pytest.approx(0.2))
    path = write_judgments(tmp_path / "j.jsonl", [j, Judgment("k1", "koala", "a", "b", "tie", "r", False, j.time)])
    assert [x.preference for x in read_judgments(path)] == [0.8, None]
    for bad in ("true", '"0.3"', "1.5"):
        path.write_text(json.dumps(j.to_row())[:-1].replace('"preference": 0.8', f'"preference": {bad}') + "}\n")
        with pytest.raises(JudgmentError, match=r"j.jsonl:1: .*preference"):
            read_judgments(path)

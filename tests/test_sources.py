"""Each source parser on hand-made rows in the upstream schema."""

import pytest

from koala_lib.config import load
from koala_lib.data.schema import Reject, Turn
from koala_lib.data.sources import SOURCES

CFG = load("demo")
DATA = CFG.data


def parse(name, row, key="f.jsonl:1", data=DATA, **src_changes):
    import dataclasses

    src = dataclasses.replace(getattr(DATA.sources, name), **src_changes)
    return SOURCES[name].parse(row, key, src, data)


def reason(name, row, **kw):
    with pytest.raises(Reject) as err:
        parse(name, row, **kw)
    return err.value.reason


def test_sharegpt_repairs_roles_and_converts_html():
    row = {
        "id": "abc_0",
        "conversations": [
            {"from": "gpt", "value": "Hello! How can I help?"},
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "Sort a list"},
            {"from": "human", "value": "in Python"},
            {"from": "gpt", "value": "<div class=\"markdown prose\"><p>Use <code>sorted(xs)</code>.</p></div>"},
            {"from": "human", "value": "thanks"},
        ],
    }
    (r,) = parse("sharegpt", row)
    assert r.id == "sharegpt:abc_0"
    assert r.turns == (Turn("user", "Sort a list\n\nin Python"), Turn("assistant", "Use `sorted(xs)`."))
    assert r.meta["repairs"] == ["system_turn_dropped", "same_role_turns_merged", "leading_answer_dropped", "unanswered_question_dropped"]


def test_sharegpt_bad_rows():
    assert reason("sharegpt", {"id": "x", "conversations": "oops"}) == "malformed"
    assert reason("sharegpt", {"id": "x", "conversations": [{"from": "narrator", "value": "x"}]}) == "malformed"
    assert reason("sharegpt", {"id": "x", "conversations": [{"from": "human"}]}) == "malformed"
    assert reason("sharegpt", {"id": "x", "conversations": [{"from": "human", "value": "only a question"}]}) == "empty"


def test_hc3_both_or_human_answers():
    row = {"id": 7, "question": "Why is the sky blue?", "human_answers": ["Rayleigh scattering."], "chatgpt_answers": ["Because of scattering.", ""], "source": "open_qa"}
    assert [r.id for r in parse("hc3", row)] == ["hc3:7:human0", "hc3:7:chatgpt0"]
    assert [r.meta["answer_by"] for r in parse("hc3", row, answers="human")] == ["human"]
    assert reason("hc3", {**row, "human_answers": "text"}) == "malformed"
    assert reason("hc3", {**row, "human_answers": [], "chatgpt_answers": []}) == "empty"


def test_oig_turn_tags():
    row = {"text": "<human>: What is 2+3?\n<bot>: 2+3 = 5.\n<human>: And times 2?\n<bot>: 10.", "metadata": {"source": "gsm"}}
    (r,) = parse("oig", row, key="unified_poetry_2_song.jsonl:3")
    assert [t.text for t in r.turns] == ["What is 2+3?", "2+3 = 5.", "And times 2?", "10."]
    assert r.meta == {"file": "unified_poetry_2_song.jsonl", "source": "gsm"}
    assert reason("oig", {"text": "no tags here"}) == "malformed"
    assert reason("oig", {"text": "<human>: only a question"}) == "empty"


def test_alpaca_joins_instruction_and_input():
    (r,) = parse("alpaca", {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"})
    assert r.turns[0].text == "Translate to French.\n\nGood morning"
    (r,) = parse("alpaca", {"instruction": "Name a prime.", "input": "", "output": "7"})
    assert r.turns[0].text == "Name a prime."
    assert reason("alpaca", {"instruction": "x", "input": "", "output": ""}) == "empty"
    assert reason("alpaca", {"instruction": 3, "input": "", "output": "y"}) == "malformed"


def test_hh_pair_gives_positive_and_negative():
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road?",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No.",
    }
    pos, neg = parse("hh", row, key="harmless-base/train.jsonl.gz:4")
    assert (pos.preference, neg.preference) == ("positive", "negative")
    assert pos.id == "hh:harmless-base/train.jsonl.gz:4:pos"
    assert neg.turns[-1] == Turn("assistant", "No.") and len(neg.turns) == 4
    data = load("demo", ["data.pairs=positive_only"]).data
    assert [r.preference for r in parse("hh", row, data=data)] == ["positive"]


def test_hh_keeps_an_empty_final_answer_and_merges_repeated_speakers():
    row = {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nAssistant: b", "rejected": "\n\nHuman: q\n\nAssistant: "}
    pos, neg = parse("hh", row)
    assert pos.turns == (Turn("user", "q"), Turn("assistant", "a\n\nb"))
    assert neg.turns == (Turn("user", "q"), Turn("assistant", ""))
    assert reason("hh", {"chosen": "no speakers at all", "rejected": "x"}) == "malformed"
    assert reason("hh", {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q"}) == "empty"


def webgpt_row(**kw):
    row = {
        "question": {"dataset": "eli5", "id": "q1", "full_text": "Why do cats purr?"},
        "quotes_0": {"title": ["Cat - Wiki"], "extract": ["Purring is a vibration."]},
        "answer_0": "They purr when content [1].",
        "tokens_0": [],
        "score_0": 1.0,
        "quotes_1": {"title": [], "extract": []},
        "answer_1": "Nobody knows.",
        "tokens_1": [],
        "score_1": -1.0,
    }
    row.update(kw)
    return row


def test_webgpt_better_answer_is_positive_with_its_quotes():
    pos, neg = parse("webgpt", webgpt_row())
    assert pos.turns[0].text == "Why do cats purr?\n\nUse the following sources in your answer:\n[1] Cat - Wiki: Purring is a vibration."
    assert pos.turns[1].text == "They purr when content [1]."
    assert neg.turns == (Turn("user", "Why do cats purr?"), Turn("assistant", "Nobody knows."))
    pos, neg = parse("webgpt", webgpt_row(score_0=-0.5, score_1=0.5))
    assert pos.turns[1].text == "Nobody knows."


def test_webgpt_tie_and_missing_answer():
    assert reason("webgpt", webgpt_row(score_0=0.0, score_1=0.0)) == "tie"
    row = webgpt_row()
    del row["answer_1"]
    assert reason("webgpt", row) == "malformed"


def summarize_row(**info):
    base = {"id": "t3_x", "post": "My cat ate my homework.", "title": "Help", "subreddit": "cats", "site": None, "article": None}
    base.update(info)
    return {"info": base, "summaries": [{"text": " cat ate homework", "policy": "sup1", "note": None}, {"text": " help", "policy": "ref", "note": None}], "choice": 0, "worker": "w", "batch": "b", "split": "train", "extra": {"confidence": 7}}


def test_summarize_post_and_article_rules():
    pos, neg = parse("summarize", summarize_row())
    assert pos.turns[0].text == "Summarize the following Reddit post.\nSUBREDDIT: r/cats\nTITLE: Help\nPOST: My cat ate my homework."
    assert (pos.turns[1].text, neg.turns[1].text) == ("cat ate homework", "help")
    pos, _ = parse("summarize", summarize_row(post=None, subreddit=None, title=None, article="Storms hit the coast.", site="dailymail"))
    assert pos.turns[0].text == "Summarize the following news article.\nARTICLE: Storms hit the coast."
    assert "None" not in pos.turns[0].text
    assert reason("summarize", summarize_row(post=None, article=None)) == "empty"
    assert reason("summarize", {**summarize_row(), "choice": 2}) == "malformed"


def test_sharegpt_empty_turns_take_their_pair_along():
    row = {"id": "e", "conversations": [
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "<p></p>"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
        {"from": "human", "value": "  "}, {"from": "gpt", "value": "a3"},
        {"from": "human", "value": "q4"}, {"from": "gpt", "value": "a4"},
    ]}
    (r,) = parse("sharegpt", row)
    assert [t.text for t in r.turns] == ["q2", "a2", "q4", "a4"]
    assert r.meta["repairs"] == ["empty_answer_dropped_with_question", "empty_question_dropped_with_answer"]

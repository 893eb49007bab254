"""Answer health: empty, cut and degenerate answers counted per model; pairs with an empty answer judged by rule."""

from koala_lib.evaluation.answer_health import RULE_JUDGE, answer_health, health_line, problems, split_by_rule, turn_markers
from koala_lib.evaluation.judgments import PairItem


def test_markers_come_from_the_template(make_cfg):
    assert turn_markers(make_cfg("smoke")) == ("BEGINNING OF CONVERSATION:", "USER:", "GPT:", "An Unhelpful Answer:")
    assert "A helpful answer:" in turn_markers(make_cfg("smoke", "conditioning.markers=blog"))


def test_each_problem_is_named():
    markers = ("USER:", "GPT:")
    assert problems({"output": "  \n", "finish_reason": "stop"}, markers) == {"empty"}
    assert problems({"output": "", "finish_reason": "length"}, markers) == {"empty", "cut"}
    assert problems({"output": "Paris is the capital.", "finish_reason": "length"}, markers) == {"cut"}
    assert problems({"output": "Priya GPT: Thank you for the help!"}, markers) == {"turn_marker", "degenerate"}
    loop = "the cat sat on the mat " * 6
    assert problems({"output": loop, "finish_reason": "stop"}, markers) == {"repetition", "degenerate"}
    varied = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    assert problems({"output": varied}, markers) == set()


def test_counts_per_model_over_kept_prompts():
    answers = {"a": [{"id": "1", "output": ""}, {"id": "2", "output": "fine"}, {"id": "3", "output": ""}],
               "b": [{"id": "1", "output": "USER: again", "finish_reason": "length"}]}
    health = answer_health(answers, ("USER:",), keep=lambda r: r["id"] != "3")
    assert health["a"] == {"answers": 2, "empty": 1, "cut": 0, "degenerate": 0, "turn_marker": 0, "repetition": 0}
    assert health["b"] == {"answers": 1, "empty": 0, "cut": 1, "degenerate": 1, "turn_marker": 1, "repetition": 0}
    assert health_line(health) == "answers empty / cut at the token limit / degenerate: a 1/0/0 of 2, b 0/1/1 of 1"


def test_a_pair_with_an_empty_answer_is_judged_by_rule():
    items = [PairItem("p1", "koala", "q", "m", "an answer", "o", " "), PairItem("p2", "koala", "q", "m", "", "o", "yes"),
             PairItem("p3", "koala", "q", "m", "", "o", ""), PairItem("p4", "koala", "q", "m", "x", "o", "y")]
    judged, ruled = split_by_rule(items)
    assert [it.prompt_id for it in judged] == ["p4"]
    assert [(j.prompt_id, j.verdict, j.preference, j.judge) for j in ruled] == [
        ("p1", "A", 1.0, RULE_JUDGE), ("p2", "B", 0.0, RULE_JUDGE), ("p3", "tie", 0.5, RULE_JUDGE)]

"""Stage 1 on real upstream files (../shared/data), which nobody here wrote."""

import pytest

from koala_lib.data.curate import curate
from koala_lib.data.readers import SourceFormatError


def run(make_cfg, name, path, *extra):
    cfg = make_cfg("smoke", f"data.mixture={name}", f"data.sources.{name}.path={path}", "data.cap_per_source=null", *extra)
    result = curate(cfg, progress=False)
    rep = result.report["sources"][name]
    assert rep["read"] == rep["kept"] + sum(rep["rejected"].values())
    return result, rep


def test_anthropic_hh_harmless_test_split(make_cfg, shared_data):
    result, rep = run(make_cfg, "hh", shared_data / "sources/hh_rlhf/harmless-base_test.jsonl.gz")
    assert (rep["read"], rep["kept"], rep["rejected"]) == (2312, 2312, {})
    assert rep["by_preference"] == {"negative": 2312, "positive": 2312}
    assert all(r.turns[0].role == "user" and r.turns[-1].role == "assistant" for r in result.records)


def test_anthropic_hh_positive_only_mode(make_cfg, shared_data):
    _, rep = run(make_cfg, "hh", shared_data / "sources/hh_rlhf/harmless-base_test.jsonl.gz", "data.pairs=positive_only")
    assert rep["by_preference"] == {"positive": 2312}


def test_sharegpt_v3_records(make_cfg, shared_data):
    result, rep = run(make_cfg, "sharegpt", shared_data / "sources/sharegpt/sharegpt_v3_original_example.json")
    assert (rep["read"], rep["kept"], rep["records"]) == (5, 5, 5)
    assert [r.id for r in result.records] == ["sharegpt:QWJhYvA_0", "sharegpt:i6IyJda_0", "sharegpt:A5AbcES_0", "sharegpt:hRPPgZT_0", "sharegpt:hRPPgZT_8"]
    assert [len(r.turns) for r in result.records] == [10, 2, 2, 8, 6]
    assert result.records[1].meta["model"] == ""  # the field is present and empty upstream
    answers = "\n".join(t.text for r in result.records for t in r.turns if t.role == "assistant")
    assert "```java\nimport java.util.HashMap;" in answers  # markdown code kept as is
    assert "```csharp\nThis is a new student at point 3, 4\n```" in answers


def test_alpaca_first_335(make_cfg, shared_data):
    """335 read; record 284 upstream has an empty output, so it is counted as `empty`, not trained on."""
    result, rep = run(make_cfg, "alpaca", shared_data / "sources/alpaca/alpaca_data_head335.json")
    assert (rep["read"], rep["kept"], rep["rejected"]) == (335, 334, {"empty": 1})
    assert "alpaca:alpaca_data_head335.json[284]" not in {r.id for r in result.records}


def test_summarize_readme_comparison(make_cfg, shared_data):
    result, rep = run(make_cfg, "summarize", shared_data / "sources/summarize_from_feedback/readme_example_comparison.jsonl")
    assert rep["by_preference"] == {"negative": 1, "positive": 1}
    pos = result.records[0]
    assert pos.turns[0].text.startswith("Summarize the following Reddit post.\nSUBREDDIT: r/legaladvice\nTITLE: Anybody with knowledge of the Dutch law")
    assert pos.turns[1].text.startswith("we suspect other party involved of speeding")  # choice 1, leading space stripped


def test_summarize_axis_eval_file_is_not_a_comparisons_file(make_cfg, shared_data):
    with pytest.raises(SourceFormatError, match=r"readme_example_axis_eval.jsonl: not a summarize file"):
        run(make_cfg, "summarize", shared_data / "sources/summarize_from_feedback/readme_example_axis_eval.jsonl")

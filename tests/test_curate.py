"""Stage 1 end to end on the kit's demo data: every row accounted for, edge cases where the demo README says."""

import json

import pytest

from koala_lib.data.curate import curate, load_curated
from koala_lib.data.schema import REJECTION_REASONS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from koala_lib.config import load

    tmp = tmp_path_factory.mktemp("demo")
    cfg = load("demo", [f"runs_dir={tmp}", f"figures_dir={tmp}/fig"])
    return cfg, curate(cfg, progress=False)


def test_every_row_is_kept_or_counted_under_a_named_reason(demo):
    cfg, result = demo
    logged = [json.loads(line) for line in (cfg.run_dir / "data" / "rejections.jsonl").read_text().splitlines()]
    for name, rep in result.report["sources"].items():
        assert rep["read"] > 0, name
        assert rep["read"] == rep["kept"] + sum(rep["rejected"].values()), name
        assert set(rep["rejected"]) <= set(REJECTION_REASONS), name
        assert sum(1 for r in logged if r["source"] == name) == sum(rep["rejected"].values()), name
    assert len(result.records) == result.report["totals"]["records"]


def test_outputs_on_disk_round_trip(demo):
    cfg, result = demo
    assert load_curated(cfg) == result.records
    lines = (cfg.run_dir / "data" / "curated.jsonl").read_text().splitlines()
    assert len(lines) == len(result.records)
    assert json.loads((cfg.run_dir / "data" / "report.json").read_text()) == result.report
    assert (cfg.figures_path / "data_composition.png").is_file()


def test_records_have_the_unified_shape(demo):
    _, result = demo
    ids = [r.id for r in result.records]
    assert len(ids) == len(set(ids))
    for r in result.records:
        assert r.turns[0].role == "user" and r.turns[-1].role == "assistant"
        assert all(t.role == ("user" if i % 2 == 0 else "assistant") for i, t in enumerate(r.turns))
        assert r.preference in ("positive", "negative", "none")
        assert "None" not in r.turns[0].text.split()  # no null field rendered as text


def test_sharegpt_html_is_markdown_and_filters_fire(demo):
    _, result = demo
    sharegpt = [r for r in result.records if r.source == "sharegpt"]
    answers = "\n".join(t.text for r in sharegpt for t in r.turns if t.role == "assistant")
    assert '<div class="markdown' not in answers and "Copy code" not in answers
    assert "```python\n" in answers
    rejected = result.report["sources"]["sharegpt"]["rejected"]
    for reason in ("keyword", "non_english", "duplicate", "malformed"):
        assert rejected.get(reason, 0) >= 1, reason


def test_preference_sources_give_pairs(demo):
    _, result = demo
    for name in ("hh", "webgpt", "summarize"):
        prefs = result.report["sources"][name]["by_preference"]
        assert prefs["positive"] == prefs["negative"] == result.report["sources"][name]["kept"], name
    assert result.report["sources"]["webgpt"]["rejected"].get("tie", 0) >= 1


def test_smoke_cap_and_positive_only(make_cfg):
    result = curate(make_cfg("smoke", "data.pairs=positive_only"), progress=False)
    for name, rep in result.report["sources"].items():
        assert rep["records"] <= 40, name
        assert "negative" not in rep["by_preference"], name
        assert rep["read"] == rep["kept"] + sum(rep["rejected"].values()), name


def test_runs_are_deterministic_to_the_byte(make_cfg, tmp_path):
    first = make_cfg("smoke")
    curate(first, progress=False)
    a = (first.run_dir / "data" / "curated.jsonl").read_bytes()
    fig_a = (first.figures_path / "data_composition.png").read_bytes()
    curate(first, progress=False)
    assert (first.run_dir / "data" / "curated.jsonl").read_bytes() == a
    assert (first.figures_path / "data_composition.png").read_bytes() == fig_a


EXPECTED_DEMO = {  # from koala_lib/data/demo/README.md: each deliberate edge case, counted
    "sharegpt": (70, 51, 53, {"duplicate": 8, "keyword": 3, "malformed": 2, "non_english": 6}),
    "hc3": (42, 40, 84, {"malformed": 2}),
    "oig": (45, 44, 44, {"malformed": 1}),
    "alpaca": (70, 69, 69, {"empty": 1}),
    "hh": (49, 48, 96, {"malformed": 1}),
    "webgpt": (30, 26, 52, {"malformed": 1, "tie": 3}),
    "summarize": (34, 32, 64, {"empty": 1, "malformed": 1}),
}


@pytest.mark.parametrize("name", list(EXPECTED_DEMO))
def test_demo_counts_match_the_documented_edge_cases(demo, name):
    _, result = demo
    rep = result.report["sources"][name]
    assert (rep["read"], rep["kept"], rep["records"], rep["rejected"]) == EXPECTED_DEMO[name]


def test_demo_rejections_are_logged_where_the_demo_readme_says(demo):
    cfg, _ = demo
    logged = {(r["source"], r["location"]): r["reason"] for r in map(json.loads, (cfg.run_dir / "data" / "rejections.jsonl").read_text().splitlines())}
    assert logged[("sharegpt", "sg_demo.json[23]")] == "malformed"  # the `narrator` role
    assert logged[("sharegpt", "sg_demo.json[27]")] == "malformed"  # conversations is a string
    assert logged[("sharegpt", "sg_demo.json[26]")] == "duplicate"
    assert logged[("hc3", "all.jsonl:17")] == "malformed"  # cut mid-string
    assert logged[("oig", "unified_poetry_2_song.jsonl:9")] == "malformed"  # no <human>: tag
    assert logged[("hh", "helpful-online/train.jsonl.gz:7")] == "malformed"
    assert [logged[("webgpt", f"comparisons.jsonl:{n}")] for n in (7, 18, 25, 27)] == ["tie", "tie", "tie", "malformed"]
    assert (logged[("summarize", "comparisons.jsonl:18")], logged[("summarize", "comparisons.jsonl:26")]) == ("malformed", "empty")


def test_demo_special_rows(demo):
    _, result = demo
    by_id = {r.id: r for r in result.records}
    news = by_id["summarize:comparisons.jsonl:9:pos"]
    assert news.turns[0].text.startswith("Summarize the following news article.")
    long_parts = [r for r in result.records if r.id.startswith("sharegpt:") and "#p" in r.id]
    assert len(long_parts) == 3 and all(r.chars() <= 12000 for r in long_parts)
    upstream = {r.meta["upstream_id"] for r in result.records if r.source == "sharegpt"}
    assert len(upstream) == 51  # every kept ShareGPT row keeps its upstream id; the split one gives 3 records


def test_output_does_not_depend_on_the_hash_seed(tmp_path):
    import os
    import subprocess
    import sys

    outputs = []
    for seed in ("1", "2"):
        runs = tmp_path / f"seed{seed}"
        subprocess.run(
            [sys.executable, "-m", "koala_lib.cli", "curate", "--profile", "smoke", "--quiet", "--runs-dir", str(runs), "--set", f"figures_dir={runs}/fig"],
            check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed},
        )
        outputs.append(((runs / "smoke" / "data" / "curated.jsonl").read_bytes(), (runs / "fig" / "data_composition.png").read_bytes()))
    assert outputs[0] == outputs[1]


def test_a_failed_run_leaves_no_temporary_file(make_cfg, tmp_path):
    """A source that cannot be read stops stage 1 with its error; the half-written rejections log is removed, not
    left as rejections.jsonl.tmp beside the outputs."""
    from koala_lib.data.readers import SourceFormatError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"not": "hc3"\n', encoding="utf-8")
    cfg = make_cfg("smoke", f"data.sources.hc3.path={bad}")
    with pytest.raises(SourceFormatError, match=r"bad\.jsonl:1"):
        curate(cfg, progress=False)
    assert sorted(p.name for p in (cfg.run_dir / "data").iterdir()) == []

"""Stage 4's test sets: demo prompts, upstream formats, bad rows counted by reason, seeded subsets, downloads."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from koala_lib.config import ConfigError
from koala_lib.inference.testsets import TEST_SETS, TestPrompt, load_test_set, natural_key


def write_koala(path: Path, ids, prompt="Say hi.") -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": f"{prompt} ({i})"}) + "\n" for i in ids), encoding="utf-8")
    return path


def test_names():
    assert TEST_SETS == ("koala", "alpaca")


def cfg_of(make_cfg, *overrides: str):
    """The smoke profile without its `limit` on the test sets (unless the overrides set one)."""
    keys = {o.split("=")[0] for o in overrides}
    unlimited = [f"eval.test_sets.{n}.limit=null" for n in ("koala", "alpaca") if f"eval.test_sets.{n}.limit" not in keys]
    return make_cfg("smoke", *unlimited, *overrides)


def test_demo_koala_set(make_cfg):
    result = load_test_set(cfg_of(make_cfg), "koala")
    assert len(result.prompts) == 37 and result.rows == 38
    assert result.rejected == Counter({"not_json": 1})
    assert len(result.problems) == 1 and result.problems[0].startswith("koala_test_set.jsonl:13: not_json: invalid JSON")
    # natural order (koala_10 after koala_9); koala_12 is the id of the bad line 13
    assert [p.id for p in result.prompts] == [f"koala_{i}" for i in range(38) if i != 12]
    assert all(p.test_set == "koala" and p.instruction.strip() for p in result.prompts)
    assert result.source.endswith("koala_lib/data/demo/eval/koala_test_set.jsonl")


def test_demo_alpaca_set_joins_instruction_and_input(make_cfg):
    result = load_test_set(cfg_of(make_cfg), "alpaca")
    assert len(result.prompts) == 37 and result.rows == 38  # the default subset of 180 is larger: all are kept
    assert result.rejected == Counter({"missing_field": 1})
    assert result.problems == ["user_oriented_instructions.jsonl:13: missing_field: instruction: absent"]
    assert [p.id for p in result.prompts] == [f"user_oriented_task_{i}" for i in range(38) if i != 12]
    assert sum("\n\n" not in p.instruction for p in result.prompts) == 6  # the tasks with an empty input
    by_id = {p.id: p for p in result.prompts}
    assert by_id["user_oriented_task_1"] == TestPrompt(
        "user_oriented_task_1", "alpaca",
        "Correct the grammar and spelling mistakes in the sentence.\n\nTheir going to the libary tomorow to return there books.",
    )
    assert by_id["user_oriented_task_4"].instruction == "Suggest five songs for a relaxing Sunday morning playlist."  # empty input
    assert by_id["user_oriented_task_3"].instruction.endswith("and why.\n\nx = [1, 2, 3]\ny = x\ny.append(4)\nprint(x)")


def test_natural_order(make_cfg, tmp_path):
    path = write_koala(tmp_path / "t.jsonl", ["koala_10", "koala_2", "koala_1", "koala_0"])
    result = load_test_set(cfg_of(make_cfg, f"eval.test_sets.koala.path={path}"), "koala")
    assert [p.id for p in result.prompts] == ["koala_0", "koala_1", "koala_2", "koala_10"]
    assert sorted(["b_2", "a_10", "a_9"], key=natural_key) == ["a_9", "a_10", "b_2"]


def test_subset_is_seeded_reproducible_and_sorted(make_cfg, tmp_path):
    ids = [f"koala_{i}" for i in range(30)]
    path = write_koala(tmp_path / "t.jsonl", reversed(ids))  # file order must not matter

    def subset(seed: int) -> list[str]:
        cfg = cfg_of(make_cfg, f"eval.test_sets.koala.path={path}", "eval.test_sets.koala.subset=10", f"seed={seed}")
        return [p.id for p in load_test_set(cfg, "koala").prompts]

    first = subset(0)
    assert len(first) == 10 and first == subset(0)
    assert first == sorted(first, key=natural_key)
    assert first == [ids[i] for i in sorted(np.random.default_rng(0).choice(30, size=10, replace=False))]  # the documented procedure
    assert subset(1) != first


def test_limit_applies_after_subset(make_cfg, tmp_path):
    assert [p.id for p in load_test_set(cfg_of(make_cfg, "eval.test_sets.koala.limit=3"), "koala").prompts] == ["koala_0", "koala_1", "koala_2"]
    path = write_koala(tmp_path / "t.jsonl", [f"koala_{i}" for i in range(30)])
    overrides = [f"eval.test_sets.koala.path={path}", "eval.test_sets.koala.subset=10"]
    subset = [p.id for p in load_test_set(cfg_of(make_cfg, *overrides), "koala").prompts]
    limited = load_test_set(cfg_of(make_cfg, *overrides, "eval.test_sets.koala.limit=4"), "koala")
    assert [p.id for p in limited.prompts] == subset[:4]
    assert limited.rows == 30  # rows read, before selection


@pytest.mark.parametrize("option", ["subset", "limit"])
def test_subset_and_limit_must_be_positive(make_cfg, option):
    with pytest.raises(ConfigError, match=rf"eval\.test_sets\.koala\.{option}: must be at least 1"):
        load_test_set(cfg_of(make_cfg, f"eval.test_sets.koala.{option}=0"), "koala")


def test_missing_file_is_named(make_cfg, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=r"eval\.test_sets\.alpaca\.path: no such file .*nope\.jsonl"):
        load_test_set(cfg_of(make_cfg, f"eval.test_sets.alpaca.path={missing}"), "alpaca")


def test_folder_path_finds_the_upstream_file_name(make_cfg, tmp_path):
    write_koala(tmp_path / "koala_test_set.jsonl", ["koala_0", "koala_1"])
    result = load_test_set(cfg_of(make_cfg, f"eval.test_sets.koala.path={tmp_path}"), "koala")
    assert len(result.prompts) == 2 and result.source == str(tmp_path / "koala_test_set.jsonl")


def test_unknown_name(make_cfg):
    with pytest.raises(ConfigError, match=r"unknown test set 'vicuna' \(allowed: koala, alpaca\)"):
        load_test_set(cfg_of(make_cfg), "vicuna")


def test_bad_rows_are_counted_by_reason(make_cfg, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(
        b'{"id": "koala_0", "prompt": "First."}\n'
        b'{"id": "koala_1", "prompt": "Second."}\n'
        b'{"id": "koala_1", "prompt": "Same id again."}\n'  # duplicate_id
        b"\n"  # blank lines are not rows
        b'{"id": "koala_2", "prompt": "   "}\n'  # empty_prompt
        b'{"id": "koala_3"}\n'  # missing_field
        b'{"id": 4, "prompt": "Numeric id."}\n'  # missing_field (not a string)
        b'["koala_5", "a list"]\n'  # not_object
        b'{"id": "koala_6", "prompt": "caf\xe9"}\n'  # not_json (not UTF-8)
        b"koala_7 plain text\n"  # not_json
    )
    result = load_test_set(cfg_of(make_cfg, f"eval.test_sets.koala.path={path}"), "koala")
    assert [(p.id, p.instruction) for p in result.prompts] == [("koala_0", "First."), ("koala_1", "Second.")]  # the first koala_1 kept
    assert result.rejected == Counter({"duplicate_id": 1, "empty_prompt": 1, "missing_field": 2, "not_object": 1, "not_json": 2})
    assert result.rows == 9 == len(result.prompts) + sum(result.rejected.values())
    assert result.problems[0] == "t.jsonl:3: duplicate_id: id 'koala_1' is used on an earlier line"
    assert [p.split(":")[1] for p in result.problems] == ["3", "5", "6", "7", "8", "9", "10"]  # physical line numbers


def test_alpaca_bad_instances(make_cfg, tmp_path):
    good = {"id": "user_oriented_task_0", "motivation_app": "Gmail", "instruction": "Do it.", "instances": [{"input": "  ", "output": "ok"}]}
    rows = [good, {**good, "id": "t1", "instances": []}, {**good, "id": "t2", "instances": [{"output": "x"}]},
            {**good, "id": "t3", "instances": ["x"]}, {**good, "id": "t4", "instruction": "", "instances": [{"input": "in"}]}]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = load_test_set(cfg_of(make_cfg, f"eval.test_sets.alpaca.path={path}"), "alpaca")
    assert [p.instruction for p in result.prompts] == ["Do it."]  # a blank input adds nothing
    assert result.rejected == Counter({"missing_field": 3, "empty_prompt": 1})


def test_file_in_the_wrong_format(make_cfg, tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"id": "koala_0", "prompt": "Hi"}], indent=2))
    with pytest.raises(ConfigError, match=r'array\.json: no valid koala test prompt in 6 rows \(expected JSON lines \{"id", "prompt"\}\)'):
        load_test_set(cfg_of(make_cfg, f"eval.test_sets.koala.path={path}"), "koala")
    koala_file = write_koala(tmp_path / "k.jsonl", ["koala_0"])  # the Koala layout given as the Alpaca set
    with pytest.raises(ConfigError, match=r"k\.jsonl: no valid alpaca test prompt .*instruction: absent"):
        load_test_set(cfg_of(make_cfg, f"eval.test_sets.alpaca.path={koala_file}"), "alpaca")


# ----------------------------------------------------------------------------- the public files


def test_unreachable_url_suggests_a_path(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path / "cache"))
    cfg = cfg_of(make_cfg, "eval.test_sets.koala.origin=public", "eval.test_sets.koala.url=http://127.0.0.1:9/x.jsonl")
    with pytest.raises(ConfigError, match=r"http://127\.0\.0\.1:9/x\.jsonl is unreachable .*--set eval\.test_sets\.koala\.path=FILE"):
        load_test_set(cfg, "koala")
    assert not (tmp_path / "cache" / "test_sets" / "x.jsonl").exists()


def test_download_once_into_the_cache(make_cfg, tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    write_koala(served / "koala_test_set.jsonl", ["koala_1", "koala_0"])
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path / "cache"))
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/koala_test_set.jsonl"
    cfg = cfg_of(make_cfg, "eval.test_sets.koala.origin=public", f"eval.test_sets.koala.url={url}")
    try:
        result = load_test_set(cfg, "koala")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert result.source == url
    assert [p.id for p in result.prompts] == ["koala_0", "koala_1"]
    cached = tmp_path / "cache" / "test_sets" / "koala_test_set.jsonl"
    assert cached.read_bytes() == (served / "koala_test_set.jsonl").read_bytes()
    assert sorted(p.name for p in cached.parent.iterdir()) == ["koala_test_set.jsonl"]  # no temp file left
    again = load_test_set(cfg, "koala")  # the server is gone: read from the cache
    assert [p.id for p in again.prompts] == ["koala_0", "koala_1"]


# ----------------------------------------------------------------------------- the real upstream files


def test_real_koala_test_set(make_cfg, shared_data):
    path = shared_data / "eval" / "koala_test_set.jsonl"
    result = load_test_set(cfg_of(make_cfg, f"eval.test_sets.koala.path={path}"), "koala")
    assert (len(result.prompts), result.rows, result.rejected) == (180, 180, Counter())
    assert [p.id for p in result.prompts] == [f"koala_{i}" for i in range(180)]


def test_real_alpaca_test_set(make_cfg, shared_data):
    path = shared_data / "eval" / "user_oriented_instructions.jsonl"
    subset = load_test_set(cfg_of(make_cfg, f"eval.test_sets.alpaca.path={path}"), "alpaca")
    assert (len(subset.prompts), subset.rows, subset.rejected) == (180, 252, Counter())
    assert [p.id for p in subset.prompts] == sorted((p.id for p in subset.prompts), key=natural_key)
    full = load_test_set(cfg_of(make_cfg, f"eval.test_sets.alpaca.path={path}", "eval.test_sets.alpaca.subset=null"), "alpaca")
    assert (len(full.prompts), full.rejected) == (252, Counter())
    assert [p.id for p in full.prompts] == [f"user_oriented_task_{i}" for i in range(252)]
    assert set(subset.prompts) <= set(full.prompts)
    rows = {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    for p in full.prompts:
        row = rows[p.id]
        text = row["instances"][0]["input"]
        assert p.instruction == (f"{row['instruction']}\n\n{text}" if text.strip() else row["instruction"])
    assert sum(p.instruction == rows[p.id]["instruction"] for p in full.prompts) == 44  # the tasks with an empty input

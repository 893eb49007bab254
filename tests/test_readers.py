"""Reading upstream files: every bad row located and counted, a wrong file named with the expected schema."""

import gzip
import json

import pytest

from koala_lib.data.curate import curate
from koala_lib.data.readers import SourceFormatError, iter_rows, source_files
from koala_lib.config import load

GOOD_HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}


def rows(name, path, max_bytes=1_000_000, **kw):
    import dataclasses

    src = dataclasses.replace(getattr(load("demo").data.sources, name), path=str(path), **kw)
    return list(iter_rows(name, src, max_bytes))


def test_jsonl_bad_lines_are_located(tmp_path):
    path = tmp_path / "all.jsonl"
    path.write_bytes(
        json.dumps({"a": 1}).encode() + b"\n"
        + b'{"a": "trunc\n'
        + b"\n"
        + b'{"a": "caf\xe9"}\n'
        + json.dumps({"a": "x" * 200}).encode() + b"\n"
    )
    out = rows("hc3", path, max_bytes=100)
    assert [(r.location, r.error.reason if r.error else None) for r in out] == [
        ("all.jsonl:1", None),
        ("all.jsonl:2", "malformed"),
        ("all.jsonl:4", "malformed"),
        ("all.jsonl:5", "oversized"),
    ]
    assert "invalid UTF-8" in out[2].error.detail
    assert "invalid JSON" in out[1].error.detail


def test_json_array_elements_and_a_cut_file(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text('\ufeff[{"id": "a"}, {"id": "b"}]')
    assert [(r.location, r.value) for r in rows("sharegpt", path)] == [("sg.json[0]", {"id": "a"}), ("sg.json[1]", {"id": "b"})]
    path.write_text('[{"id": "a"}, {"id": "b"},\n {"id": "c", "conversations": [')
    with pytest.raises(SourceFormatError, match=r"sg.json: invalid JSON in array element \[2\] at line 2.*2 elements before it were read"):
        rows("sharegpt", path)
    path.write_text('[{"id": "a"}, {"id": "b"}] {"id": "c"}')
    with pytest.raises(SourceFormatError, match=r"content after the closing \] of the array"):
        rows("sharegpt", path)
    path.write_text('[{"id": "a"} {"id": "b"}]')
    with pytest.raises(SourceFormatError, match=r"misses a comma after element \[0\]"):
        rows("sharegpt", path)


def test_json_array_with_invalid_utf8_element(tmp_path):
    path = tmp_path / "sg.json"
    path.write_bytes(b'[{"id": "a"}, {"id": "b\xff"}, {"id": "c"}]')
    out = rows("sharegpt", path)
    assert [r.error.reason if r.error else r.value["id"] for r in out] == ["a", "malformed", "c"]


def test_gzip_parquet_and_hub_layout_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "harmless-base").mkdir()
    with gzip.open(tmp_path / "harmless-base" / "train.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(GOOD_HH) + "\n")
    (tmp_path / "helpful-base").mkdir()
    with gzip.open(tmp_path / "helpful-base" / "train.jsonl.gz", "wt") as fh:
        fh.write(json.dumps(GOOD_HH) + "\n" + json.dumps(GOOD_HH) + "\n")
    out = rows("hh", tmp_path)  # the default files: one per data_dir, absent ones need not exist
    assert [r.location for r in out] == ["harmless-base/train.jsonl.gz:1", "helpful-base/train.jsonl.gz:1", "helpful-base/train.jsonl.gz:2"]

    table = pa.table({"instruction": ["Say hi"], "input": [""], "output": ["Hi"], "text": ["..."]})
    pq.write_table(table, tmp_path / "train-00000.parquet")
    out = rows("alpaca", tmp_path / "train-00000.parquet")
    assert out[0].location == "train-00000.parquet#0" and out[0].value["output"] == "Hi"


def test_folder_without_matching_files_is_a_clear_error(tmp_path):
    with pytest.raises(SourceFormatError, match="no file matches ShareGPT_V3_unfiltered_cleaned_split.json"):
        rows("sharegpt", tmp_path)
    with pytest.raises(SourceFormatError, match="no such file or folder"):
        rows("alpaca", tmp_path / "missing.json")


def test_hub_loading_code_runs_on_a_local_folder_in_the_hub_layout(tmp_path, make_cfg):
    """origin=hub goes through datasets.load_dataset; a local folder with the repo's layout stands in for the hub."""
    (tmp_path / "hub" / "harmless-base").mkdir(parents=True)
    with gzip.open(tmp_path / "hub" / "harmless-base" / "train.jsonl.gz", "wt") as fh:
        for _ in range(3):
            fh.write(json.dumps(GOOD_HH) + "\n")
    cfg = make_cfg("smoke", "data.mixture=hh", "data.sources.hh.origin=hub", f"data.sources.hh.hub_id={tmp_path / 'hub'}",
                   "data.sources.hh.files=harmless-base/train.jsonl.gz")
    result = curate(cfg, progress=False)
    hh = result.report["sources"]["hh"]
    assert (hh["read"], hh["kept"], hh["records"]) == (3, 3, 6)
    assert result.records[0].id.startswith(f"hh:{tmp_path / 'hub'}#0")


def test_unreachable_hub_names_the_way_out(make_cfg):
    cfg = make_cfg("smoke", "data.mixture=webgpt", "data.sources.webgpt.origin=hub", "data.sources.webgpt.hub_id=/nonexistent/webgpt")
    with pytest.raises(SourceFormatError, match=r"--set data.sources.webgpt.path=DIR"):
        curate(cfg, progress=False)


def test_a_file_of_another_schema_is_one_clear_error(tmp_path, make_cfg):
    path = tmp_path / "comparisons.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in range(30)))
    cfg = make_cfg("smoke", "data.mixture=summarize", f"data.sources.summarize.path={path}")
    with pytest.raises(SourceFormatError) as err:
        curate(cfg, progress=False)
    message = str(err.value)
    assert message.startswith("comparisons.jsonl: not a summarize file: its first 20 rows all fail to parse")
    assert "missing field info" in message and '"summaries": [{"text": str}' in message


def test_source_files_sorted_and_relative(tmp_path):
    for name in ("b.jsonl", "a.json", "sub/c.jsonl.gz", "skip.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    assert [rel for _, rel in source_files(tmp_path, ())] == ["a.json", "b.jsonl", "sub/c.jsonl.gz"]


def test_a_10_mb_record_is_counted_oversized_not_loaded(tmp_path, make_cfg):
    path = tmp_path / "all.jsonl"
    good = {"id": 1, "question": "Why?", "human_answers": ["Because."], "chatgpt_answers": [], "source": "open_qa"}
    huge = {**good, "id": 2, "human_answers": ["x" * 10_000_000]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(huge) + "\n" + json.dumps({**good, "id": 3}) + "\n")
    cfg = make_cfg("smoke", "data.mixture=hc3", f"data.sources.hc3.path={path}")
    result = curate(cfg, progress=False)
    hc3 = result.report["sources"]["hc3"]
    assert (hc3["read"], hc3["kept"], hc3["rejected"]) == (3, 2, {"oversized": 1})
    logged = [json.loads(line) for line in (cfg.run_dir / "data" / "rejections.jsonl").read_text().splitlines()]
    assert logged == [{"source": "hc3", "reason": "oversized", "location": "all.jsonl:2", "detail": f"{len(json.dumps(huge)):,} bytes"}]

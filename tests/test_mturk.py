"""MTurk export and import: the HIT layout, the batch CSV, the secret key, and results back to judgments."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from koala_lib.evaluation.judgments import Judgment, PairItem
from koala_lib.evaluation.mturk import (LABELS, REQUIRED_COLUMNS, MTurkError, export_batch, import_results,
                                        parse_submit_time, template_text)

MODELS = ("koala_distill", "alpaca_ref", "base")
TRICKY = [
    'Say "hi", then stop.',
    "Line one,\nline two,\r\n  indented \"quoted\", comma",
    "Unicode: café, 日本語, emoji 🐨, math ∑ x²",
    "Entities & <tags> &amp; stay literal; tab\there",
    "",
]

# MTurk's own columns in a batch results file, before Input.* and Answer.*
MTURK_COLUMNS = ["HITId", "HITTypeId", "Title", "Description", "Keywords", "Reward", "CreationTime", "MaxAssignments",
                 "RequesterAnnotation", "AssignmentDurationInSeconds", "AutoApprovalDelayInSeconds", "Expiration",
                 "NumberOfSimilarHITs", "LifetimeInSeconds", "AssignmentId", "WorkerId", "AssignmentStatus",
                 "AcceptTime", "SubmitTime", "AutoApprovalTime", "ApprovalTime", "RejectionTime", "RequesterFeedback",
                 "WorkTimeInSeconds", "LifetimeApprovalRate", "Last30DaysApprovalRate", "Last7DaysApprovalRate"]
SCREEN_LABEL = {side: label for label, side in LABELS.items()}


def make_items(n: int) -> list[PairItem]:
    pairs = [(MODELS[0], MODELS[1]), (MODELS[0], MODELS[2])]
    out = []
    for i in range(n):
        a, b = pairs[i % 2]
        prompt = f"Prompt {i}: {TRICKY[i % len(TRICKY)]}"
        first, second = f"First: {TRICKY[(i + 1) % len(TRICKY)]} #{i}", f"Second: {TRICKY[(i + 2) % len(TRICKY)]}"
        out.append(PairItem(f"koala_{i}", "koala" if i % 3 else "alpaca", prompt, a, first, b, second))
    return out


def read_batch(path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_results(path, header, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)


def test_template_shows_the_texts_and_hides_flip_and_models(tmp_path):
    items = make_items(6)
    batch = export_batch(items, tmp_path / "out")
    layout = batch.hit_html.read_text(encoding="utf-8")
    assert layout == template_text()
    assert '<script src="https://assets.crowd.aws/crowd-html-elements.js"></script>' in layout
    for needed in ("<crowd-form", "<crowd-classifier", 'name="preference"', "<short-instructions>",
                   "<full-instructions", "${prompt}", "${response_a}", "${response_b}", "white-space: pre-wrap",
                   *LABELS):
        assert needed in layout, needed
    assert "${flip}" not in layout and "${item_id}" not in layout
    assert "flip" not in layout.lower()
    for model in MODELS:
        assert model not in layout


def test_batch_csv_round_trips_text_and_hides_models(tmp_path):
    items = make_items(10)
    batch = export_batch(items, tmp_path / "out", seed=3)
    assert (batch.items, batch.batch_csv.name, batch.key.name) == (10, "batch.csv", "key.json")
    rows = read_batch(batch.batch_csv)
    key = json.loads(batch.key.read_text(encoding="utf-8"))
    assert list(rows[0]) == ["item_id", "prompt", "response_a", "response_b", "flip"]
    assert len(rows) == len(key) == 10 and {r["item_id"] for r in rows} == set(key)
    assert batch.flipped == sum(r["flip"] == "1" for r in rows)
    by_key = {it.key: it for it in items}
    for row in rows:
        entry = key[row["item_id"]]
        assert set(entry) == {"prompt_id", "test_set", "model_a", "model_b"}
        item = by_key[f"{entry['test_set']}/{entry['prompt_id']}/{entry['model_a']}/{entry['model_b']}"]
        assert row["prompt"] == item.prompt
        assert row["flip"] in ("0", "1")
        shown = (item.answer_b, item.answer_a) if row["flip"] == "1" else (item.answer_a, item.answer_b)
        assert (row["response_a"], row["response_b"]) == shown
        assert len(row["item_id"]) == 16 and int(row["item_id"], 16) >= 0
        assert not any(m in row["item_id"] for m in MODELS)
    text = batch.batch_csv.read_text(encoding="utf-8")
    assert "café" in text and "🐨" in text  # UTF-8, not escaped
    assert not any(model in text for model in MODELS)


def test_flip_is_seeded(tmp_path):
    items = make_items(20)
    one, two, other = (export_batch(items, tmp_path / name, seed=s) for name, s in (("a", 7), ("b", 7), ("c", 8)))
    assert one.batch_csv.read_bytes() == two.batch_csv.read_bytes()
    assert one.key.read_bytes() == two.key.read_bytes()
    assert one.batch_csv.read_bytes() != other.batch_csv.read_bytes()
    flips = Counter(r["flip"] for r in read_batch(one.batch_csv))
    assert flips["0"] > 0 and flips["1"] > 0 and sum(flips.values()) == 20
    # other items get other ids, so an old key never matches a new batch's results
    fewer = export_batch(items[:19], tmp_path / "d", seed=7)
    assert not set(json.loads(fewer.key.read_text())) & set(json.loads(one.key.read_text()))


def test_export_needs_items(tmp_path):
    with pytest.raises(MTurkError, match="no items"):
        export_batch([], tmp_path)


def test_import_gives_back_the_judgments(tmp_path):
    batch = export_batch(make_items(8), tmp_path / "out", seed=1)
    rows = read_batch(batch.batch_csv)
    key = json.loads(batch.key.read_text(encoding="utf-8"))
    assert {r["flip"] for r in rows} == {"0", "1"}
    header = MTURK_COLUMNS + [f"Input.{c}" for c in rows[0]] + ["Answer.preference.label", "Approve", "Reject"]
    times = ["Tue Apr 04 10:22:31 PDT 2023", "Mon Jan 09 23:05:00 PST 2023"]
    iso = ["2023-04-04T17:22:31+00:00", "2023-01-10T07:05:00+00:00"]
    wants = ["A", "B", "tie"]  # what each worker means, in model terms
    results, expected, screens = [], [], []
    for n, row in enumerate(rows):
        entry, flip = key[row["item_id"]], row["flip"] == "1"
        for w in range(3):
            want = wants[(n + w) % 3]
            screen = {"A": "B", "B": "A", "tie": "tie"}[want] if flip else want
            out = {"HITId": f"HIT{n}", "AssignmentId": f"AS{n}_{w}", "WorkerId": f"W{w}", "AssignmentStatus":
                   "Approved" if w else "Submitted", "SubmitTime": times[w % 2], "Title": "Compare, \"two\" answers",
                   "Answer.preference.label": SCREEN_LABEL[screen]}
            out.update({f"Input.{c}": v for c, v in row.items()})
            if w == 2:  # MTurk-style entities in an echoed input and in a label
                out["Input.prompt"] = out["Input.prompt"].replace("&", "&amp;").replace('"', "&quot;")
                out["Answer.preference.label"] = SCREEN_LABEL[screen].replace("e", "&#101;", 1)
            results.append(out)
            screens.append(screen)
            expected.append(Judgment(entry["prompt_id"], entry["test_set"], entry["model_a"], entry["model_b"], want,
                                     f"W{w}", flip, iso[w % 2], "mturk"))
    good = dict(results[0])
    results.append({**good, "AssignmentId": "R1", "WorkerId": "W9", "AssignmentStatus": "Rejected"})
    results.append({**good, "AssignmentId": "U1", "Input.item_id": "0123456789abcdef"})
    results.append({**good, "AssignmentId": "E1", "Answer.preference.label": ""})
    results.append({**good, "AssignmentId": "L1", "Answer.preference.label": "Response C is better"})
    results.append({**good, "AssignmentId": "F1", "Input.flip": "yes"})
    results.append({**good})  # the same assignment twice (two downloads concatenated)
    path = tmp_path / "Batch_1_batch_results.csv"
    write_results(path, header, results)

    got = import_results(path, batch.key)
    assert got.judgments == expected
    assert got.rejected == Counter(rejected_assignment=1, unknown_item=1, missing_label=1, unknown_label=1,
                                   bad_flip=1, duplicate_assignment=1)
    assert got.rows == len(results) == len(got.judgments) + sum(got.rejected.values())
    assert {j.swapped for j in got.judgments} == {False, True}
    assert all(j.source == "mturk" for j in got.judgments)
    # the side shown first won exactly when the worker picked Response A
    assert [j.first_won for j in got.judgments] == [{"A": True, "B": False, "tie": None}[s] for s in screens]


def test_import_accepts_the_plain_answer_column_and_task_answers(tmp_path):
    batch = export_batch(make_items(2), tmp_path / "out")
    rows = read_batch(batch.batch_csv)
    base = {"AssignmentId": "A1", "WorkerId": "W1", "AssignmentStatus": "Approved", "SubmitTime": "sometime",
            **{f"Input.{c}": v for c, v in rows[0].items()}}
    plain = tmp_path / "plain.csv"
    write_results(plain, [*base, "Answer.preference"], [{**base, "Answer.preference": "tie"}])
    got = import_results(plain, batch.key)
    assert [(j.verdict, j.time) for j in got.judgments] == [("tie", "sometime")] and not got.rejected
    raw = tmp_path / "raw.csv"
    answer = json.dumps([{"preference": {"label": "Response A is better"}}])
    write_results(raw, [*base, "Answer.taskAnswers"], [{**base, "Answer.taskAnswers": answer}])
    got = import_results(raw, batch.key)
    assert [j.verdict for j in got.judgments] == ["B" if rows[0]["flip"] == "1" else "A"]


def test_missing_columns_are_named(tmp_path):
    batch = export_batch(make_items(2), tmp_path / "out")
    path = tmp_path / "results.csv"
    write_results(path, ["HITId", "AssignmentId", "AssignmentStatus", "SubmitTime", "Input.item_id",
                         "Answer.preference.label"], [{"HITId": "H"}])
    with pytest.raises(MTurkError) as err:
        import_results(path, batch.key)
    message = str(err.value)
    assert str(path) in message and "WorkerId" in message and "Input.flip" in message
    assert "Input.item_id" not in message.split("missing column(s)")[1].split(";")[0]
    write_results(path, list(REQUIRED_COLUMNS), [])
    with pytest.raises(MTurkError, match=r"Answer\.preference\.label"):
        import_results(path, batch.key)
    path.write_text("", encoding="utf-8")
    with pytest.raises(MTurkError, match="empty"):
        import_results(path, batch.key)


def test_bad_key_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "key.json"
    bad.write_text(json.dumps({"abc": {"prompt_id": "p", "test_set": "koala", "model_a": "x"}}), encoding="utf-8")
    results = tmp_path / "r.csv"
    write_results(results, ["AssignmentId", "WorkerId", "AssignmentStatus", "SubmitTime", "Input.item_id",
                            "Input.flip", "Answer.preference.label"], [])
    with pytest.raises(MTurkError, match="key.json.*'abc'"):
        import_results(results, bad)


def test_submit_time_forms():
    assert parse_submit_time("Tue Apr 04 10:22:31 PDT 2023") == "2023-04-04T17:22:31+00:00"
    assert parse_submit_time("Sat Dec 30 23:59:59 PST 2023") == "2023-12-31T07:59:59+00:00"
    assert parse_submit_time("2019-12-01T13:04:59Z") == "2019-12-01T13:04:59+00:00"
    assert parse_submit_time(" Tue Apr 04 10:22:31 XYZ 2023 ") == "Tue Apr 04 10:22:31 XYZ 2023"
    assert parse_submit_time("yesterday") == "yesterday"

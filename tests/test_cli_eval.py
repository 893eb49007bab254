"""Stage 5's subcommands: leakage on files, and MTurk / rating-study judgments flowing into `koala report`."""

import csv
import json

import pytest

from koala_lib.cli import main


def test_leakage_on_files_writes_the_documented_json(tmp_path, capsys):
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "q1", "prompt": "How do I sort a dictionary by its values in Python?"},
        {"id": "q2", "prompt": "Write a haiku about autumn leaves."}]))
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"id": "t1", "source": "demo", "preference": "none", "meta": "{}", "turns": [
        {"role": "user", "text": "How do I sort a dictionary by its values in Python?"},
        {"role": "assistant", "text": "Use sorted() with a key."}]}) + "\n")
    out = tmp_path / "leaks.json"
    assert main(["leakage", "--queries", str(queries), "--train", str(train), "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["threshold"] == 20.0 and report["kept"] == ["q2"]
    assert [(r["id"], r["train_text"]) for r in report["removed"]] == [("q1", "How do I sort a dictionary by its values in Python?")]
    assert report["removed"][0]["bleu"] == pytest.approx(100.0)
    assert "1 removed, 1 kept" in capsys.readouterr().out


def test_leakage_needs_queries_train_and_out_together(tmp_path, capsys):
    assert main(["leakage", "--queries", str(tmp_path / "q.jsonl")]) == 2
    assert "--queries, --train and --out go together" in capsys.readouterr().err


def _profile_run(tmp_path):
    """A smoke run dir holding stage 4 answers of two models and an empty leakage report."""
    run = tmp_path / "smoke"
    (run / "generations").mkdir(parents=True)
    for name in ("base", "koala_all"):
        rows = [{"id": f"koala_{i}", "test_set": "koala", "instruction": f"Question {i}?", "output": f"{'A fine' if name == 'koala_all' else 'A plain'} answer {i}",
                 "generator": name, "dataset": "koala"} for i in range(3)]
        (run / "generations" / f"{name}.json").write_text(json.dumps(rows))
    (run / "eval").mkdir()
    (run / "eval" / "leakage.json").write_text(json.dumps({"threshold": 20.0, "removed": [], "kept": []}))
    return run


def test_mturk_round_trip_and_rating_study_reach_the_report(tmp_path, capsys):
    run = _profile_run(tmp_path)
    common = ["--profile", "smoke", "--runs-dir", str(tmp_path), "--set", f"figures_dir={tmp_path}/fig"]
    hits = tmp_path / "hits"
    assert main(["mturk", "export", *common, "--out", str(hits)]) == 0
    with open(hits / "batch.csv", newline="", encoding="utf-8") as fh:
        batch = list(csv.DictReader(fh))
    assert len(batch) == 3 and "koala_all" not in (hits / "batch.csv").read_text()
    # every worker prefers the koala_all answer, wherever the HIT put it
    results = tmp_path / "results.csv"
    with open(results, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["HITId", "AssignmentId", "WorkerId", "AssignmentStatus", "SubmitTime",
                         *[f"Input.{k}" for k in batch[0]], "Answer.preference.label"])
        for n, row in enumerate(batch):
            side = "Response A is better" if "A fine" in row["response_a"] else "Response B is better"
            writer.writerow([f"H{n}", f"A{n}", "W1", "Approved", "Tue Apr 04 10:22:31 PDT 2023", *row.values(), side])
    assert main(["mturk", "import", *common, "--results", str(results), "--key", str(hits / "key.json")]) == 0
    assert (run / "eval" / "judgments" / "mturk_results.jsonl").is_file()

    assert main(["rate", "init", *common, "--raters", "alice,bob"]) == 0
    out = capsys.readouterr().out
    assert "alice: http://127.0.0.1:8001/r/" in out and "bob: http://127.0.0.1:8001/r/" in out
    assert (run / "eval" / "rating" / "study.db").is_file()
    # the hint is a command that serves this very study: the options the user gave are kept
    hint = out.strip().splitlines()[-1]
    assert f"`koala rate serve --profile smoke --set figures_dir={tmp_path}/fig --runs-dir {tmp_path}`" in hint
    links = [line for line in out.splitlines() if ": http" in line]
    assert main(["rate", "links", *common]) == 0  # the command the server's start line names
    assert capsys.readouterr().out.splitlines() == links
    db = tmp_path / "elsewhere.db"
    assert main(["rate", "init", *common, "--db", str(db), "--raters", "carol", "--base-url", "http://10.0.0.5:8002"]) == 0
    assert f"--db {db} --host 0.0.0.0 --port 8002`" in capsys.readouterr().out
    assert main(["rate", "export", *common]) == 0
    assert "0 judgments" in capsys.readouterr().out  # nobody has rated yet

    assert main(["report", *common]) == 0
    summary = json.loads((run / "eval" / "summary.json").read_text())
    mturk = [r for r in summary["comparisons"] if r["source"] == "mturk" and r["test_set"] == "all"]
    assert len(mturk) == 1 and (mturk[0]["better"], mturk[0]["n"]) == (100.0, 3)
    assert json.loads((run / "eval" / "metrics.json").read_text())["mturk/koala_all_vs_base/win_rate"] == 100.0

"""`koala pipeline` runs the notebooks with papermill; a failing cell stops it with the error and the notebook path."""

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from koala_lib.pipeline import StageFailed, run_pipeline


@contextmanager
def terminal_output():
    """What is written to file descriptors 1 and 2 inside the block (the stage kernels' own output included), as a
    callable read after the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved, text = (os.dup(1), os.dup(2)), []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: "".join(text)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)
            sink.seek(0)
            text.append(sink.read().decode("utf-8", errors="replace"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke pipeline, run once for this module: (runs folder, stage runs, what the terminal showed)."""
    folder = tmp_path_factory.mktemp("smoke_run")
    with terminal_output() as printed:
        runs = run_pipeline("smoke", [f"runs_dir={folder}", f"figures_dir={folder}/fig"], progress=False)
    return folder, runs, printed()


@pytest.mark.slow
def test_smoke_pipeline_writes_metrics_matching_the_report(smoke_run):
    tmp_path, runs, printed = smoke_run
    assert "IPKernelApp" not in printed  # the kernels run over Unix sockets: no transport warning
    assert json.loads((tmp_path / "smoke" / "notebooks" / "pipeline.json").read_text()).keys() == {"01", "02", "03", "04", "05"}
    assert [r.stage for r in runs] == ["01", "02", "03", "04", "05"]
    assert runs[0].notebook == tmp_path / "smoke" / "notebooks" / "01_data_curation.ipynb"
    metrics = json.loads((tmp_path / "smoke" / "data" / "metrics.json").read_text())
    report = json.loads((tmp_path / "smoke" / "data" / "report.json").read_text())
    for name, rep in report["sources"].items():
        assert metrics["sources"][name]["read"] == rep["read"] == rep["kept"] + sum(rep["rejected"].values())
        assert rep["records"] <= 40  # the smoke cap
    assert metrics["totals"] == report["totals"]
    assert (tmp_path / "fig" / "data_composition.png").stat().st_size > 10_000
    conditioned = json.loads((tmp_path / "smoke" / "conditioned" / "metrics.json").read_text())
    # the arrays on disk agree with the stats: every token of every train example is in epoch 0's rows, once
    from koala_lib.config import load
    from koala_lib.conditioning.stage import load_rows

    cfg = load("smoke", [f"runs_dir={tmp_path}"])
    rows = load_rows(cfg, "train", 0)
    ids = np.load(tmp_path / "smoke" / "conditioned" / "examples" / "train" / "ids.npy")
    real = rows["segment_ids"] > 0
    assert int(real.sum()) == len(ids)
    assert sorted(rows["tokens"][real].tolist()) == sorted(ids.tolist())
    assert int(rows["loss_mask"].sum()) == int(np.load(tmp_path / "smoke" / "conditioned" / "examples" / "train" / "mask.npy").sum())
    padding = 1 - real.sum() / real.size
    assert conditioned["packed"]["padding_fraction"] == pytest.approx(padding, abs=1e-6)
    assert conditioned["packed"]["rows"] == rows["tokens"].shape[0] and rows["tokens"].shape[1] == 512
    eval_ids = np.load(tmp_path / "smoke" / "conditioned" / "examples" / "eval" / "ids.npy")
    assert sum(conditioned["tokens"].values()) == len(ids) + len(eval_ids)
    assert (tmp_path / "fig" / "packing_efficiency.png").is_file() and (tmp_path / "fig" / "token_lengths.png").is_file()
    # stage 3: both variants trained for the smoke's 4 steps; the loss and the held-out loss fall
    trained = json.loads((tmp_path / "smoke" / "train" / "metrics.json").read_text())
    assert sorted(trained) == ["koala_all", "koala_distill"]
    for m in trained.values():
        assert m["steps"] == 4 and m["last_loss"] < m["first_loss"]
        assert len(m["eval_losses"]) == 3 and m["eval_losses"][-1] < m["eval_losses"][0]  # steps 0, 2, 4
    assert (tmp_path / "fig" / "loss_curves.png").stat().st_size > 10_000
    # the same curves as TensorBoard event files, read back by TensorBoard's own EventAccumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for variant in trained:
        rows = [json.loads(line) for line in (tmp_path / "smoke" / "train" / variant / "metrics.jsonl").read_text().splitlines()]
        events = EventAccumulator(str(tmp_path / "smoke" / "train" / variant / "tensorboard"))
        events.Reload()
        for tag, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("eval/loss", "eval_loss"), ("train/grad_norm", "grad_norm")):
            logged = [(r["step"], r[key]) for r in rows if key in r]
            scalars = events.Scalars(tag)
            assert logged and [e.step for e in scalars] == [step for step, _ in logged]
            assert [e.value for e in scalars] == pytest.approx([value for _, value in logged], rel=1e-6)  # float32 in the file
    # the stage's progress went to its log beside the executed notebook (the kernel inherits KOALA_PROGRESS), not into it
    notebooks = tmp_path / "smoke" / "notebooks"
    progress = (notebooks / "03_finetune.progress.log").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("train koala_all: 4/4 step 100% [") and "tok/s" in line for line in progress)
    assert any(line.startswith("curate ") for line in (notebooks / "01_data_curation.progress.log").read_text(encoding="utf-8").splitlines())
    for executed in notebooks.glob("*.ipynb"):
        outputs = json.dumps([c.get("outputs", []) for c in json.loads(executed.read_text(encoding="utf-8"))["cells"]])
        assert "train koala_all:" not in outputs and "curate hc3:" not in outputs and "step/s" not in outputs, executed
        assert "Warning" not in outputs, executed  # no library warning that nobody acts on (tqdm's, JAX's donation)
    # stage 4: one AlpacaEval file per model, each answering the 4 + 4 smoke prompts
    generated = json.loads((tmp_path / "smoke" / "generate" / "metrics.json").read_text())
    assert sorted(generated["models"]) == ["chatgpt", "koala_all", "koala_distill"]  # chatgpt: the base model standing in
    assert generated["test_sets"]["koala"]["prompts"] == generated["test_sets"]["alpaca"]["prompts"] == 4
    for name in generated["models"]:
        rows = json.loads((tmp_path / "smoke" / "generations" / f"{name}.json").read_text())
        assert len(rows) == 8 and {r["generator"] for r in rows} == {name}
        assert [r["dataset"] for r in rows] == ["koala"] * 4 + ["selfinstruct"] * 4
        assert all(set(r) >= {"instruction", "output", "generator", "dataset"} for r in rows)
    assert (tmp_path / "fig" / "example_generations.png").stat().st_size > 10_000
    # stage 5: leakage report, one LLM judgment per kept prompt and comparison, the summary and both figures
    leakage = json.loads((tmp_path / "smoke" / "eval" / "leakage.json").read_text())
    assert len(leakage["removed"]) + len(leakage["kept"]) == 8
    judged = json.loads((tmp_path / "smoke" / "eval" / "judge.json").read_text())
    assert judged["weak"] is True and judged["pairs"] == 2 * len(leakage["kept"]) == judged["sent_to_judge"] + judged["by_rule"]
    assert sum(judged["outcomes"].values()) == judged["sent_to_judge"]
    assert judged["mode"] == "logprobs"  # `auto`: the kit's server returns logprobs
    evaluated = json.loads((tmp_path / "smoke" / "eval" / "metrics.json").read_text())
    assert evaluated["judgments"] == judged["judgments"] == judged["pairs"] - judged["outcomes"].get("no_verdict", 0) and evaluated["leaked_queries"] == len(leakage["removed"])
    assert evaluated["judged_by_rule"] == judged["by_rule"] and {f"answer_health/{m}/empty" for m in ("koala_all", "koala_distill", "chatgpt")} <= set(evaluated)
    summary = json.loads((tmp_path / "smoke" / "eval" / "summary.json").read_text())
    # the random smoke judge rarely has a verdict letter among its top tokens: comparisons exist exactly for the pairs it judged
    judged_pairs = {(j["model_a"], j["model_b"]) for j in map(json.loads, (tmp_path / "smoke" / "eval" / "judgments" / "llm.jsonl").read_text().splitlines())}
    assert {(r["model_a"], r["model_b"]) for r in summary["comparisons"]} == judged_pairs
    assert judged_pairs <= {("koala_all", "koala_distill"), ("koala_all", "chatgpt")}
    calibration = json.loads((tmp_path / "smoke" / "eval" / "calibration.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in calibration.json"))
    assert calibration["judge"] == judged["judge"] == "random debug model (kit server)" and calibration["mode"] == "logprobs"
    assert calibration["judged"] + calibration["no_verdict"] == calibration["pairs"]
    if calibration["judged"]:
        assert f"agrees with human labels {calibration['agreement']:.1f} %" in summary["judge"]["line"]
    else:  # the random model rarely puts a letter among its top tokens
        agreement_line, *rest = summary["judge"]["line"].splitlines()  # then the card's verdict
        assert agreement_line.endswith(f"no verdict on any of {calibration['pairs']} human-labelled pairs")
        assert rest[-1].startswith("judge unfit: ")
    evald = tmp_path / "smoke" / "eval"
    assert sum(len(p.read_text().splitlines()) for p in (evald / "fastchat").rglob("*.jsonl")) == judged["sent_to_judge"]
    annotations = [a for p in (evald / "alpaca_eval").rglob("annotations.json") for a in json.loads(p.read_text())]
    assert len(annotations) == judged["judgments"] and all(1.0 <= a["preference"] <= 2.0 for a in annotations)
    assert all(r["alpaca_eval_file"].startswith("eval/alpaca_eval/") for r in summary["comparisons"] if r["test_set"] != "all")
    # the judge card: measured on the canaries before the report; the random smoke judge is unfit, and says why
    card = json.loads((evald / "judge_card.json").read_text())
    assert card["canaries"] >= 40 and card["fit"] is False and card["reasons"]
    assert evaluated["judge_card"]["fit"] is False and evaluated["judge_unfit"] == "; ".join(card["reasons"])
    assert evaluated["judge_calls"] == judged["calls"] + calibration["calls"] + card["calls"] >= 2 * card["canaries"]
    assert evaluated["judge_cache_hits"] == 0
    # stage 5 again on the unchanged run: every verdict comes from the call cache, no call is sent, the same numbers
    run_pipeline("smoke", [f"runs_dir={tmp_path}", f"figures_dir={tmp_path}/fig"], stages="05", progress=False)
    again = json.loads((evald / "metrics.json").read_text())
    assert again["judge_calls"] == 0 and again["judge_cache_hits"] == evaluated["judge_calls"]
    counts = ("judge_calls", "judge_cache_hits")
    assert {k: v for k, v in again.items() if k not in counts} == {k: v for k, v in evaluated.items() if k not in counts}
    assert (tmp_path / "fig" / "blog_figure.png").is_file() and (tmp_path / "fig" / "win_tie_lose.png").is_file()
    # every stage left its manifest, and what each stage read is what the stage before it wrote
    from koala_lib.manifest import read_manifest

    run = tmp_path / "smoke"
    manifests = {name: read_manifest(run / name) for name in ("data", "conditioned", "train/koala_all", "train/koala_distill", "generate", "eval")}
    assert all(m["stage"] == name and m["stale_inputs"] == [] and m["config_sha256"] == manifests["data"]["config_sha256"]
               for name, m in manifests.items())
    trained = manifests["train/koala_all"]["outputs"]
    assert trained["train/koala_all/hf/model.safetensors"] == manifests["generate"]["inputs"]["train/koala_all/hf/model.safetensors"]
    assert {k for k in trained if k.startswith("train/koala_all/hf/")} <= set(manifests["generate"]["inputs"])
    answers = {k: v for k, v in manifests["generate"]["outputs"].items() if k.endswith(".json")}
    assert answers == {k: v for k, v in manifests["eval"]["inputs"].items() if k.startswith("generations/")} and len(answers) == 4
    assert "eval/summary.json" in manifests["eval"]["outputs"] and "eval/judgments/llm.jsonl" in manifests["eval"]["outputs"]
    # what the README and docs/ say a run writes is what this run wrote, and every number they quote from the demo
    # run is one a run gives (`koala readme` fills them)
    assert documented_paths_missing(tmp_path / "smoke", tmp_path / "fig") == []
    assert_documents_fill(load("smoke", [f"runs_dir={tmp_path}"]))


# Paths the documents name that a smoke run does not write, and why.
ONLY_SOMETIMES = {
    "train/*/adapter": "LoRA runs only",
    "eval/rating/study.db": "after `koala rate init`",
    "eval/judgments/raters.jsonl": "after `koala rate export`",
    "eval/judgments/mturk_*.jsonl": "after `koala mturk import`",
    "eval/panel/*": "with a panel of judges",
}


def documented_paths_missing(run, figures) -> list[str]:
    """Every `runs/<P>/...` path and `figures/*.png` file that README.md or docs/*.md names, which the run lacks."""
    import re

    from koala_lib.config import project_root

    root = project_root()
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    missing = []
    for doc in texts:
        text = doc.read_text(encoding="utf-8")
        named = re.findall(r"runs/(?:<P>|<profile>|demo|smoke)/([\w<>./*-]+)", text)
        named += re.findall(r"`((?:eval|generations|conditioned|train/<variant>)/[\w<>./*-]+)`", text)  # run-relative
        for raw in named:
            rel = re.sub(r"<[a-z_]+>", "*", raw.rstrip(".")).rstrip("/")
            if any(rel == k or rel.startswith(k + "/") or Path(rel).match(k) for k in ONLY_SOMETIMES):
                continue
            if not list(run.glob(rel)):
                missing.append(f"{doc.name}: runs/<P>/{raw}")
        for name in re.findall(r"figures/(\w+\.png)", text):
            if not (figures / name).is_file():
                missing.append(f"{doc.name}: figures/{name}")
    return sorted(set(missing))


def assert_documents_fill(cfg):
    from koala_lib.config import load, project_root, variant_name
    from koala_lib.run_numbers import MARK, fill, run_numbers

    numbers = run_numbers(cfg)
    # the README quotes the demo's variants' held-out losses; smoke trains two of the demo's three
    demo_only = {f"eval_{variant_name(v)}" for v in load("demo").variants} - set(numbers)
    assert demo_only == {"eval_alpaca"}
    numbers.update({key: "2.00 → 1.90" for key in demo_only})
    text = (project_root() / "README.md").read_text(encoding="utf-8")
    assert len(MARK.findall(text)) >= 10  # the README quotes the demo run through marks, not by hand
    filled = fill(text, numbers)
    assert MARK.findall(filled) and fill(filled, numbers) == filled  # filling twice changes nothing


@pytest.mark.slow
def test_a_failing_stage_names_the_cell_error_and_the_executed_notebook(tmp_path):
    with pytest.raises(StageFailed) as err:
        run_pipeline("smoke", [f"runs_dir={tmp_path}", f"data.sources.hc3.path={tmp_path}/missing.jsonl"], progress=False)
    message = str(err.value)
    assert message.startswith("stage 01 failed in cell")
    assert "SourceFormatError" in message and "missing.jsonl: no such file or folder" in message
    executed = tmp_path / "smoke" / "notebooks" / "01_data_curation.ipynb"
    assert f"executed notebook: {executed}" in message and executed.is_file()


def _stages_1_to_3(folder, *overrides):
    """Stages 1-3 of the smoke profile in-process, Koala-All only (the changed runs stop after training)."""
    from koala_lib.conditioning.stage import condition
    from koala_lib.config import load
    from koala_lib.data.curate import curate
    from koala_lib.train.loop import fit

    cfg = load("smoke", [f"runs_dir={folder}", f"figures_dir={folder}/fig", *overrides])
    curate(cfg, progress=False)
    condition(cfg, progress=False)
    fit(cfg, "koala_all", progress=False)
    return cfg.run_dir


@pytest.mark.slow
def test_runs_diff_names_a_changed_learning_rate_and_the_first_step_it_changes(smoke_run, tmp_path, capsys):
    from koala_lib.cli import main

    base = smoke_run[0] / "smoke"
    changed = _stages_1_to_3(tmp_path, "train.learning_rate=1e-3")
    capsys.readouterr()
    assert main(["runs", "diff", str(base), str(changed)]) == 1
    out = capsys.readouterr().out
    assert "  config.train.learning_rate: 0.003 -> 0.001  (stages: data, conditioned, train/koala_all)" in out
    assert "  data                   identical" in out and "  conditioned            identical" in out
    # smoke warms up over one step from 0: step 1 runs at learning rate 0 in both runs, so both leave the parameters
    # as they were; step 2 is the first whose fingerprint the new rate can change, and its schedule value does
    assert "first output that differs: stage train/koala_all, step 2: settings (learning rate 0.003 -> 0.001)" in out
    steps = [json.loads(line) for line in (changed / "train" / "koala_all" / "steps.jsonl").read_text().splitlines()]
    first = json.loads((base / "train" / "koala_all" / "steps.jsonl").read_text().splitlines()[0])
    assert steps[0] == first and steps[0]["lr"] == 0.0  # the same fingerprint, to the bit
    assert f"  {'train/koala_distill':<22} only in run a" in out  # the changed run trained Koala-All alone


@pytest.mark.slow
def test_runs_diff_names_an_edited_data_file_and_the_first_step_that_reads_it(smoke_run, tmp_path, capsys):
    """One HC3 answer edited (its last full stop made an exclamation mark: the same number of tokens, so the packing
    stays and only the rows holding that example change): the diff names the data file's hash, and as the first
    output difference of training the first step whose rows hold the edited example."""
    from koala_lib.cli import main
    from koala_lib.config import project_root

    base = smoke_run[0] / "smoke"
    steps = [json.loads(line) for line in (base / "train" / "koala_all" / "steps.jsonl").read_text().splitlines()]
    step, example = next((s["step"], e) for s in steps for row in s["rows"] for e in row["examples"] if e.startswith("hc3:"))
    _, row_id, answer = example.split(":")
    kind, index = answer.rstrip("0123456789"), int(answer[len(answer.rstrip("0123456789")):])
    lines = (project_root() / "koala_lib/data/demo/hc3/all.jsonl").read_text().splitlines(keepends=True)
    for n, line in enumerate(lines):  # the demo file holds malformed rows on purpose: those stay as they are
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and str(record.get("id")) == row_id:
            text = record[f"{kind}_answers"][index]
            assert "." in text
            record[f"{kind}_answers"][index] = text[: text.rindex(".")] + "!" + text[text.rindex(".") + 1:]
            lines[n] = json.dumps(record) + "\n"
            break
    else:
        raise AssertionError(f"HC3 row {row_id} not found")
    edited = tmp_path / "hc3.jsonl"
    edited.write_text("".join(lines))

    changed = _stages_1_to_3(tmp_path / "runs", f"data.sources.hc3.path={edited}")
    capsys.readouterr()
    assert main(["runs", "diff", str(base), str(changed)]) == 1
    out = capsys.readouterr().out
    assert "  input kit:koala_lib/data/demo/hc3/all.jsonl: " in out and f"  input {edited.resolve()}: None -> " in out
    assert "first output that differs: stage data; data/curated" in out
    assert f"  train/koala_all parts at step {step}: data (batch rows differ from row " in out

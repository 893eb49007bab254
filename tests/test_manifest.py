"""Manifests: what produced each stage's outputs, and the stale inputs a stage names instead of silently using them."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

from koala_lib import manifest
from koala_lib.cli import main
from koala_lib.conditioning.stage import condition
from koala_lib.data.curate import curate, load_curated, write_outputs

FIELDS = {"stage", "kit", "python", "packages", "env", "devices", "profile", "overrides", "config", "config_sha256", "seed",
          "inputs", "outputs", "stale_inputs", "started", "ended"}


def test_stages_record_their_inputs_and_outputs_and_name_a_stale_input(make_cfg, capsys):
    cfg = make_cfg("smoke", "seed=0")
    curate(cfg, progress=False)
    data = manifest.read_manifest(cfg.run_dir / "data")
    assert FIELDS <= set(data) and data["stage"] == "data" and data["overrides"][-1] == "seed=0"
    assert {"data/curated.jsonl", "data/report.json", "data/rejections.jsonl"} <= set(data["outputs"])
    assert "kit:koala_lib/data/demo/hc3/all.jsonl" in data["inputs"]  # the source files read, named as in any checkout
    assert data["devices"]["platform"] == "cpu" and "extensions" in data["devices"]["cpu"]
    assert set(data["packages"]) >= {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "tokenizers", "numpy"}

    condition(cfg, progress=False)
    cond = manifest.read_manifest(cfg.run_dir / "conditioned")
    assert cond["stale_inputs"] == [] and cond["config_sha256"] == data["config_sha256"]
    curated = {k: v for k, v in data["outputs"].items() if k.startswith("data/curated/")}
    assert curated and all(cond["inputs"][k] == v for k, v in curated.items())  # what stage 2 read is what stage 1 wrote
    assert any(name.endswith("tokenizer.json") for name in cond["inputs"])

    # an edit after stage 1 wrote it: one answer of the curated data set changed, in place
    records = load_curated(cfg)
    first = records[0]
    records[0] = replace(first, turns=(*first.turns[:-1], replace(first.turns[-1], text=first.turns[-1].text + " (edited)")))
    write_outputs(records, json.loads((cfg.run_dir / "data" / "report.json").read_text()), cfg.run_dir / "data")
    capsys.readouterr()
    condition(cfg, progress=False)
    arrow = sorted((cfg.run_dir / "data" / "curated").glob("*.arrow"))[0]
    stale = [f"data/curated/{arrow.name} (changed)", "data/curated/state.json (changed)"]  # datasets' fingerprint too
    assert manifest.read_manifest(cfg.run_dir / "conditioned")["stale_inputs"] == stale
    assert f"koala: stage 2 reads 2 file(s) that differ from what stage 1 (data/) recorded: {', '.join(stale)}" in capsys.readouterr().err

    assert main(["runs", "show", str(cfg.run_dir)]) == 0
    shown = capsys.readouterr().out
    assert f"run {cfg.run_dir}: profile smoke" in shown and "overrides: " in shown and "seed=0" in shown
    assert f"STALE: {', '.join(stale)}" in shown.splitlines()[-1] and shown.splitlines()[-2].lstrip().startswith("data ")


def test_the_git_state_covers_code_params_and_notebooks_not_figures(tmp_path, monkeypatch):
    repo = tmp_path / "kit"
    (repo / "koala_lib").mkdir(parents=True)
    (repo / "params").mkdir()
    (repo / "koala_lib" / "a.py").write_text("x = 1\n")
    git = lambda *args: subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    git("init", "-q")
    git("-c", "user.email=k@k", "-c", "user.name=k", "commit", "-q", "--allow-empty", "-m", "empty")
    git("add", ".")
    git("-c", "user.email=k@k", "-c", "user.name=k", "commit", "-q", "-m", "code")
    monkeypatch.setenv("KOALA_HOME", str(repo))
    state = lambda: (manifest.git_state.cache_clear(), manifest.git_state())[1]
    clean = state()
    assert len(clean["commit"]) == 40 and clean["dirty"] is False and clean["diff_sha256"] is None
    (repo / "figures").mkdir()
    (repo / "figures" / "loss.png").write_bytes(b"png")  # a demo run rewrites figures: not a change of the code
    assert state() == clean
    (repo / "koala_lib" / "a.py").write_text("x = 2\n")
    changed = state()
    assert changed["dirty"] is True and changed["commit"] == clean["commit"] and len(changed["diff_sha256"]) == 64
    (repo / "params" / "mine.yaml").write_text("seed: 1\n")  # an untracked profile counts
    assert state()["diff_sha256"] != changed["diff_sha256"]
    manifest.git_state.cache_clear()


def test_runs_diff_of_two_runs_of_stages_1_and_2(tmp_path, capsys):
    """Two runs with the same settings in two folders are identical (exit 0), whatever their paths, times and
    durations; a changed setting is named, with the first output it changes (exit 1)."""
    from koala_lib import config

    def run(folder, *overrides):
        cfg = config.load("smoke", [f"runs_dir={tmp_path / folder}", f"figures_dir={tmp_path / folder / 'fig'}", *overrides])
        curate(cfg, progress=False)
        condition(cfg, progress=False)
        return cfg.run_dir

    a, b, c = run("a"), run("b"), run("c", "conditioning.seq_len=256")
    capsys.readouterr()
    assert main(["runs", "diff", str(a), str(b)]) == 0
    assert capsys.readouterr().out.startswith(f"runs identical: {a} and {b} (data, conditioned:")
    assert main(["runs", "diff", str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert "  config.conditioning.seq_len: 512 -> 256  (stages: data, conditioned)" in out
    assert "first output that differs: stage conditioned; conditioned/" in out and "  data                   identical" in out
    assert main(["runs", "diff", str(a), str(c), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is False and result["first"]["stage"] == "conditioned"
    assert [i["what"] for i in result["inputs"]] == ["config.conditioning.seq_len", "overrides"]

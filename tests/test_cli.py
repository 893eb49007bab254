"""The `koala` command: one-line errors with a non-zero exit, --set / --runs-dir everywhere."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from koala_lib.cli import main


def test_config_show_prints_the_resolved_profile(capsys):
    assert main(["config", "show", "--profile", "koala13b_distill", "--set", "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3  # the one seed" in out
    assert "mixture: koala_distill" in out


def test_config_error_is_one_line_and_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "koala_lib.cli", "curate", "--profile", "smoke", "--set", "data.sources.hh.pth=x"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "koala: error: unknown key 'data.sources.hh.pth'; did you mean 'path'? "
        "(allowed: origin, path, hub_id, hub_config, revision, files, split, cap)"
    ]


def test_curate_sources_and_runs_dir(tmp_path, capsys):
    assert main(["curate", "--profile", "smoke", "--sources", "alpaca,webgpt", "--runs-dir", str(tmp_path), "--quiet",
                 "--set", f"figures_dir={tmp_path}/fig"]) == 0
    report = json.loads((tmp_path / "smoke" / "data" / "report.json").read_text())
    assert list(report["sources"]) == ["alpaca", "webgpt"]
    assert (tmp_path / "fig" / "data_composition.png").is_file()
    assert "alpaca" in capsys.readouterr().out


def test_sources_outside_the_mixture_are_refused(tmp_path, capsys):
    code = main(["curate", "--profile", "koala13b_distill", "--sources", "hh", "--runs-dir", str(tmp_path)])
    assert code == 2
    assert "'hh' is not in the mixture 'koala_distill'" in capsys.readouterr().err


def test_pipeline_unknown_stage(capsys):
    assert main(["pipeline", "--profile", "smoke", "--stages", "07"]) == 2
    assert "unknown stage '07'" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_ends_with_the_figures_and_metrics_it_wrote(tmp_path, capsys):
    stale = tmp_path / "fig" / "old.png"
    stale.parent.mkdir()
    stale.write_bytes(b"png")
    os.utime(stale, (0, 0))  # written long before this run: not listed
    assert main(["pipeline", "--profile", "smoke", "--stages", "01", "--runs-dir", str(tmp_path), "--quiet",
                 "--set", f"figures_dir={tmp_path}/fig"]) == 0
    out = capsys.readouterr().out
    listed = out.split("figures written (1):\n")[1].splitlines()
    assert listed[0].strip() == str(tmp_path / "fig" / "data_composition.png")
    assert f"metrics written (1):\n  {tmp_path / 'smoke' / 'data' / 'metrics.json'}" in out
    assert "old.png" not in out


@pytest.mark.slow
def test_weights_fetch_default_prints_a_hf_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    monkeypatch.setenv("KOALA_CACHE", str(tmp_path))
    assert main(["weights", "fetch-default"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    config = json.loads((tmp_path / "smollm2-135m-instruct" / "config.json").read_text())
    assert path == str(tmp_path / "smollm2-135m-instruct")
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)


@pytest.mark.slow
def test_condition_show_marks_trained_spans(tmp_path, capsys):
    pytest.importorskip("gguf")
    args = ["--profile", "smoke", "--runs-dir", str(tmp_path), "--quiet", "--set", f"figures_dir={tmp_path}/fig"]
    assert main(["curate", *args]) == 0
    assert main(["condition", *args, "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n--- ") + out.startswith("--- ") >= 2
    assert "BEGINNING OF CONVERSATION: USER: " in out and "⟦" in out and "<|im_end|>⟧" in out
    stats = json.loads((tmp_path / "smoke" / "conditioned" / "stats.json").read_text())
    assert stats["packed"]["padding_fraction"] < stats["padded"]["padding_fraction"]
    assert (tmp_path / "smoke" / "conditioned" / "train" / "epoch_0" / "segment_ids.npy").is_file()


def test_no_pytorch_notice_where_pytorch_is_absent():
    """The kit needs no PyTorch (transformers serves only tokenizers here). In an environment without it (simulated
    by hiding torch from the import system), importing transformers prints "PyTorch was not found. Models won't be
    available"; after koala_lib it does not."""
    hide = textwrap.dedent("""
        import importlib.util, sys
        find = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] == "torch" else find(name, *a, **k)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}  # set by this process's import
    plain = subprocess.run([sys.executable, "-c", hide + "import transformers"], capture_output=True, text=True, timeout=120, env=env)
    assert "PyTorch was not found" in plain.stderr  # the check would see the notice
    kit = subprocess.run([sys.executable, "-c", hide + "import koala_lib.conditioning.template, transformers"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert kit.returncode == 0 and "PyTorch was not found" not in kit.stderr, kit.stderr

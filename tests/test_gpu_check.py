"""bench/gpu_check.py: the GPU check runs end to end at its tiny size on a CPU, and one failing part does not stop the rest."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), out, proc.stdout


@pytest.mark.slow
def test_every_part_runs_without_an_error(tiny_run):
    result, out, stdout = tiny_run
    assert result["settings"]["tiny"] and result["environment"]["backend"] == "cpu"
    for part in ("train", "memory", "decode", "numerics"):
        assert "error" not in result[part], (part, result[part])
    log = (out / "gpu_check.log").read_text()
    assert log.strip() and "cpu" in log and "jax" in log and "flax" in log and '"length": 128' in log
    assert "MFU" in stdout and "roofline" in stdout


@pytest.mark.slow
def test_train_mfu_counts_useful_work_of_the_packed_batch(tiny_run):
    train = tiny_run[0]["train"]
    assert isinstance(train["mfu"], float) and 0 < train["mfu"] < 1
    assert train["tokens"] == train["rows"] * train["length"]  # packed_batch leaves no padding
    # three examples per row: attention over their own causal pairs only, fewer than a whole row's
    assert train["attention_pairs"] < train["rows"] * train["length"] * (train["length"] + 1) / 2
    assert 0 < train["useful_flops"] < train["full_row_flops"] and train["mfu"] < train["mfu_full_row"]
    assert train["tokens_per_s"] > 0 and math.isfinite(train["loss"])


@pytest.mark.slow
def test_memory_plan_compares_the_compiled_step_with_the_kit_estimate(tiny_run):
    memory = tiny_run[0]["memory"]
    b = memory["compiled_bytes"]
    assert memory["compiled_peak_bytes"] == b["argument"] + b["output"] - b["alias"] + b["temp"] > 0
    assert memory["estimate_bytes"] > 0 and memory["estimate_over_compiled"] > 0
    assert memory["device_peak_bytes"] is None  # a CPU reports no device peak


@pytest.mark.slow
def test_decode_reports_throughput_against_the_bandwidth_roofline(tiny_run):
    decode = tiny_run[0]["decode"]
    for batch in ("batch_1", "batch_64"):
        assert decode[batch]["tokens_per_s"] > 0 and decode[batch]["roofline_fraction"] > 0
        assert decode[batch]["bytes_per_step"] > decode[batch]["kv_cache_bytes"] > 0
    assert decode["batch_64"]["kv_cache_bytes"] == 64 * decode["batch_1"]["kv_cache_bytes"]


@pytest.mark.slow
def test_numerics_bf16_close_to_fp32_and_cudnn_skipped_on_cpu(tiny_run):
    numerics = tiny_run[0]["numerics"]
    low = numerics["bf16_vs_fp32"]
    assert math.isfinite(low["max_abs_diff"]) and 0 < low["mean_abs_diff"] <= low["max_abs_diff"] < 1.0
    assert low["argmax_agreement"] > 0.9
    assert "GPU" in numerics["cudnn_vs_xla"]["skipped"]


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    def broken(s, ctx, log):
        raise RuntimeError("out of memory, say")

    lines = []
    s = gpu_check.settings(True, "cpu", None, "full")
    parts = [("train", broken), ("memory", lambda s, ctx, log: {"compiled_peak_bytes": 1}), ("decode", lambda s, ctx, log: {"batch_1": {}})]
    result = gpu_check.run_parts(s, parts, {"settings": {}}, tmp_path, lines.append)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["train"]["error"] == "RuntimeError: out of memory, say" and "Traceback" in "\n".join(lines)
    assert saved["memory"]["compiled_peak_bytes"] == 1 and saved == result and saved["total_s"] >= 0
    summary = "\n".join(lines[-4:])
    assert "ERROR RuntimeError" in summary and "no summary" in summary  # a part with missing keys still gets a line

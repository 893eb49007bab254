"""`koala plan`: the train step compiled on virtual devices, XLA's memory and matmul FLOPs against the kit's own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from koala_lib.config import load
from koala_lib.train.hlo import dot_flops
from koala_lib.train.plan import plan


def test_dot_flops_counts_every_matmul_a_compiled_program_runs_loops_included():
    def f(a, b, ws):
        def body(x, w):
            return jnp.tanh(x @ w), None

        return jax.lax.scan(body, a @ b, ws)[0].sum()

    a, b, ws = jnp.ones((64, 128)), jnp.ones((128, 32)), jnp.ones((7, 32, 32))
    text = jax.jit(jax.grad(f)).lower(a, b, ws).compile().as_text()
    forward = 2 * 64 * 128 * 32 + 7 * 2 * 64 * 32 * 32
    backward = 7 * 2 * 64 * 32 * 32 + 2 * 64 * 32 * 128  # through the loop to `a` (b and ws are not differentiated)
    assert dot_flops(text) == forward + backward


def _settings(model: str, seq_len: int) -> list:
    return [load("demo", ["model.init=random", f"model.preset={model}", "train.mesh=1,8,1", f"train.batch_size={8 * accum}",
                          f"train.grad_accum={accum}", f"conditioning.seq_len={seq_len}", f"model.remat={remat}", "model.attention=xla"])
            for remat in ("none", "full", "dots", "dots_no_batch") for accum in (1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("model, seq_len", [("debug", 512), ("smollm2-135m", 256)])
def test_estimate_is_within_15_percent_of_xla_and_the_flop_count_within_5(model, seq_len):
    """On 8 virtual CPU devices (fsdp 8, one row each), every remat policy, with and without accumulation."""
    plans = plan(_settings(model, seq_len))
    for p in plans:
        setting = f"{model} remat={p.remat} grad_accum={p.grad_accum}"
        assert p.mesh == (1, 8, 1) and p.rows_per_device == 1 and p.scan_layers, setting
        assert p.estimate["arguments"] == pytest.approx(p.xla["arguments"], rel=0.02), setting
        assert p.estimate["total"] == pytest.approx(p.xla["peak"], rel=0.15), setting
        assert p.kit_dot_flops == pytest.approx(p.xla_dot_flops, rel=0.05), setting
    by = {(p.remat, p.grad_accum): p for p in plans}
    assert by["full", 1].xla["peak"] < by["dots_no_batch", 1].xla["peak"] < by["dots", 1].xla["peak"] < by["none", 1].xla["peak"]
    assert by["full", 1].xla_dot_flops > by["none", 1].xla_dot_flops  # the forward runs again


@pytest.mark.slow
def test_lora_estimate_is_within_15_percent_of_xla_and_counts_only_the_adapters_as_trained():
    """SmolLM2-135M (the embedded base) with rank-8 adapters on every projection, fsdp 8, every remat policy."""
    settings = [load("demo", ["train.method=lora", "train.mesh=1,8,1", f"train.batch_size={8 * accum}", f"train.grad_accum={accum}",
                              "conditioning.seq_len=256", f"model.remat={remat}", "model.attention=xla"])
                for remat in ("none", "full", "dots", "dots_no_batch") for accum in (1, 2)]
    full = plan([load("demo", ["train.mesh=1,8,1", "train.batch_size=8", "conditioning.seq_len=256", "model.remat=none", "model.attention=xla"])])[0]
    plans = plan(settings)
    for p in plans:
        setting = f"lora remat={p.remat} grad_accum={p.grad_accum}"
        assert p.cpu_upcast == 0  # fp32: nothing for the CPU to convert
        assert p.estimate["arguments"] == pytest.approx(p.xla["arguments"], rel=0.02), setting
        assert p.estimate["total"] == pytest.approx(p.xla["peak"], rel=0.15), setting
        assert p.kit_dot_flops == pytest.approx(p.xla_dot_flops, rel=0.05), setting
    lora = next(p for p in plans if p.remat == "none" and p.grad_accum == 1)
    # no moments of the base: a device holds its eighth of the base (67 MB) and whole copies of the 2.4M replicated
    # adapters with their moments (29 MB); full fine-tuning holds an eighth of the parameters and both moments (202 MB)
    assert lora.xla["arguments"] < 0.5 * full.xla["arguments"]
    assert lora.xla_dot_flops < 0.75 * full.xla_dot_flops  # no weight gradient of the frozen matmuls (4 FLOPs, not 6)


@pytest.mark.slow
def test_koala_plan_prints_both_columns(capsys):
    from koala_lib.cli import main

    assert main(["plan", "--profile", "smoke", "--devices", "2", "--set", "train.batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "mesh 1,2,1" in out and "compiled on 2 virtual CPU devices" in out
    assert "kit estimate" in out and "XLA (CPU)" in out and "TFLOP per device per step" in out
    assert "40 GB card" in out and "80 GB card" in out

"""LoRA training: the adapted model starts as the base, only adapters train, settings errors, and kill + resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from koala_lib import config
from koala_lib.config import ConfigError
from koala_lib.model.llama import Llama
from koala_lib.model.lora import add_adapters, merge_adapters
from koala_lib.model.presets import preset
from koala_lib.model.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 12)), jnp.int32)


@pytest.mark.parametrize("scan", [False, True])
def test_an_adapted_model_computes_the_base_model_exactly_until_b_moves(scan):
    model = Llama(preset("debug"), rngs=nnx.Rngs(0), scan_layers=scan, remat="full")
    base = model(TOKENS)
    added = add_adapters(model, rank=4, alpha=8, key=jax.random.key(1))
    assert len(added) == 2 * 7 and "layers/1/mlp/down_proj/kernel" in added
    assert np.array_equal(np.asarray(model(TOKENS)), np.asarray(base))  # B = 0: bit for bit
    graphdef, adapters, frozen, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    adapters, frozen = nnx.to_pure_dict(adapters), nnx.to_pure_dict(frozen)
    a = adapters["layers"]["self_attn"]["q_proj"]["lora_a"] if scan else adapters["layers"][0]["self_attn"]["q_proj"]["lora_a"]
    assert a.dtype == jnp.float32 and float(jnp.abs(a).max()) > 0 and float(jnp.abs(a).max()) <= 1 / 64**0.5
    moved = jax.tree.map(lambda x: x + 0.01, adapters)
    adapted = nnx.merge(graphdef, moved, frozen, rest)(TOKENS)
    plain = nnx.split(Llama(preset("debug"), rngs=nnx.Rngs(0), scan_layers=scan), nnx.Param, ...)[0]
    merged = nnx.merge(plain, merge_adapters(frozen, moved, 2.0), rest)(TOKENS)
    assert float(jnp.abs(adapted - base).max()) > 1e-2  # the adapters now matter...
    np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=2e-5)  # ...and merging computes the same


def test_scanned_and_unrolled_adapters_start_equal():
    per_layout = {}
    for scan in (False, True):
        model = Llama(preset("debug"), rngs=nnx.Rngs(0), scan_layers=scan)
        add_adapters(model, rank=4, alpha=8, key=jax.random.key(1))
        a = nnx.to_pure_dict(nnx.split(model, nnx.LoRAParam, ...)[1])["layers"]
        per_layout[scan] = a["mlp"]["up_proj"]["lora_a"][1] if scan else a[1]["mlp"]["up_proj"]["lora_a"]
    assert np.array_equal(per_layout[False], per_layout[True])


def test_settings_errors_name_what_is_wrong():
    model = Llama(preset("debug"), rngs=nnx.Rngs(0), scan_layers=True)
    with pytest.raises(ValueError, match=r"'attn/qq_proj' matches no linear layer; the kernel paths are .*layers/<i>/self_attn/q_proj/kernel.*lm_head/kernel"):
        add_adapters(model, rank=4, alpha=8, targets=("attn/qq_proj",), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"rank 40 is above layers/0/self_attn/k_proj/kernel's smaller dimension \(64 x 32\)"):
        add_adapters(model, rank=40, alpha=8, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"pick self_attn/q_proj/kernel in layers 0 only; .*train.scan_layers=false"):
        add_adapters(model, rank=4, alpha=8, targets=("layers/0/self_attn/q_proj",), key=jax.random.key(0))
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model))  # checked before any change
    unrolled = Llama(preset("debug"), rngs=nnx.Rngs(0))
    assert add_adapters(unrolled, rank=4, alpha=8, targets=("layers/0/self_attn/q_proj",), key=jax.random.key(0)) == ["layers/0/self_attn/q_proj/kernel"]
    with pytest.raises(ConfigError, match="train.method: lora adapts a pretrained base, but model.init is random"):
        config.load("smoke", ["train.method=lora"])


# ----------------------------------------------------------------------------- the train state and step


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A small 'pretrained' base as a Hugging Face folder, with the default model's tokenizer."""
    from transformers import AutoTokenizer

    from koala_lib.model.checkpoints import resolve_checkpoint, save_hf

    tokenizer = resolve_checkpoint("default")
    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    return save_hf(Llama(preset("debug").replace(vocab_size=vocab), rngs=nnx.Rngs(3)), tmp_path_factory.mktemp("base") / "hf", tokenizer_from=tokenizer)


def _lora_cfg(tiny_base, runs, *overrides):
    return config.load("smoke", [f"runs_dir={runs}", f"figures_dir={runs}/fig", "model.init=pretrained", f"model.base={tiny_base}",
                                 "train.method=lora", *overrides])


@pytest.mark.parametrize("scan", [True, False])
def test_a_lora_step_changes_the_adapters_only_and_the_frozen_base_stays_in_the_compute_dtype(tiny_base, tmp_path, scan):
    from koala_lib.model.checkpoints import load_hf
    from koala_lib.train.state import StateLayout
    from koala_lib.train.step import make_train_step

    cfg = _lora_cfg(tiny_base, tmp_path, f"train.scan_layers={str(scan).lower()}", "model.dtype=bfloat16", "train.learning_rate=1e-2")
    base = load_hf(tiny_base)
    arch, mesh = base.cfg, make_mesh("1,1,1")
    layout = StateLayout.build(cfg, arch, mesh, total_steps=4)
    params = nnx.to_pure_dict(nnx.split(load_hf(tiny_base, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), nnx.Param, ...)[1])
    expected = jax.tree.map(np.asarray, params)  # `init` consumes what it is given
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Some donated buffers were not usable" from stacking the layers
        state = layout.init(params, seed=0)
    assert all(x.is_deleted() for x in jax.tree.leaves(params)) == scan  # the unrolled copy is freed once stacked
    assert {x.dtype for x in jax.tree.leaves(state["frozen"])} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    # step 0: the merged export is the base, bit for bit
    exported = nnx.to_pure_dict(nnx.split(layout.model(state), nnx.Param, ...)[1])
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(expected)))
    frozen_before = jax.tree.map(np.asarray, state["frozen"])
    adapters_before = jax.tree.map(np.asarray, state["params"])
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, arch.vocab_size, (1, 8, 64)).astype(np.int32), "positions": np.tile(np.arange(64, dtype=np.int32), (1, 8, 1)),
             "segment_ids": np.ones((1, 8, 64), np.int32), "loss_mask": np.ones((1, 8, 64), np.int32)}
    step = make_train_step(layout.graphdef, layout.rest, layout.tx, layout.schedule, layout.shardings, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    for _ in range(3):  # lr is 0 at step 0 (warmup); B moves at the second, and A once B is no longer zero
        state, stats = step(state, batch)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(state["frozen"])))
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(adapters_before), jax.tree.leaves(state["params"]))]
    assert all(changed), "every adapter matrix moves (B from zero, A through B's gradient)"
    assert float(stats["grad_norm"]) > 0


# ----------------------------------------------------------------------------- runs in subprocesses (slow)

SETTINGS = ["train.batch_size=16", "train.grad_accum=2", "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0",
            "train.variants=[koala_all]", "train.learning_rate=1e-2"]


@pytest.fixture(scope="module")
def lora_rows(tiny_base, tmp_path_factory) -> Path:
    """Stage 1 and 2 outputs for the tiny base, made once for this module."""
    from koala_lib.conditioning.stage import condition
    from koala_lib.data.curate import curate

    runs = tmp_path_factory.mktemp("rows")
    cfg = _lora_cfg(tiny_base, runs)
    curate(cfg, progress=False)
    condition(cfg, progress=False)
    return runs


def _script(runs: Path, tiny_base: Path, sleep_after: int | None, *extra: str) -> str:
    overrides = [f"runs_dir={runs}", f"figures_dir={runs}/fig", "model.init=pretrained", f"model.base={tiny_base}", "train.method=lora", *SETTINGS, *extra]
    return textwrap.dedent(f"""
        import time
        from koala_lib import config
        from koala_lib.train.loop import fit
        cfg = config.load("smoke", {overrides!r})
        fit(cfg, "koala_all", progress=False, on_step=lambda step, row: time.sleep(30 if {sleep_after!r} and step >= {sleep_after!r} else 0))
    """)


def _run(runs: Path, tiny_base: Path, sleep_after: int | None = None, background: bool = False, devices: int = 1, *overrides: str):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "KOALA_HOME": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""}
    args = [sys.executable, "-c", _script(runs, tiny_base, sleep_after, *overrides)]
    if background:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _outputs(runs: Path) -> tuple[list[float], dict, dict]:
    from safetensors.numpy import load_file

    out = runs / "smoke" / "train" / "koala_all"
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return losses, load_file(out / "hf" / "model.safetensors"), load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def whole(tiny_base, lora_rows, tmp_path_factory) -> Path:
    """An uninterrupted LoRA run on one device."""
    import shutil

    runs = tmp_path_factory.mktemp("whole") / "runs"
    shutil.copytree(lora_rows, runs)
    _run(runs, tiny_base)
    return runs


@pytest.mark.slow
def test_a_lora_run_killed_mid_way_resumes_to_the_adapters_of_an_uninterrupted_run(tiny_base, lora_rows, whole, tmp_path, kill_when_written):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(lora_rows, cut)
    proc = _run(cut, tiny_base, sleep_after=2, background=True)
    done = cut / "smoke" / "train" / "koala_all" / "checkpoints" / "2" / "commit_success.txt"
    kill_when_written(proc, done)
    assert not (cut / "smoke" / "train" / "koala_all" / "hf").exists()
    tree = (cut / "smoke" / "train" / "koala_all" / "checkpoints" / "2" / "state" / "_METADATA").read_text()
    assert '"frozen"' not in tree and '"lora_b"' in tree  # the checkpoint holds the adapters, not the base
    _run(cut, tiny_base)
    summary = json.loads((cut / "smoke" / "train" / "koala_all" / "summary.json").read_text())
    assert summary["resumed_from"] == 2
    (losses, merged, adapter), (ref_losses, ref_merged, ref_adapter) = _outputs(cut), _outputs(whole)
    assert losses == ref_losses and len(losses) == 4 and losses[-1] < losses[0]
    assert merged.keys() == ref_merged.keys() and all(np.array_equal(merged[n], ref_merged[n]) for n in merged)
    assert adapter.keys() == ref_adapter.keys() and all(np.array_equal(adapter[n], ref_adapter[n]) for n in adapter)
    assert any(not np.array_equal(ref_adapter[n], 0) for n in ref_adapter if "lora_B" in n)


@pytest.mark.slow
def test_a_lora_run_on_eight_devices_gives_the_losses_and_adapters_of_one(tiny_base, lora_rows, whole, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(lora_rows, runs)
    _run(runs, tiny_base, None, False, 8, "train.mesh=1,8,1")
    (losses, merged, adapter), (ref_losses, ref_merged, ref_adapter) = _outputs(runs), _outputs(whole)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for name in ref_adapter:
        np.testing.assert_allclose(adapter[name], ref_adapter[name], atol=2e-5, err_msg=name)
    for name in ref_merged:
        np.testing.assert_allclose(merged[name], ref_merged[name], atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_resuming_a_full_run_as_lora_is_refused_by_name(tiny_base, lora_rows, tmp_path):
    import shutil

    from koala_lib.train.loop import fit

    shutil.copytree(lora_rows, tmp_path / "runs")
    settings = [s for s in SETTINGS if not s.startswith("train.max_steps")] + ["train.max_steps=2", "train.export_hf=false"]
    cfg = _lora_cfg(tiny_base, tmp_path / "runs", *settings)
    fit(config.load("smoke", [f"runs_dir={tmp_path / 'runs'}", "model.init=pretrained", f"model.base={tiny_base}", *settings]), "koala_all", progress=False)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(method: full -> lora, lora: None -> \{'rank': 8"):
        fit(cfg, "koala_all", progress=False)

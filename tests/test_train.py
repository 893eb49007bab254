"""Stage 3: the loss, the partition rules, the memory check, and (slow) runs on meshes, after a kill, across processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from koala_lib.model.llama import Llama
from koala_lib.model.presets import preset
from koala_lib.model.sharding import LLAMA_RULES, match_rules, mesh_shape
from koala_lib.train.step import target_weights, token_sums

# ----------------------------------------------------------------------------- the loss


def _packed(rng, b=2, t=24, vocab=512):
    seg = np.zeros((b, t), np.int32)
    seg[:, :10], seg[:, 10:20] = 1, 2  # two examples, then 4 padding positions
    pos = np.where(seg == 1, np.arange(t), np.arange(t) - 10) * (seg > 0)
    mask = np.zeros((b, t), np.int32)
    mask[:, 5:10], mask[:, 15:20] = 1, 1  # answers: the second half of each example
    return {"tokens": rng.integers(0, vocab, (b, t)).astype(np.int32), "segment_ids": seg, "positions": pos.astype(np.int32), "loss_mask": mask}


def test_targets_are_masked_tokens_within_one_example():
    batch = _packed(np.random.default_rng(0))
    w = np.asarray(target_weights({k: jnp.asarray(v) for k, v in batch.items()}))
    # target t+1 counts when it is trained and belongs to the example of position t
    assert w[0, 4:9].tolist() == [1] * 5 and w[0, 14:19].tolist() == [1] * 5
    assert w.sum() == 2 * 10
    assert w[0, 9] == 0  # token 10 opens example 2: not predicted from example 1's last token


def test_perturbing_a_masked_target_changes_neither_loss_nor_gradient():
    rng = np.random.default_rng(1)
    batch = _packed(rng)
    logits = jnp.asarray(rng.normal(size=(2, 24, 512)), jnp.float32)
    perturbed = dict(batch, tokens=batch["tokens"].copy())
    perturbed["tokens"][:, 1:5] = (perturbed["tokens"][:, 1:5] + 7) % 512  # prompt tokens: masked targets
    perturbed["tokens"][:, 20:] = 3  # padding

    def loss(lg, b):
        s, (_, n) = token_sums(lg, {k: jnp.asarray(v) for k, v in b.items()})
        return s / n

    (l0, g0), (l1, g1) = jax.value_and_grad(loss)(logits, batch), jax.value_and_grad(loss)(logits, perturbed)
    assert float(l0) == float(l1) and np.array_equal(np.asarray(g0), np.asarray(g1))
    changed = dict(batch, tokens=batch["tokens"].copy())
    changed["tokens"][:, 7] = (changed["tokens"][:, 7] + 1) % 512  # a trained target: the loss must move
    assert float(loss(logits, changed)) != float(l0)


def test_padding_tokens_change_neither_the_model_loss_nor_its_gradients():
    model = Llama(preset("debug"), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(2)
    batch = _packed(rng)
    other = dict(batch, tokens=batch["tokens"].copy())
    other["tokens"][:, 20:] = rng.integers(0, 512, (2, 4))

    def loss(p, b):
        m = nnx.merge(graphdef, p, rest)
        b = {k: jnp.asarray(v) for k, v in b.items()}
        s, (_, n) = token_sums(m(b["tokens"], b["positions"], b["segment_ids"]), b)
        return s / n

    (l0, g0), (l1, g1) = jax.value_and_grad(loss)(params, batch), jax.value_and_grad(loss)(params, other)
    assert float(l0) == float(l1)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))


# ----------------------------------------------------------------------------- rules, mesh, budget


@pytest.mark.parametrize("name", ["debug", "smollm2-135m", "llama3-8b"])
def test_every_parameter_and_optimizer_leaf_has_a_rule(name):
    import optax

    from koala_lib.config import TrainConfig
    from koala_lib.model.checkpoints import abstract_model
    from koala_lib.train.optim import make_optimizer

    params = nnx.to_pure_dict(nnx.split(abstract_model(preset(name)), nnx.Param, ...)[1])
    specs = match_rules(LLAMA_RULES, params)
    assert specs["layers"][0]["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert specs["norm"]["weight"] == P()
    tx, _ = make_optimizer(TrainConfig(weight_decay=0.1), 10, params)
    opt = jax.eval_shape(tx.init, params)
    opt_specs = jax.tree.leaves(match_rules(LLAMA_RULES, opt), is_leaf=lambda x: isinstance(x, P))
    assert len(opt_specs) == len(jax.tree.leaves(opt)) and P("tensor", "fsdp") in opt_specs
    assert isinstance(tx, optax.GradientTransformation)


def test_a_leaf_without_a_rule_is_an_error_naming_it():
    with pytest.raises(KeyError, match=r"no partition rule matches 'layers/0/extra/kernel'"):
        match_rules(LLAMA_RULES, {"layers": {0: {"extra": {"kernel": np.zeros((4, 4))}}}})


def test_mesh_sizes_and_their_errors():
    assert mesh_shape("1,-1,1", 8) == (1, 8, 1) and mesh_shape("2,2,2", 8) == (2, 2, 2) and mesh_shape("-1,2,1", 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="needs 4 devices; there are 8"):
        mesh_shape("1,4,1", 8)
    with pytest.raises(ValueError, match="three sizes"):
        mesh_shape("1,-1,-1", 8)


def test_weight_decay_skips_norms_and_embeddings():
    from koala_lib.config import TrainConfig
    from koala_lib.model.checkpoints import abstract_model
    from koala_lib.train.optim import decay_mask

    params = nnx.to_pure_dict(nnx.split(abstract_model(preset("debug")), nnx.Param, ...)[1])
    mask = decay_mask(TrainConfig(), params)
    assert mask["embed_tokens"]["embedding"] is False and mask["norm"]["weight"] is False
    assert mask["layers"][1]["post_attention_layernorm"]["weight"] is False
    assert mask["layers"][1]["mlp"]["up_proj"]["kernel"] is True and mask["lm_head"]["kernel"] is True


def test_koala13b_without_remat_on_40gb_stops_before_allocating_with_what_to_change(make_cfg, tmp_path):
    from koala_lib.conditioning.stage import condition
    from koala_lib.data.curate import curate
    from koala_lib.model.presets import to_hf_config
    from koala_lib.train import DoesNotFit
    from koala_lib.train.loop import fit

    base = tmp_path / "llama-13b"  # the config alone: the check must stop before any weight is read
    base.mkdir()
    (base / "config.json").write_text(json.dumps(to_hf_config(preset("llama-13b"))))
    cfg = make_cfg("smoke", "data.mixture=sharegpt", f"model.base={base}", "model.tokenizer=default", "model.init=pretrained",
                   "model.preset=llama-13b", "model.dtype=bfloat16", "model.remat=none", "conditioning.seq_len=2048",
                   "train.variants=[sharegpt]", "train.device_memory_gb=40")
    curate(cfg, progress=False)
    condition(cfg, progress=False)
    with pytest.raises(DoesNotFit, match=r"needs about [\d.]+ GiB per device .* the check allows 27.0 GiB: 90% of 30.0 GiB \(75% of train.device_memory_gb=40: .*try model.remat=full"):
        fit(cfg, "sharegpt", progress=False)
    assert not (cfg.run_dir / "train" / "sharegpt" / "checkpoints").exists()


# ----------------------------------------------------------------------------- runs in subprocesses (slow)

ROOT = Path(__file__).resolve().parents[1]
# Two micro-batches of 8 rows (divisible over 8 devices). Adam's eps is 1e-6 rather than 1e-8: a mesh sums gradients
# in another order, and for an embedding row whose gradient is ~1e-9 that rounding noise would, with eps 1e-8, be
# normalised into an update of the learning rate's size in either direction.
SETTINGS = ["train.batch_size=16", "train.grad_accum=2", "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0",
            "train.variants=[koala_all]", "train.eps=1e-6"]


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory) -> Path:
    """Stage 1 and 2 outputs of the smoke profile, made once for this module."""
    from koala_lib import config
    from koala_lib.conditioning.stage import condition
    from koala_lib.data.curate import curate

    runs = tmp_path_factory.mktemp("rows")
    cfg = config.load("smoke", [f"runs_dir={runs}", f"figures_dir={runs}/fig"])
    curate(cfg, progress=False)
    condition(cfg, progress=False)
    return runs / "smoke" / "conditioned"


def _runs(rows: Path, where: Path) -> Path:
    (where / "smoke").mkdir(parents=True)
    shutil.copytree(rows, where / "smoke" / "conditioned")
    return where


def _env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "KOALA_HOME": str(ROOT)}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return env


def _train(runs: Path, devices: int, *overrides: str, background: bool = False):
    cmd = [sys.executable, "-m", "koala_lib.cli", "train", "--profile", "smoke", "--quiet", "--runs-dir", str(runs),
           "--set", f"figures_dir={runs}/fig", *[a for o in (*SETTINGS, *overrides) for a in ("--set", o)]]
    if background:
        return subprocess.Popen(cmd, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(runs: Path) -> list[float]:
    rows = [json.loads(x) for x in (runs / "smoke" / "train" / "koala_all" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _params(runs: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(runs / "smoke" / "train" / "koala_all" / "hf" / "model.safetensors")


@pytest.fixture(scope="module")
def one_device(smoke_rows, tmp_path_factory) -> Path:
    runs = _runs(smoke_rows, tmp_path_factory.mktemp("one"))
    _train(runs, 1)
    return runs


@pytest.fixture(scope="module")
def eight_devices(smoke_rows, tmp_path_factory) -> Path:
    runs = _runs(smoke_rows, tmp_path_factory.mktemp("eight"))
    _train(runs, 8, "train.mesh=1,8,1")
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["1,8,1", "2,2,2"])
def test_meshes_give_the_losses_and_params_of_one_device(one_device, eight_devices, smoke_rows, tmp_path, mesh):
    runs = eight_devices if mesh == "1,8,1" else _runs(smoke_rows, tmp_path)
    if mesh != "1,8,1":
        _train(runs, 8, f"train.mesh={mesh}")
    reference, losses = _losses(one_device), _losses(runs)
    assert len(losses) == 4 and reference[-1] < reference[0]
    np.testing.assert_allclose(losses, reference, rtol=2e-5)
    ref, got = _params(one_device), _params(runs)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_the_params_of_an_uninterrupted_run(one_device, smoke_rows, tmp_path, kill_when_written):
    runs = _runs(smoke_rows, tmp_path)
    script = textwrap.dedent(f"""
        import time
        from koala_lib import config
        from koala_lib.train.loop import fit
        cfg = config.load("smoke", {[f"runs_dir={runs}", f"figures_dir={runs}/fig", *SETTINGS]!r})
        fit(cfg, "koala_all", progress=False, on_step=lambda step, row: time.sleep(30 if step >= 2 else 0))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = runs / "smoke" / "train" / "koala_all" / "checkpoints" / "2" / "commit_success.txt"
    kill_when_written(proc, done)
    assert not (runs / "smoke" / "train" / "koala_all" / "hf").exists()
    _train(runs, 1)
    summary = json.loads((runs / "smoke" / "train" / "koala_all" / "summary.json").read_text())
    assert summary["resumed_from"] == 2
    assert _losses(runs) == _losses(one_device)
    ref, got = _params(one_device), _params(runs)
    assert all(np.array_equal(got[n], ref[n]) for n in ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process_of_eight(eight_devices, smoke_rows, tmp_path):
    runs = _runs(smoke_rows, tmp_path)
    port = _free_port()
    procs = [
        _train(runs, 4, "train.mesh=1,8,1", f"train.distributed.coordinator=127.0.0.1:{port}", "train.distributed.num_processes=2",
               f"train.distributed.process_id={i}", background=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    summary = json.loads((runs / "smoke" / "train" / "koala_all" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 8
    np.testing.assert_allclose(_losses(runs), _losses(eight_devices), rtol=1e-6)
    ref, got = _params(eight_devices), _params(runs)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=2e-5, err_msg=name)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_at_a_tiny_size_on_cpu():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_gpu.py"), "--tiny", "--no-record"], env=_env(1),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0.1M-parameter LLaMA-architecture model, 1 x cpu" in proc.stdout
    mfu = float(proc.stdout.split("**MFU ")[1].split("%")[0])
    assert 0 < mfu < 100


def test_loss_curves_mark_whole_optimizer_steps_only():
    from koala_lib import plots

    train = [{"step": s, "loss": 11.0 - 0.1 * s} for s in range(1, 5)]
    evals = [{"step": s, "eval_loss": 11.2 - 0.1 * s} for s in (0, 2, 4)]
    fig = plots.loss_curves({"koala_all": (train, evals)})
    fig.canvas.draw()  # tick positions are chosen at draw time
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks

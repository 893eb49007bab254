"""Benchmark for a GPU: MFU of the kit's training step on a LLaMA-architecture model of >= 1B parameters.

Packed rows of `--length` tokens (several examples per row, segment ids), bf16 compute with fp32 master
weights and AdamW, cudnn attention, the chosen remat policy, sharded with fsdp over every local device.
MFU = useful training FLOPs of the batch (6 per matmul parameter per real token, plus attention over the causal
pairs within each packed example: `budget.useful_flops`) per second, over the devices' dense bf16 peak. The
older count, attention over the whole row as if it were one example, is printed beside it.

    python bench/train_gpu.py                       # llama-1b-shaped model, seq 2048, on the GPU(s)
    python bench/train_gpu.py --tiny                # the debug model on CPU, a check that the script runs

`build_step` and `time_steps` are shared with bench/gpu_check.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import record_section  # noqa: E402
from workload import batch_work, packed_batch  # noqa: E402

# A LLaMA-architecture model of 1.2B parameters (Llama 3.2 1B's shape with LLaMA-2's vocabulary).
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
             max_position_embeddings=4096, tie_word_embeddings=False)


def build_step(arch, rows_per_device: int, length: int, *, remat: str, attention: str | None, dtype: str = "bfloat16",
               **model_kw) -> dict:
    """The kit's train step (AdamW over fp32 master weights, `dtype` compute) for a random `arch` model, sharded
    fsdp over the local devices and compiled for one packed batch. Returns step (compiled), state, batch (on the
    devices, [1, rows, length]), host (the numpy batch), devices, compile_s."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from koala_lib.config import TrainConfig
    from koala_lib.model.llama import Llama
    from koala_lib.model.sharding import BATCH, LLAMA_RULES, make_mesh, match_rules, named
    from koala_lib.train.optim import make_optimizer
    from koala_lib.train.step import make_train_step

    devices = jax.local_devices()
    mesh = make_mesh("1,-1,1", devices)
    model = Llama(arch, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, attention=attention, remat=remat,
                  rngs=nnx.Rngs(0), **model_kw)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx, schedule = make_optimizer(TrainConfig(learning_rate=1e-5), 1000, params)
    specs = {"params": match_rules(LLAMA_RULES, params), "opt_state": match_rules(LLAMA_RULES, jax.eval_shape(tx.init, params)),
             "step": P(), "rng": P()}
    shardings = named(mesh, specs)
    state = {"params": jax.device_put(params, shardings["params"]), "step": jnp.int32(0), "rng": jax.random.key_data(jax.random.key(0))}
    del model, params
    state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state["params"])
    batch_sharding = NamedSharding(mesh, P(None, *BATCH, None))  # [accum, rows, T], as koala_lib.train.data.BATCH_SPEC
    host = packed_batch(rows_per_device * len(devices), length, arch.vocab_size)
    batch = {k: jax.device_put(v[None], batch_sharding) for k, v in host.items()}
    step = make_train_step(graphdef, rest, tx, schedule, shardings, batch_sharding)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return {"step": compiled, "state": state, "batch": batch, "host": host, "devices": len(devices),
            "compile_s": time.perf_counter() - start}


def time_steps(step, state, batch, steps: int):
    """One untimed step, then `steps` timed ones: (state, last stats, seconds per step)."""
    import jax

    state, stats = step(state, batch)
    jax.block_until_ready(stats)
    start = time.perf_counter()
    for _ in range(steps):
        state, stats = step(state, batch)
    jax.block_until_ready(stats)
    return state, stats, (time.perf_counter() - start) / steps


def run(tiny: bool, batch_per_device: int, length: int, remat: str, steps: int, attention: str | None) -> dict:
    import jax

    from koala_lib.model.presets import LlamaConfig, preset
    from koala_lib.train.budget import peak_flops

    arch = preset("debug") if tiny else LlamaConfig(**ONE_B)
    built = build_step(arch, batch_per_device, length, remat=remat, attention=attention, dtype="float32" if tiny else "bfloat16")
    _, stats, seconds = time_steps(built["step"], built["state"], built["batch"], steps)
    work, n = batch_work(arch, built["host"]), built["devices"]
    peak, source = peak_flops(jax.local_devices()[0], "float32" if tiny else "bfloat16")
    return {"params": arch.params_count(), "devices": n, "device": jax.local_devices()[0].device_kind, "step_s": seconds,
            "tokens_per_s": work["tokens"] / seconds, "mfu": work["useful_flops"] / seconds / (peak * n),
            "mfu_full_row": work["full_row_flops"] / seconds / (peak * n), "peak": peak, "peak_source": source,
            "compile_s": built["compile_s"], "loss": float(stats["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the debug model on whatever device there is (a smoke check)")
    parser.add_argument("--batch-per-device", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--remat", default="dots_no_batch", choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--attention", default="cudnn", choices=("cudnn", "xla", "auto"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import jax

    attention = None if args.attention == "auto" else args.attention
    if args.tiny:
        args.length, args.batch_per_device, args.steps, attention = min(args.length, 128), 2, 2, "xla"
    elif jax.default_backend() != "gpu":
        sys.exit("bench/train_gpu.py needs a GPU (use --tiny to check the script on a CPU)")
    r = run(args.tiny, args.batch_per_device, args.length, args.remat, args.steps, attention)
    size = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.1f}M"
    lines = [
        f"{size}-parameter LLaMA-architecture model, {r['devices']} x {r['device']}, packed rows of {args.length} "
        f"tokens, {args.batch_per_device} rows per device, {'fp32' if args.tiny else 'bf16'} compute / fp32 AdamW, {attention or 'auto'} attention, "
        f"remat {args.remat}.",
        "",
        f"Step {r['step_s'] * 1000:.0f} ms, {r['tokens_per_s']:,.0f} tokens/s, **MFU {r['mfu']:.1%}** (useful work: attention within "
        f"each packed example; {r['mfu_full_row']:.1%} counting attention over whole rows) against {r['peak'] / 1e12:.3g} TFLOP/s per "
        f"device ({r['peak_source']}); compile {r['compile_s']:.0f} s. Goal: >= 45 % on an H100.",
    ]
    print("\n".join(lines))
    print(f"loss after {args.steps + 1} steps on one repeated batch: {r['loss']:.3f}")
    if not (args.tiny or args.no_record):
        record_section("train_gpu", "Training MFU on a GPU (bench/train_gpu.py)", lines, headline=[
            (f"training MFU of a {size} LLaMA, seq {args.length}, bf16, {attention or 'auto'} attention, on {r['devices']} x {r['device']} (`bench/train_gpu.py`)",
             f"{r['mfu']:.1%} ({r['tokens_per_s']:,.0f} tokens/s; goal >= 45 % on an H100)")])
    assert np.isfinite(r["loss"])


if __name__ == "__main__":
    main()

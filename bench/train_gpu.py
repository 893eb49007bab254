"""Benchmark for a GPU: MFU of the kit's training step on a LLaMA-architecture model of >= 1B parameters.

Packed rows of `--length` tokens (several examples per row, segment ids), bf16 compute with fp32 master
weights and AdamW, cudnn attention, the chosen remat policy, sharded with fsdp over every local device.
MFU = model FLOPs per token (6 per matmul parameter + attention, see koala_lib/train/budget.py) x tokens/s,
over the devices' dense bf16 peak.

    python bench/train_gpu.py                       # llama-1b-shaped model, seq 2048, on the GPU(s)
    python bench/train_gpu.py --tiny                # the debug model on CPU, a check that the script runs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import record_section  # noqa: E402
from train_step import packed_batch  # noqa: E402

# A LLaMA-architecture model of 1.2B parameters (Llama 3.2 1B's shape with LLaMA-2's vocabulary).
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
             max_position_embeddings=4096, tie_word_embeddings=False)


def run(tiny: bool, batch_per_device: int, length: int, remat: str, steps: int, attention: str | None) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from koala_lib.config import TrainConfig
    from koala_lib.model.llama import Llama
    from koala_lib.model.presets import LlamaConfig, preset
    from koala_lib.model.sharding import LLAMA_RULES, make_mesh, match_rules, named
    from koala_lib.train.budget import flops_per_token, peak_flops
    from koala_lib.train.data import BATCH_SPEC
    from koala_lib.train.optim import make_optimizer
    from koala_lib.train.step import make_train_step

    arch = preset("debug") if tiny else LlamaConfig(**ONE_B)
    dtype = jnp.float32 if tiny else jnp.bfloat16
    mesh = make_mesh("1,-1,1")
    n = jax.device_count()
    model = Llama(arch, dtype=dtype, param_dtype=jnp.float32, attention=attention, remat=remat, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    tx, schedule = make_optimizer(TrainConfig(learning_rate=1e-5), 1000, params)
    specs = {"params": match_rules(LLAMA_RULES, params), "opt_state": match_rules(LLAMA_RULES, jax.eval_shape(tx.init, params)),
             "step": jax.sharding.PartitionSpec(), "rng": jax.sharding.PartitionSpec()}
    shardings = named(mesh, specs)
    state = {"params": jax.device_put(params, shardings["params"]), "step": jnp.int32(0), "rng": jax.random.key_data(jax.random.key(0))}
    state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state["params"])
    batch_sharding = NamedSharding(mesh, BATCH_SPEC)
    host = packed_batch(batch_per_device * n, length, arch.vocab_size)
    batch = {k: jax.device_put(v[None], batch_sharding) for k, v in host.items()}
    step = make_train_step(graphdef, rest, tx, schedule, shardings, batch_sharding)
    start = time.perf_counter()
    step = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, stats = step(state, batch)
    jax.block_until_ready(stats)
    start = time.perf_counter()
    for _ in range(steps):
        state, stats = step(state, batch)
    jax.block_until_ready(stats)
    seconds = (time.perf_counter() - start) / steps
    tokens = batch_per_device * n * length
    peak, source = peak_flops(jax.devices()[0], "float32" if tiny else "bfloat16")
    mfu = flops_per_token(arch, length) * tokens / seconds / (peak * n)
    return {"params": arch.params_count(), "devices": n, "device": jax.devices()[0].device_kind, "step_s": seconds,
            "tokens_per_s": tokens / seconds, "mfu": mfu, "peak": peak, "peak_source": source, "compile_s": compile_s,
            "loss": float(stats["loss"])}


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
        f"tokens, {args.batch_per_device} rows per device, bf16 compute / fp32 AdamW, {attention or 'auto'} attention, remat {args.remat}.",
        "",
        f"Step {r['step_s'] * 1000:.0f} ms, {r['tokens_per_s']:,.0f} tokens/s, **MFU {r['mfu']:.1%}** against {r['peak'] / 1e12:.0f} TFLOP/s per "
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

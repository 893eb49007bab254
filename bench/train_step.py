"""Benchmark: one AdamW training step of SmolLM2-135M, the kit (JAX) against transformers (PyTorch), fp32.

Same weights, same packed batch (4 x 256 tokens by default, three examples per row), same CPU threads, in this
one script. Each side does forward, masked cross-entropy, backward, global-norm clipping and an AdamW update.
The kit runs three times: with its layers looped by lax.scan (how `fit` trains by default), unrolled, and as a
LoRA step (`train.method: lora`, rank 8 on every projection, the base frozen: built by `StateLayout` as `fit`
builds it). MFU counts useful work (real tokens, causal attention within each example; for LoRA no weight
gradient of the frozen base) against a matmul peak measured here.

    python bench/train_step.py [--batch 4] [--length 256] [--remat none] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_forward import interleaved  # noqa: E402
from results import record_section  # noqa: E402
from workload import batch_work, packed_batch  # noqa: E402


def kit_step(folder: Path, batch: dict, remat: str, scan: bool = True):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from koala_lib.config import TrainConfig
    from koala_lib.model.checkpoints import abstract_model, load_hf
    from koala_lib.model.llama import stack_layers
    from koala_lib.model.sharding import make_mesh
    from koala_lib.train.optim import make_optimizer
    from koala_lib.train.step import make_train_step

    mesh = make_mesh("1,1,1", jax.devices()[:1])
    model = load_hf(folder, remat=remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    if scan:  # as `fit` trains by default (train.scan_layers): the layers stacked and looped by lax.scan
        params = stack_layers(params)
        graphdef = nnx.graphdef(abstract_model(model.cfg, remat=remat, scan_layers=True))
    tx, schedule = make_optimizer(TrainConfig(learning_rate=1e-5, no_decay=()), 1000, params)
    replicated = NamedSharding(mesh, P())
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "rng": jax.random.key_data(jax.random.key(0))}
    shardings = jax.tree.map(lambda _: replicated, state)
    return compiled_runner(make_train_step(graphdef, rest, tx, schedule, shardings, replicated), state, batch)


def compiled_runner(step, state: dict, batch: dict):
    """(a call running one step and returning its loss, compile seconds): `step` compiled for the batch first."""
    import jax.numpy as jnp

    device_batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    start = time.perf_counter()
    step = step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], stats = step(holder["state"], device_batch)
        return float(stats["loss"])

    return run, compile_s


def kit_lora_step(folder: Path, batch: dict, remat: str, rank: int):
    """The LoRA train step as `fit` builds it (scanned layers, adapters on every projection), on one device."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from koala_lib import config
    from koala_lib.model.checkpoints import load_hf
    from koala_lib.model.sharding import make_mesh
    from koala_lib.train.state import StateLayout, base_kwargs
    from koala_lib.train.step import make_train_step

    cfg = config.load("demo", [f"model.base={folder}", f"model.remat={remat}", "train.method=lora", f"train.lora.rank={rank}",
                               f"train.lora.alpha={2 * rank}", "train.learning_rate=1e-5", "train.no_decay=[]", "train.warmup_steps=0"])
    mesh = make_mesh("1,1,1", jax.devices()[:1])
    model = load_hf(folder, **base_kwargs(cfg))
    layout = StateLayout.build(cfg, model.cfg, mesh, total_steps=1000)
    state = layout.init(nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1]), seed=0)
    replicated = NamedSharding(mesh, P())
    run, compile_s = compiled_runner(make_train_step(layout.graphdef, layout.rest, layout.tx, layout.schedule, layout.shardings, replicated), state, batch)
    return run, compile_s, layout.adapter_count


def torch_step(folder: Path, batch: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    tokens = torch.tensor(batch["tokens"], dtype=torch.long)
    positions = torch.tensor(batch["positions"], dtype=torch.long)
    seg = torch.tensor(batch["segment_ids"])
    mask = torch.tensor(batch["loss_mask"])
    t = tokens.shape[1]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # packed: attend within the segment only
    attn = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    weights = ((seg[:, 1:] == seg[:, :-1]) & (mask[:, 1:] > 0)).float()

    def run():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, position_ids=positions, attention_mask=attn).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
        loss = (nll * weights.reshape(-1)).sum() / weights.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the LoRA row")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    import jax
    import torch

    from koala_lib.model.gguf_default import default_model_dir
    from koala_lib.model.presets import from_hf_config
    from koala_lib.train.budget import measure_matmul_flops, useful_flops

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    folder = default_model_dir()
    import json

    arch = from_hf_config(json.loads((folder / "config.json").read_text()))
    batch = packed_batch(args.batch, args.length, arch.vocab_size)
    kit, compile_s = kit_step(folder, batch, args.remat, scan=True)
    unrolled, unrolled_compile_s = kit_step(folder, batch, args.remat, scan=False)
    lora, lora_compile_s, adapters = kit_lora_step(folder, batch, args.remat, args.rank)
    hf = torch_step(folder, batch)
    kit_s, unrolled_s, lora_s, hf_s = interleaved([kit, unrolled, lora, hf], args.repeats, rounds=2)
    peak = measure_matmul_flops("float32", 2048)
    tokens = args.batch * args.length
    work = batch_work(arch, batch)
    flops = work["useful_flops"]  # real tokens, causal attention within each packed example
    lora_flops = useful_flops(arch, work["tokens"], work["attention_pairs"], adapters)
    kit_rate, unrolled_rate, lora_rate, hf_rate = tokens / kit_s, tokens / unrolled_s, tokens / lora_s, tokens / hf_s
    lines = [
        f"SmolLM2-135M, batch {args.batch} x {args.length} packed tokens (3 examples per row), fp32, AdamW + clipping, "
        f"{threads} threads, remat {args.remat}; matmul peak measured here {peak / 1e9:.0f} GFLOP/s.",
        "",
        "| implementation | step (s) | tokens/s | MFU |",
        "|---|---:|---:|---:|",
        f"| kit (JAX {jax.__version__}, jit), layers scanned (the default) | {kit_s:.2f} | {kit_rate:,.0f} | {flops / kit_s / peak:.1%} |",
        f"| kit, layers unrolled (train.scan_layers=false) | {unrolled_s:.2f} | {unrolled_rate:,.0f} | {flops / unrolled_s / peak:.1%} |",
        f"| kit, LoRA rank {args.rank} on every projection ({adapters / 1e6:.2f}M adapter parameters), layers scanned | {lora_s:.2f} | {lora_rate:,.0f} | {lora_flops / lora_s / peak:.1%} |",
        f"| transformers (torch {torch.__version__}) | {hf_s:.2f} | {hf_rate:,.0f} | {flops / hf_s / peak:.1%} |",
        "",
        f"LoRA / full fine-tuning (both scanned): **{lora_rate / kit_rate:.2f}x** tokens/s (goal >= 1.3x); LoRA compile {lora_compile_s:.1f} s.",
        f"Ratio kit / transformers: **{kit_rate / hf_rate:.2f}x** scanned, {unrolled_rate / hf_rate:.2f}x unrolled (goal >= 1.0x). "
        f"Kit compile (excluded): {compile_s:.1f} s scanned, {unrolled_compile_s:.1f} s unrolled. MFU counts useful work (real "
        "tokens, causal attention within each example).",
    ]
    print("\n".join(lines))
    if not args.no_record:
        met = "" if kit_rate >= hf_rate else " not met"
        lora_met = "" if lora_rate >= 1.3 * kit_rate else " not met"
        record_section("train_step", "Training step: kit vs transformers (bench/train_step.py)", lines, headline=[
            (f"training step (AdamW), SmolLM2-135M fp32, batch {args.batch} x {args.length} packed, vs transformers (PyTorch), same threads",
             f"{kit_rate / hf_rate:.2f}x with scanned layers, {unrolled_rate / hf_rate:.2f}x unrolled ({kit_rate:,.0f} and {unrolled_rate:,.0f} "
             f"vs {hf_rate:,.0f} tokens/s; kit {flops / kit_s / peak:.0%} MFU of a measured {peak / 1e9:.0f} GFLOP/s matmul; goal >= 1.0x{met})"),
            (f"LoRA training step (rank {args.rank}, every projection) vs the full step, SmolLM2-135M fp32, batch {args.batch} x {args.length}, scanned layers",
             f"{lora_rate / kit_rate:.2f}x ({lora_rate:,.0f} vs {kit_rate:,.0f} tokens/s; goal >= 1.3x{lora_met})")])


if __name__ == "__main__":
    main()

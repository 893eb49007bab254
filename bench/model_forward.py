"""Benchmark: forward tokens/s of the kit's Flax LLaMA against transformers (PyTorch), SmolLM2-135M, fp32.

Both run the real SmolLM2-135M weights at batch 4 x 256 tokens on the same CPU threads, in this one script;
the kit's forward is jitted (compile time excluded, measured once and printed).

    python bench/model_forward.py [--batch 4] [--length 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import record_section  # noqa: E402


def interleaved(fns: list, repeats: int, rounds: int = 3) -> list[float]:
    """Best time of each function over `rounds` alternating blocks of `repeats` calls.

    Blocks alternate so that both implementations see the same machine conditions; within a block one runtime
    runs alone, so neither's idle worker threads (XLA's and PyTorch's pools both spin) get in the other's way.
    """
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            fn()  # warm-up after the other runtime had the cores
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from koala_lib.model.checkpoints import load_hf
    from koala_lib.model.gguf_default import default_model_dir

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    folder = default_model_dir()
    ids = np.random.default_rng(0).integers(0, 49152, size=(args.batch, args.length))
    tokens = args.batch * args.length

    # As the kit's training and generation run the model: split once into a static graph and an array pytree,
    # and jit a pure function of the arrays (nnx.jit would walk the module graph in Python on every call).
    graphdef, state = nnx.split(load_hf(folder))
    pure = jax.jit(lambda s, tokens: nnx.merge(graphdef, s)(tokens))
    forward = lambda x: pure(state, x)
    x = jnp.asarray(ids)
    start = time.perf_counter()
    forward(x).block_until_ready()
    compile_s = time.perf_counter() - start
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    xt = torch.tensor(ids)
    with torch.inference_mode():
        kit_s, hf_s = interleaved([lambda: forward(x).block_until_ready(), lambda: reference(xt)], args.repeats)

    kit_rate, hf_rate = tokens / kit_s, tokens / hf_s
    print(f"kit (JAX {jax.__version__}, jit): {kit_rate:,.0f} tokens/s; first call with compile {compile_s:.1f} s")
    print(f"transformers (torch {torch.__version__}, {threads} threads): {hf_rate:,.0f} tokens/s")
    print(f"ratio kit / transformers: {kit_rate / hf_rate:.2f}x (goal >= 1.0x)")
    record_section(
        "model_forward",
        "Model forward: kit vs transformers (bench/model_forward.py)",
        [
            f"SmolLM2-135M (real weights), fp32, batch {args.batch} x {args.length} tokens, best of 3 alternating blocks of {args.repeats} calls, {threads} CPU threads for both.",
            "",
            "| implementation | tokens/s |",
            "|---|---|",
            f"| koala_lib Flax NNX, split + jax.jit | {kit_rate:,.0f} |",
            f"| transformers LlamaForCausalLM (PyTorch, inference_mode) | {hf_rate:,.0f} |",
            f"| **ratio** | **{kit_rate / hf_rate:.2f}x** (goal >= 1.0x: {'met' if kit_rate >= hf_rate else 'NOT met'}) |",
            "",
            f"The kit's first call compiles: {compile_s:.1f} s.",
        ],
        headline=[(f"model forward, SmolLM2-135M fp32, batch {args.batch} x {args.length}, vs transformers (PyTorch), same threads",
                   f"{kit_rate / hf_rate:.2f}x ({kit_rate:,.0f} vs {hf_rate:,.0f} tokens/s; goal >= 1.0x"
                   f"{'' if kit_rate >= hf_rate else ' not met'})")],
    )


if __name__ == "__main__":
    main()

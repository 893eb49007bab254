"""The training benchmarks' shared workload: a packed batch as stage 2 writes it, and the FLOPs it holds.

Used by bench/train_step.py (CPU, against transformers), bench/train_gpu.py and bench/gpu_check.py.
"""

from __future__ import annotations

import numpy as np


def packed_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of three segments each, answer halves trained (as stage 2 writes them)."""
    rng = np.random.default_rng(seed)
    cuts = sorted(rng.choice(np.arange(16, length - 16), size=2, replace=False))
    bounds = [0, *cuts, length]
    out = {"tokens": rng.integers(0, vocab, size=(batch, length)).astype(np.int32)}
    seg, pos, mask = (np.zeros((batch, length), np.int32) for _ in range(3))
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        seg[:, a:b], pos[:, a:b] = s, np.arange(b - a)
        mask[:, (a + b) // 2 : b] = 1
    return {**out, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def batch_work(arch, host: dict) -> dict:
    """Training FLOPs of one packed batch: useful (real tokens, attention within each example) and the full-row
    count (every position, attention over the whole row)."""
    from koala_lib.train.budget import flops_per_token, useful_flops

    real = host["segment_ids"] > 0
    tokens = int(real.sum())
    pairs = float((host["positions"][real].astype(np.int64) + 1).sum())  # causal pairs within each example
    rows, length = host["tokens"].shape
    return {"tokens": tokens, "attention_pairs": pairs, "useful_flops": useful_flops(arch, tokens, pairs),
            "full_row_flops": flops_per_token(arch, length) * rows * length}

"""Step fingerprints: `train/<variant>/steps.jsonl`, one line per optimizer step, to find where two runs part.

    {"step": 3, "rows": [{"examples": ["hh:...[12]", ...], "tokens_sha256": "9f2c..."}, ...],
     "loss_bits": "4006a3d2", "grad_norm_bits": "3f8c01aa", "lr": 5e-05, "tokens": 1987, "param_checksum": 3141592653}

`loss_bits` and `grad_norm_bits` are the float32 values' exact bits (hex). `param_checksum` is taken on the device
after the update, every step: the parameters' bit patterns as unsigned integers, each times (its index mod 65521)
+ 1, summed modulo 2^32. Integer sums do not depend on the order of the reduction, so the checksum is the same
however XLA splits it across threads or devices, and any changed bit changes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def param_checksum(params) -> jax.Array:
    """A uint32 checksum of every leaf's bits (see the module's docstring); inside a jitted step."""
    total = jnp.uint32(0)
    for leaf in jax.tree.leaves(params):
        wide = {2: jnp.uint16, 4: jnp.uint32}[leaf.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(leaf, wide).astype(jnp.uint32)
        # the element's flat index, built from iotas in the leaf's own shape: nothing is reshaped, so a sharded leaf
        # stays on its shards and XLA fuses all of this into the reduction (no leaf-sized temporary)
        index, stride = jnp.uint32(0), 1
        for dim in reversed(range(leaf.ndim)):
            index = index + jax.lax.broadcasted_iota(jnp.uint32, leaf.shape, dim) * jnp.uint32(stride % 2**32)
            stride *= leaf.shape[dim]
        total = total + jnp.sum(bits * (index % jnp.uint32(65521) + jnp.uint32(1)), dtype=jnp.uint32)
    return total


def float_bits(value: float) -> str:
    """The float32 bits of `value` (a float32 the step returned), as 8 hex digits."""
    return np.float32(value).tobytes()[::-1].hex()


class StepLog:
    """Appends steps.jsonl (the caller first cuts it back to the step a resumed run starts from, as metrics.jsonl)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, step: int, rows: list[dict], stats: dict) -> None:
        line = {"step": step, "rows": rows, "loss_bits": float_bits(stats["loss"]), "grad_norm_bits": float_bits(stats["grad_norm"]),
                "lr": stats["lr"], "tokens": int(stats["tokens"]), "param_checksum": int(stats["param_checksum"])}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()

"""What one layer keeps for its backward pass, found by tracing it rather than by a formula.

    layer_residual_bytes(cfg, "bfloat16", "dots", rows=1, seq_len=2048, attention="xla")

`jax.vjp` of one LLaMA block (under the remat policy's `jax.checkpoint`) is traced with `jax.eval_shape`, so
nothing is computed or allocated; the arrays its backward function holds, less the block's own parameters, are
what a scanned train step stacks for every layer. A `cudnn` attention cannot be traced on a CPU, so its figure is
the `xla` one without the [heads, T, T] score arrays (the part that grows with T², found by tracing at T and
T / 2) and with the fused kernel's softmax statistics instead.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
from flax import nnx

from koala_lib.model.llama import Block, attention_mask, inv_frequencies, remat_policy, rotary
from koala_lib.model.presets import LlamaConfig


@lru_cache(maxsize=256)
def _traced(cfg: LlamaConfig, dtype: str, remat: str, rows: int, seq_len: int) -> tuple[float, float]:
    block = nnx.eval_shape(lambda: Block(cfg, jnp.dtype(dtype), jnp.float32, "xla", nnx.Rngs(0)))
    graphdef, state = nnx.split(block)
    params = {(x.shape, x.dtype) for x in jax.tree.leaves(state)}
    weight_shapes = {shape for shape, _ in params}

    def apply(state, x, cos, sin, mask):
        return nnx.merge(graphdef, state)(x, cos, sin, mask)

    if remat != "none":
        apply = jax.checkpoint(apply, policy=remat_policy(remat), prevent_cse=False)

    def residuals(state, x, positions, segments):
        cos, sin = rotary(positions, inv_frequencies(cfg))
        mask = attention_mask(segments)
        return jax.tree.leaves(jax.vjp(lambda s, h: apply(s, h, cos, sin, mask), state, x)[1])

    ids = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    leaves = jax.eval_shape(residuals, state, jax.ShapeDtypeStruct((rows, seq_len, cfg.hidden_size), jnp.dtype(dtype)), ids, ids)
    kept = [x for x in leaves if (x.shape, x.dtype) not in params]  # the parameters themselves are the step's arguments
    weights = sum(x.size * x.dtype.itemsize for x in kept if x.shape in weight_shapes)  # their compute-dtype copies
    return float(sum(x.size * x.dtype.itemsize for x in kept) - weights), float(weights)


def layer_residual_bytes(cfg: LlamaConfig, dtype: str, remat: str, rows: int, seq_len: int, attention: str) -> tuple[float, float]:
    """(activation bytes, weight-copy bytes) one layer keeps for the backward pass of `rows` x `seq_len` tokens. The
    weight copies (the compute-dtype cast of a weight a matmul's gradient reads) stay split like their weights."""
    saved, weights = _traced(cfg, dtype, remat, rows, seq_len)
    if attention != "cudnn" or remat == "full" or seq_len < 256:
        return saved, weights
    quadratic = 2 * (saved - 2 * _traced(cfg, dtype, remat, rows, seq_len // 2)[0])  # b·T² of a·T + b·T²
    return saved - max(0.0, quadratic) + 4 * rows * cfg.num_heads * seq_len, weights  # + fp32 log-sum-exp per query, head

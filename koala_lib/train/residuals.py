"""What one layer keeps for its backward pass, found by tracing it rather than by a formula.

    layer_residual_bytes(cfg, "bfloat16", "dots", rows=1, seq_len=2048, attention="xla")
    adapters = lora_adapters(cfg, rank=16, targets=TARGETS)        # where a LoRA run's adapters sit
    layer_residual_bytes(cfg, "bfloat16", "full", 1, 2048, "cudnn", lora=(16, adapters.layers[0]))

`jax.vjp` of one LLaMA block (under the remat policy's `jax.checkpoint`) is traced with `jax.eval_shape`, so
nothing is computed or allocated; the arrays its backward function holds, less the block's own parameters, are
what a scanned train step stacks for every layer. A `cudnn` attention cannot be traced on a CPU, so its figure is
the `xla` one without the [heads, T, T] score arrays (the part that grows with T², found by tracing at T and
T / 2) and with the fused kernel's softmax statistics instead.

For LoRA the traced block is the one the step runs: its frozen base in the compute dtype, given to the block
but not differentiated, and adapters (`koala_lib.model.lora`) on the projections the targets pick, the vjp
taken with respect to the adapters and the hidden state only. What it keeps then differs from full
fine-tuning's by the [tokens, r] low-rank intermediates, by what a remat policy saves of the two matmul paths,
and by the weight casts that a bf16 base no longer needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
from flax import nnx

from koala_lib.model.llama import Block, Llama, attention_mask, inv_frequencies, remat_policy, rotary
from koala_lib.model.lora import add_adapters
from koala_lib.model.presets import LlamaConfig

# A LoRA layer to trace: (rank, the block's adapted projections, e.g. ("mlp/up_proj", "self_attn/q_proj")).
LoRALayer = tuple[int, tuple[str, ...]]


@lru_cache(maxsize=256)
def _traced(cfg: LlamaConfig, dtype: str, remat: str, rows: int, seq_len: int, lora: LoRALayer | None = None) -> tuple[float, float]:
    """(activation bytes, weight-copy bytes) of one block's vjp: full fine-tuning's (fp32 weights, all
    differentiated) when `lora` is None, else a LoRA block's (see the module's docstring)."""
    compute = jnp.dtype(dtype)

    def build():
        block = Block(cfg, compute, jnp.float32 if lora is None else compute, "xla", nnx.Rngs(0))
        if lora and lora[1]:  # the projections by their exact kernel paths within a block
            targets = tuple(f"^{re.escape(name)}/kernel$" for name in lora[1])
            add_adapters(block, rank=lora[0], alpha=float(lora[0]), targets=targets, key=jax.random.key(0))
        return block

    block = nnx.eval_shape(build)
    if lora is None:
        graphdef, trained = nnx.split(block)
        frozen = nnx.State({})
    else:
        graphdef, trained, frozen = nnx.split(block, nnx.LoRAParam, ...)
    every = jax.tree.leaves(trained) + jax.tree.leaves(frozen)
    params = {(x.shape, x.dtype) for x in every}
    weight_shapes = {x.shape for x in every}

    def apply(trained, frozen, x, cos, sin, mask):
        return nnx.merge(graphdef, trained, frozen)(x, cos, sin, mask)

    if remat != "none":
        apply = jax.checkpoint(apply, policy=remat_policy(remat), prevent_cse=False)

    def residuals(trained, frozen, x, positions, segments):
        cos, sin = rotary(positions, inv_frequencies(cfg))
        mask = attention_mask(segments)
        return jax.tree.leaves(jax.vjp(lambda t, h: apply(t, frozen, h, cos, sin, mask), trained, x)[1])

    ids = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    hidden = jax.ShapeDtypeStruct((rows, seq_len, cfg.hidden_size), compute)
    leaves = jax.eval_shape(residuals, trained, frozen, hidden, ids, ids)
    kept = [x for x in leaves if (x.shape, x.dtype) not in params]  # the parameters themselves are the step's arguments
    weights = sum(x.size * x.dtype.itemsize for x in kept if x.shape in weight_shapes)  # their compute-dtype copies
    return float(sum(x.size * x.dtype.itemsize for x in kept) - weights), float(weights)


def layer_residual_bytes(cfg: LlamaConfig, dtype: str, remat: str, rows: int, seq_len: int, attention: str,
                         lora: LoRALayer | None = None) -> tuple[float, float]:
    """(activation bytes, weight-copy bytes) one layer keeps for the backward pass of `rows` x `seq_len` tokens. The
    weight copies (the compute-dtype cast of a weight a matmul's gradient reads) stay split like their weights; for
    a LoRA layer (`lora` = (rank, adapted projections)) they are the adapters' casts alone, replicated like them."""
    saved, weights = _traced(cfg, dtype, remat, rows, seq_len, lora)
    if attention != "cudnn" or remat == "full" or seq_len < 256:
        return saved, weights
    quadratic = 2 * (saved - 2 * _traced(cfg, dtype, remat, rows, seq_len // 2, lora)[0])  # b·T² of a·T + b·T²
    return saved - max(0.0, quadratic) + 4 * rows * cfg.num_heads * seq_len, weights  # + fp32 log-sum-exp per query, head


# ----------------------------------------------------------------------------- where LoRA's adapters sit


@dataclass(frozen=True)
class Adapters:
    """A LoRA run's adapters as `koala_lib.model.lora.add_adapters` places them on a model's layers.

    `layers[i]` is what layer i's backward involves: None when no layer at or below it has an adapter (the
    gradient never reaches it, so it keeps nothing), else the projections adapted in it (possibly none: a
    frozen layer the gradient only passes through, to reach the adapters below it)."""

    layers: tuple[tuple[str, ...] | None, ...]
    layer_params: tuple[int, ...]  # adapter parameters of each layer
    other: int  # adapter parameters outside the layers (an adapted lm_head)

    @property
    def count(self) -> int:
        return sum(self.layer_params) + self.other


@lru_cache(maxsize=32)
def lora_adapters(cfg: LlamaConfig, rank: int, targets: tuple[str, ...]) -> Adapters:
    """Adapters of `rank` on the linear layers `targets` pick, read off an abstract unrolled model (shapes only;
    the targets are interpreted by `add_adapters` itself, so the estimate and the train state agree)."""

    def build():
        model = Llama(cfg, rngs=nnx.Rngs(0))
        add_adapters(model, rank=rank, alpha=float(rank), targets=targets, key=jax.random.key(0))
        return model

    adapted = nnx.to_flat_state(nnx.state(nnx.eval_shape(build), nnx.LoRAParam))
    names: list[set[str]] = [set() for _ in range(cfg.num_layers)]
    counts = [0] * cfg.num_layers
    other = 0
    for path, variable in adapted:
        size = variable.get_value().size
        if path[0] == "layers":  # ("layers", i, "mlp", "up_proj", "lora_a")
            names[path[1]].add("/".join(str(p) for p in path[2:-1]))
            counts[path[1]] += size
        else:
            other += size
    first = next((i for i, n in enumerate(names) if n), cfg.num_layers)
    layers = tuple(None if i < first else tuple(sorted(n)) for i, n in enumerate(names))
    return Adapters(layers, tuple(counts), other)

"""The train and eval steps: masked next-token cross-entropy over packed rows, jitted onto the mesh.

Loss convention: the sum of per-token cross-entropies over every trained target of the optimizer step's
whole batch (all micro-batches, all devices), divided by the number of those targets. A target is token
t + 1 predicted at position t, counted when its loss-mask bit is 1 and both tokens belong to the same packed
example (never across examples, never in padding). Long and short examples thus weigh by their tokens, and
accumulating micro-batches gives exactly the full batch's gradient.

    step_fn = make_train_step(graphdef, rest, tx, schedule, state_shardings, batch_sharding)
    state, stats = step_fn(state, batch)     # stats: loss, accuracy, targets, grad_norm, lr, tokens, attention_pairs

The gradient is taken with respect to `state["params"]`. A LoRA state also holds `frozen` (the base weights),
merged into the model beside them and passed through the step unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .fingerprints import param_checksum


def target_weights(batch: dict[str, jax.Array]) -> jax.Array:
    """[b, T] 1.0 where token t+1 is a trained target predicted from position t, else 0.0 (always 0 at the last
    position, which predicts nothing)."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    weights = (same & (batch["loss_mask"][:, 1:] > 0)).astype(jnp.float32)  # [b, T-1]
    return jnp.pad(weights, ((0, 0), (0, 1)))


def token_sums(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(sum of cross-entropy, (correct predictions, targets)) over the trained targets of a micro-batch.

    Every position is scored against the next token (the last against a wrapped-around one, weighted 0) rather
    than slicing logits [b, T-1, V]: the slice would copy the whole logits array, and its gradient pad it back.
    """
    weights = target_weights(batch)  # [b, T]
    targets = jnp.roll(batch["tokens"], -1, axis=1)  # [b, T]: token t+1 at position t
    logits = logits.astype(jnp.float32)  # [b, T, V]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    loss_sum = jnp.sum((log_z - picked) * weights)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
    return loss_sum, (correct, jnp.sum(weights))


def work(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch's useful work for MFU: real (non-padding) tokens, and causal attention pairs within each packed
    example (a token at position p of its example attends to p + 1 tokens)."""
    real = batch["segment_ids"] > 0
    return {"tokens": jnp.sum(real, dtype=jnp.float32), "attention_pairs": jnp.sum(jnp.where(real, batch["positions"] + 1, 0), dtype=jnp.float32)}


def _forward_sums(graphdef, rest, params, frozen, batch):
    model = nnx.merge(graphdef, params, *frozen, rest)
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [b, T, V]
    return token_sums(logits, batch)


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, schedule, state_shardings: Any, batch_sharding: Any):
    """A jitted `(state, batch) -> (state, stats)`; the state's arrays keep their shardings (donated)."""
    grad_fn = jax.value_and_grad(lambda p, frozen, mb: _forward_sums(graphdef, rest, p, frozen, mb), has_aux=True)

    mesh = batch_sharding.mesh.abstract_mesh

    def step(state, batch):  # batch: dict of [accum, micro, T]
        with jax.sharding.use_abstract_mesh(mesh):  # activations keep their rows split (see `constrain`)
            return update(state, batch)

    def update(state, batch):
        params = state["params"]
        frozen = (state["frozen"],) if "frozen" in state else ()

        def micro(carry, mb):
            grads, loss, correct, count = carry
            (l, (c, n)), g = grad_fn(params, frozen, mb)
            return (jax.tree.map(jnp.add, grads, g), loss + l, correct + c, count + n), None

        if batch["tokens"].shape[0] == 1:  # no accumulation: no loop, no zero gradients to add to
            (loss, (correct, count)), grads = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], batch))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
            (grads, loss, correct, count), _ = jax.lax.scan(micro, init, batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            **state,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])),
        }
        stats = {
            "loss": loss / denom,
            "accuracy": correct / denom,
            "targets": count,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            "param_checksum": param_checksum(new_state["params"]),
            **work(batch),
        }
        return new_state, stats

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None), donate_argnums=0)


def weights(state: dict) -> dict:
    """The parts of a train state the model is built from: `params`, and a LoRA run's `frozen` base."""
    return {k: state[k] for k in ("params", "frozen") if k in state}


def make_eval_step(graphdef, rest, weight_shardings: Any, batch_sharding: Any):
    """A jitted `(weights(state), batch) -> (loss sum, correct, targets)` over a [1, micro, T] batch."""

    mesh = batch_sharding.mesh.abstract_mesh

    def evaluate(w, batch):
        mb = jax.tree.map(lambda x: x[0], batch)
        frozen = (w["frozen"],) if "frozen" in w else ()
        with jax.sharding.use_abstract_mesh(mesh):
            loss, (correct, count) = _forward_sums(graphdef, rest, w["params"], frozen, mb)
        return loss, correct, count

    return jax.jit(evaluate, in_shardings=(weight_shardings, batch_sharding))

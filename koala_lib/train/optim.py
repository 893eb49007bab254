"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and a weight-decay mask.

    tx, schedule = make_optimizer(cfg.train, total_steps, params)
    schedule(step)  # the learning rate at an optimizer step

Gradient accumulation is not an optax wrapper here: the train step sums per-token losses over its
micro-batches and divides once by the trainable tokens of the whole batch (see `step.py`), so accumulating
gives exactly the gradient of the full batch.
"""

from __future__ import annotations

import re

import jax
import optax

from koala_lib.config import TrainConfig
from koala_lib.model.sharding import path_str


def learning_rate_schedule(train: TrainConfig, total_steps: int) -> optax.Schedule:
    """0 → peak over `warmup_steps` (linear), then cosine to `end_learning_rate` at `total_steps`."""
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else train.learning_rate,
        peak_value=train.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=train.end_learning_rate,
    )


def decay_mask(train: TrainConfig, params) -> dict:
    """True for parameters that get weight decay: those whose path matches none of `no_decay`."""
    patterns = [re.compile(p) for p in train.no_decay]
    return jax.tree_util.tree_map_with_path(lambda path, _: not any(p.search(path_str(path)) for p in patterns), params)


def make_optimizer(train: TrainConfig, total_steps: int, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(train, total_steps)
    adamw = optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay, mask=decay_mask(train, params))
    clip = [optax.clip_by_global_norm(train.clip_grad_norm)] if train.clip_grad_norm else []
    return optax.chain(*clip, adamw), schedule

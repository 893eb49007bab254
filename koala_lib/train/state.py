"""The train state: its layout on the mesh, shared by `fit` and `koala plan` so that both compile the same step.

    layout = StateLayout.build(cfg, arch, mesh, total_steps)       # graphdef, optimizer, shardings; no arrays
    state = layout.init(params, seed)                               # params (sharded, unrolled) -> the train state
    abstract = layout.abstract()                                    # the same state as ShapeDtypeStructs

The state is `{"params", "opt_state", "step", "rng"}`. With `train.scan_layers` the layers' parameters are
stacked ([L, ...] per leaf, see `koala_lib.model.llama`), and so are the AdamW moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from koala_lib.config import Config
from koala_lib.model.checkpoints import abstract_model, model_kwargs
from koala_lib.model.llama import inv_frequencies, stack_layers, unstack_layers
from koala_lib.model.presets import LlamaConfig
from koala_lib.model.sharding import LLAMA_RULES, check_divisible, match_rules, named

from .optim import make_optimizer


@dataclass
class StateLayout:
    mesh: Mesh
    graphdef: Any  # of the model as trained (scanned or unrolled)
    rest: Any  # its non-parameter state (rotary frequencies), concrete
    unrolled_graphdef: Any  # of the unrolled model: what checkpoints on disk and the exports hold
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    params: Any  # ShapeDtypeStructs of the trained parameters
    specs: dict  # PartitionSpecs of the state
    scanned: bool

    @classmethod
    def build(cls, cfg: Config, arch: LlamaConfig, mesh: Mesh, total_steps: int) -> "StateLayout":
        scanned = cfg.train.scan_layers
        kwargs = model_kwargs(cfg.model)
        graphdef, params, _ = nnx.split(abstract_model(arch, scan_layers=scanned, **kwargs), nnx.Param, ...)
        unrolled_graphdef, _, rest = nnx.split(abstract_model(arch, **kwargs), nnx.Param, ...)
        rest = jax.tree.map(lambda _: inv_frequencies(arch), rest)  # the one non-parameter: computed, not abstract
        params = nnx.to_pure_dict(params)
        tx, schedule = make_optimizer(cfg.train, total_steps, params)  # no_decay patterns match either layout's paths
        param_specs = match_rules(LLAMA_RULES, params)
        check_divisible(params, param_specs, mesh)
        opt_specs = match_rules(LLAMA_RULES, jax.eval_shape(tx.init, params))
        specs = {"params": param_specs, "opt_state": opt_specs, "step": P(), "rng": P()}
        return cls(mesh, graphdef, rest, unrolled_graphdef, tx, schedule, params, specs, scanned)

    @property
    def shardings(self) -> dict:
        return named(self.mesh, self.specs)

    def abstract(self) -> dict:
        """The state as ShapeDtypeStructs carrying their shardings (nothing allocated)."""
        shapes = {"params": self.params, "opt_state": jax.eval_shape(self.tx.init, self.params),
                  "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.shardings)

    def init(self, params: dict, seed: int) -> dict:
        """The first state from unrolled parameters (a pure dict of arrays already on their shards)."""
        shardings = self.shardings
        if self.scanned:
            params = jax.jit(stack_layers, out_shardings=shardings["params"], donate_argnums=0)(params)
        return {
            "params": params,
            "opt_state": jax.jit(self.tx.init, out_shardings=shardings["opt_state"])(params),
            "step": jax.device_put(np.int32(0), shardings["step"]),
            "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings["rng"]),
        }

    def unrolled(self, params: dict) -> dict:
        """Trained parameters in the unrolled layout (what `save_hf` and the other stages read)."""
        return unstack_layers(params) if self.scanned else params

    def model(self, params: dict):
        """The unrolled Llama holding `params` (for export)."""
        return nnx.merge(self.unrolled_graphdef, self.unrolled(params), self.rest)

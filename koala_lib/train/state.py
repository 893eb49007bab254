"""The train state: its layout on the mesh, shared by `fit` and `koala plan` so that both compile the same step.

    layout = StateLayout.build(cfg, arch, mesh, total_steps)       # graphdef, optimizer, shardings; no arrays
    state = layout.init(params, seed)                               # params (sharded, unrolled) -> the train state
    abstract = layout.abstract()                                    # the same state as ShapeDtypeStructs

The state is `{"params", "opt_state", "step", "rng"}`. With `train.scan_layers` the layers' parameters are
stacked ([L, ...] per leaf, see `koala_lib.model.llama`), and so are the AdamW moments.

With `train.method: lora` the trained `params` are the adapters alone (fp32, `koala_lib.model.lora`) and the
state gains `frozen`: the base weights in `model.dtype`, which get no gradient and no optimizer state. They are
not checkpointed (`checkpointed`): a resumed run reads them from the base again.
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

from koala_lib.config import Config, ConfigError
from koala_lib.model.checkpoints import abstract_model, model_kwargs
from koala_lib.model.llama import Llama, inv_frequencies, stack_layers, unstack_layers
from koala_lib.model.lora import add_adapters, init_adapters, merge_adapters
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
    frozen: Any = None  # LoRA: ShapeDtypeStructs of the frozen base (in the trained layout); else None
    adapters: Any = None  # LoRA: ShapeDtypeStructs of the adapters in the unrolled layout
    scale: float = 1.0  # LoRA: alpha / rank

    @classmethod
    def build(cls, cfg: Config, arch: LlamaConfig, mesh: Mesh, total_steps: int) -> "StateLayout":
        scanned = cfg.train.scan_layers
        kwargs = base_kwargs(cfg)
        unrolled_graphdef, _, rest = nnx.split(abstract_model(arch, **kwargs), nnx.Param, ...)
        rest = jax.tree.map(lambda _: inv_frequencies(arch), rest)  # the one non-parameter: computed, not abstract
        frozen = adapters = None
        if cfg.train.method == "lora":
            graphdef, params, frozen, _ = nnx.split(adapted_model(cfg, arch, scanned), nnx.LoRAParam, nnx.Param, ...)
            frozen = nnx.to_pure_dict(frozen)
            adapters = nnx.to_pure_dict(nnx.split(adapted_model(cfg, arch, False), nnx.LoRAParam, ...)[1])
        else:
            graphdef, params, _ = nnx.split(abstract_model(arch, scan_layers=scanned, **kwargs), nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        tx, schedule = make_optimizer(cfg.train, total_steps, params)  # no_decay patterns match either layout's paths
        param_specs = match_rules(LLAMA_RULES, params)
        check_divisible(params, param_specs, mesh)
        opt_specs = match_rules(LLAMA_RULES, jax.eval_shape(tx.init, params))
        specs = {"params": param_specs, "opt_state": opt_specs, "step": P(), "rng": P()}
        if frozen is not None:
            specs["frozen"] = match_rules(LLAMA_RULES, frozen)
            check_divisible(frozen, specs["frozen"], mesh)
        scale = cfg.train.lora.alpha / cfg.train.lora.rank
        return cls(mesh, graphdef, rest, unrolled_graphdef, tx, schedule, params, specs, scanned, frozen, adapters, scale)

    @property
    def lora(self) -> bool:
        return self.frozen is not None

    @property
    def adapter_count(self) -> int | None:
        """LoRA: the trained (adapter) parameters; None for full fine-tuning."""
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params)) if self.lora else None

    @property
    def shardings(self) -> dict:
        return named(self.mesh, self.specs)

    def abstract(self) -> dict:
        """The state as ShapeDtypeStructs carrying their shardings (nothing allocated)."""
        shapes = {"params": self.params, "opt_state": jax.eval_shape(self.tx.init, self.params),
                  "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
        if self.lora:
            shapes["frozen"] = self.frozen
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.shardings)

    def init(self, params: dict, seed: int) -> dict:
        """The first state from unrolled base parameters (a pure dict of arrays already on their shards; for LoRA in
        the compute dtype, see `base_kwargs`): full fine-tuning trains them, LoRA freezes them beside new adapters.
        With scanned layers the arrays given are stacked and then deleted: the caller must not use them again."""
        shardings = self.shardings

        def stack(tree: dict, where) -> dict:
            """The scanned layout of `tree`, whose unrolled arrays are freed at once. (Donating them would not help: a
            per-layer input can never alias a stacked [L, ...] output, and XLA would warn of every one.)"""
            if not self.scanned:
                return tree
            stacked = jax.block_until_ready(jax.jit(stack_layers, out_shardings=where)(tree))
            for leaf in jax.tree.leaves(tree):
                leaf.delete()
            return stacked

        state = {}
        if self.lora:
            state["frozen"] = stack(params, shardings["frozen"])
            where = named(self.mesh, match_rules(LLAMA_RULES, self.adapters))  # the unrolled adapters' shardings
            params = stack(jax.jit(lambda: init_adapters(self.adapters, adapter_key(seed)), out_shardings=where)(), shardings["params"])
        else:
            params = stack(params, shardings["params"])
        return {
            "params": params,
            "opt_state": jax.jit(self.tx.init, out_shardings=shardings["opt_state"])(params),
            "step": jax.device_put(np.int32(0), shardings["step"]),
            "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings["rng"]),
            **state,
        }

    def checkpointed(self, state: dict) -> dict:
        """What a checkpoint holds: the state less the frozen base (a resumed run reads it from the base again)."""
        return {k: v for k, v in state.items() if k != "frozen"}

    def unrolled(self, state: dict) -> dict:
        """The model's parameters in the unrolled layout (what `save_hf` and the other stages read), as host arrays
        gathered from every process; for LoRA the base with the adapters merged in (W + alpha / rank * A B, in the
        base's dtype). On the host, so that a device that holds one copy of the weights need not hold a second."""
        params = to_host(state["params"])
        if self.lora:
            params = merge_adapters(to_host(state["frozen"]), params, self.scale)
        return unstack_layers(params) if self.scanned else params

    def adapter(self, state: dict) -> dict:
        """LoRA: the trained adapters in the unrolled layout, on the host (what `koala_lib.model.peft.save_adapter`
        writes)."""
        params = to_host(state["params"])
        return unstack_layers(params) if self.scanned else params

    def model(self, state: dict):
        """The unrolled Llama holding the trained weights (for export)."""
        return nnx.merge(self.unrolled_graphdef, self.unrolled(state), self.rest)


def to_host(tree):
    """Every leaf as a host numpy array, gathered from every process when the array spans several (a collective:
    every process must call it)."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)


def base_kwargs(cfg: Config) -> dict:
    """`Llama` keyword arguments of the base model as trained: LoRA keeps the frozen base in the compute dtype."""
    kwargs = model_kwargs(cfg.model)
    if cfg.train.method == "lora":
        kwargs["param_dtype"] = kwargs["dtype"]
    return kwargs


def adapted_model(cfg: Config, arch: LlamaConfig, scanned: bool) -> Llama:
    """An abstract base model (shapes only) with the profile's LoRA adapters added."""
    lora = cfg.train.lora

    def make():
        model = Llama(arch, rngs=nnx.Rngs(0), scan_layers=scanned, **base_kwargs(cfg))
        add_adapters(model, rank=lora.rank, alpha=lora.alpha, targets=lora.targets, key=jax.random.key(0))
        return model

    try:
        return nnx.eval_shape(make)
    except ValueError as exc:  # a target that matches nothing, a rank too large: a settings error, named
        raise ConfigError(str(exc)) from None


def adapter_key(seed: int) -> jax.Array:
    """The key the adapters' A matrices are drawn from."""
    return jax.random.fold_in(jax.random.key(seed), 0x10A)

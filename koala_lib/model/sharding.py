"""Sharding: a (data, fsdp, tensor) device mesh and an ordered regex → PartitionSpec table.

    mesh = make_mesh("1,8,1")                       # -1 takes the remaining devices
    specs = match_rules(LLAMA_RULES, params)        # one PartitionSpec per leaf, by its path
    params = jax.device_put(params, named(mesh, specs))

Axes: `data` replicates the model and splits the batch; `fsdp` splits both the batch and every large weight
(ZeRO-3 style: weights are gathered for a matmul and gradients reduce-scattered, which XLA's SPMD partitioner
inserts); `tensor` splits attention heads and MLP columns (Megatron style). A leaf path is the parameter's
names joined by `/`, e.g. `layers/3/self_attn/q_proj/kernel`; rules are tried in order and the first whose
regex is found in the path wins. A leaf that no rule matches is an error, never a silent replication.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .mesh_spec import parse_mesh

AXES = ("data", "fsdp", "tensor")
BATCH = P(("data", "fsdp"))  # rows of a batch: split over every data-parallel device
HIDDEN = P(("data", "fsdp"), None, None)  # hidden states [B, T, D]: rows split, each device holds its rows whole

# Kernels are stored [in, out] (flax `Linear`); the embedding [V, D].
LLAMA_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),  # [V, D]
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tensor")),  # [D, heads * H]: heads split
    (r"self_attn/o_proj/kernel$", P("tensor", "fsdp")),  # [heads * H, D]
    (r"mlp/(gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),  # [D, I]
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),  # [I, D]
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"(layernorm|norm)/weight$", P()),  # [D], small: replicated
    (r"/lora_(a|b)$", P()),  # LoRA adapters [in, r] and [r, out], small: replicated
)


def mesh_shape(spec: str, n_devices: int) -> tuple[int, int, int]:
    """'1,8,1' or '1,-1,1' → (data, fsdp, tensor) sizes whose product is `n_devices`."""
    sizes = parse_mesh(spec)
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {spec!r}: {n_devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ValueError(f"mesh {spec!r} needs {int(np.prod(sizes))} devices; there are {n_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(spec, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def path_str(path: Iterable[Any]) -> str:
    """A pytree key path as `a/b/0/c` (dict keys, sequence indices and attribute names; `value` dropped)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
        if name != "value":
            parts.append(str(name))
    return "/".join(parts)


STACKED = re.compile(r"(^|/)layers/[^0-9/]")  # `layers/mlp/...` (scanned: a leading layer axis), not `layers/3/mlp/...`


def match_rules(rules: Sequence[tuple[str, P]], tree: Any) -> Any:
    """A tree of PartitionSpecs shaped like `tree`; scalars are replicated, an unmatched leaf is an error. A leaf of
    scanned layers (`layers/<name>`, no index) keeps its leading layer axis whole: its rule's spec shifts by one."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def spec_for(path, leaf) -> P:
        name = path_str(path)
        if np.ndim(leaf) == 0:
            return P()
        for pattern, spec in compiled:
            if pattern.search(name):
                if STACKED.search(name):
                    spec = P(None, *spec)
                if len(spec) > np.ndim(leaf):
                    raise ValueError(f"{name}: rule {pattern.pattern!r} gives {spec} for a {np.ndim(leaf)}-d leaf")
                return spec
        raise KeyError(f"no partition rule matches {name!r} (shape {tuple(np.shape(leaf))}); add one to the rule table")

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def check_divisible(tree: Any, specs: Any, mesh: Mesh) -> None:
    """Every sharded dimension must divide by the product of its mesh axes; the error names the leaf."""
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        for dim, axes in zip(np.shape(leaf), spec):
            if axes is None:
                continue
            size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
            if dim % size:
                raise ValueError(f"{path_str(path)}: dimension {dim} does not divide over {axes} ({size} devices); change train.mesh")


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """`x` held to `spec` when traced under a mesh (`jax.sharding.use_abstract_mesh`, as the train step does), else
    unchanged. Without it XLA's propagation may split a packed batch's hidden states by the fsdp-split weight
    dimension instead of by rows, and every device would compute every row."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def named(mesh: Mesh, specs: Any) -> Any:
    """NamedShardings for a tree of PartitionSpecs."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

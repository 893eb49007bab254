"""LoRA (Hu et al., 2021): low-rank adapters beside frozen linear layers, as a transform of a built `Llama`.

    add_adapters(model, rank=8, alpha=16, targets=TARGETS, key=jax.random.key(0))   # in place
    graphdef, adapters, base, rest = nnx.split(model, nnx.LoRAParam, nnx.Param, ...)
    merged = merge_adapters(base_params, adapters, scale=alpha / rank)              # pure dicts

A targeted `nnx.Linear` (kernel W [in, out]) becomes a `LoRALinear` computing x W + (alpha / r) (x A) B, with
A [in, r] and B [r, out] held in fp32 as `nnx.LoRAParam` (a subclass of `nnx.Param`: split them out first).
A is drawn uniform in ±1/sqrt(in) and B is zero, as in the paper and PEFT, so an adapted model computes exactly
the base model until B moves. The kernel keeps its path (`layers/3/self_attn/q_proj/kernel`), so checkpoints,
sharding rules and the Hugging Face mapping see the same names; the adapters sit beside it
(`.../q_proj/lora_a`, `.../q_proj/lora_b`).

`targets` are regexes searched in the unrolled kernel paths (`layers/<i>/mlp/up_proj/kernel`, `lm_head/kernel`).
On a model with scanned layers (one block whose parameters carry a leading layer axis) a target must pick a
projection in every layer or in none, since the stacked block has one set of modules for all layers.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TARGETS = (r"self_attn/(q|k|v|o)_proj", r"mlp/(gate|up|down)_proj")  # every projection of every block


class LoRALinear(nnx.Module):
    """A bias-free linear layer plus a low-rank update: x W + scale (x A) B, all matmuls in `dtype`."""

    def __init__(self, kernel: nnx.Param, a: jax.Array, b: jax.Array, scale: float, dtype):
        self.kernel = kernel  # the base layer's own Variable: same value, same path
        self.lora_a = nnx.LoRAParam(a)  # [..., in, r]
        self.lora_b = nnx.LoRAParam(b)  # [..., r, out]
        self.scale = scale
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        x = x.astype(dtype)
        base = _dot(x, self.kernel[...].astype(dtype))  # what nnx.Linear computes
        low = _dot(_dot(x, self.lora_a[...].astype(dtype)), self.lora_b[...].astype(dtype))
        return base + low * self.scale


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


# ----------------------------------------------------------------------------- which layers


def linear_paths(model: nnx.Module) -> dict[tuple, list[str]]:
    """Every `nnx.Linear` of the model: its module path -> the unrolled kernel path(s) it holds (one per layer
    for a scanned block, whose `layers/<name>` path has no index)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Linear, LoRALinear)):
            name = "/".join(str(p) for p in path) + "/kernel"
            if path and path[0] == "layers" and not isinstance(path[1], int):  # scanned: expand the layer axis
                layers = node.kernel.shape[0]
                out[tuple(path)] = [f"layers/{i}/" + name.removeprefix("layers/") for i in range(layers)]
            else:
                out[tuple(path)] = [name]
    return out


def _shown(paths: Iterable[str]) -> str:
    """Kernel paths for an error message: one layer's stand for all (`layers/<i>/...`)."""
    seen = []
    for p in paths:
        p = re.sub(r"^layers/\d+/", "layers/<i>/", p)
        if p not in seen:
            seen.append(p)
    return ", ".join(seen)


def select(model: nnx.Module, targets: Sequence[str], rank: int) -> list[tuple]:
    """The module paths of the linear layers `targets` pick, checked: every target picks something, a scanned
    projection is picked in all its layers or none, and `rank` is at most each picked kernel's smaller side."""
    paths = linear_paths(model)
    compiled = []
    for t in targets:
        try:
            compiled.append(re.compile(t))
        except re.error as exc:
            raise ValueError(f"train.lora.targets: {t!r} is not a regular expression ({exc})") from None
    every = [name for names in paths.values() for name in names]
    for t, pattern in zip(targets, compiled):
        if not any(pattern.search(name) for name in every):
            raise ValueError(f"train.lora.targets: {t!r} matches no linear layer; the kernel paths are {_shown(every)}")
    chosen = []
    for module_path, names in paths.items():
        hits = [any(p.search(n) for p in compiled) for n in names]
        if not any(hits):
            continue
        if not all(hits):
            picked = [n.split("/")[1] for n, h in zip(names, hits) if h]
            raise ValueError(f"train.lora.targets pick {names[0].split('/', 2)[2]} in layers {', '.join(picked)} only; with "
                             "train.scan_layers the layers share one set of adapters: target every layer, or set train.scan_layers=false")
        node = _get(model, module_path)
        fan_in, fan_out = node.kernel.shape[-2:]
        if rank > min(fan_in, fan_out):
            raise ValueError(f"train.lora.rank {rank} is above {names[0]}'s smaller dimension ({fan_in} x {fan_out})")
        chosen.append(module_path)
    return chosen


def _get(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


# ----------------------------------------------------------------------------- adding, initialising, merging


def init_pair(name: str, fan_in: int, fan_out: int, rank: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(A, B) for the layer at unrolled kernel path `name`: A uniform in ±1/sqrt(fan_in) from a key derived from the
    path (the same adapters whatever the layout), B zero; both fp32."""
    key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    bound = 1.0 / fan_in**0.5
    a = jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound)
    return a, jnp.zeros((rank, fan_out), jnp.float32)


def add_adapters(model: nnx.Module, *, rank: int, alpha: float, targets: Sequence[str] = TARGETS, key: jax.Array) -> list[str]:
    """Replace the targeted linear layers of `model` by `LoRALinear`s (in place); returns their unrolled kernel paths."""
    if rank < 1:
        raise ValueError(f"train.lora.rank: {rank}; it must be at least 1")
    paths = linear_paths(model)
    added = []
    for module_path in select(model, targets, rank):
        node = _get(model, module_path)
        fan_in, fan_out = node.kernel.shape[-2:]
        pairs = [init_pair(name, fan_in, fan_out, rank, key) for name in paths[module_path]]
        a, b = pairs[0] if len(pairs) == 1 and node.kernel.ndim == 2 else (jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs]))
        parent = _get(model, module_path[:-1])
        layer = LoRALinear(node.kernel, a, b, alpha / rank, node.dtype)
        if isinstance(module_path[-1], int):
            parent[module_path[-1]] = layer
        else:
            setattr(parent, module_path[-1], layer)
        added.extend(paths[module_path])
    return added


def merge_adapters(params: dict, adapters: dict, scale: float) -> dict:
    """Base parameters (a pure dict) with every adapted kernel replaced by W + scale A B, computed in fp32 with numpy
    (on the host: no device memory) and returned in W's dtype; unrolled and scanned ([L, ...]) layouts alike."""
    if not isinstance(adapters, dict):
        return params
    out = dict(params)
    for name, sub in adapters.items():
        if isinstance(sub, dict) and "lora_a" in sub:
            kernel = np.asarray(params[name]["kernel"])
            delta = np.matmul(np.asarray(sub["lora_a"], np.float32), np.asarray(sub["lora_b"], np.float32))
            out[name] = {**params[name], "kernel": (kernel.astype(np.float32) + np.float32(scale) * delta).astype(kernel.dtype)}
        else:
            out[name] = merge_adapters(params[name], sub, scale)
    return out


def init_adapters(shapes: dict, key: jax.Array) -> dict:
    """Initial adapters for a pure dict of unrolled adapter shapes (`{..., "q_proj": {"lora_a", "lora_b"}}`): the
    values `add_adapters` gives with the same key."""

    def walk(tree, path):
        if "lora_a" in tree:
            fan_in, rank = tree["lora_a"].shape
            a, b = init_pair("/".join(path) + "/kernel", fan_in, tree["lora_b"].shape[1], rank, key)
            return {"lora_a": a, "lora_b": b}
        return {k: walk(v, (*path, str(k))) for k, v in tree.items()}

    return walk(shapes, ())

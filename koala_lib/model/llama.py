"""LLaMA in Flax NNX, numerically equal to transformers' `LlamaForCausalLM`.

Reads top to bottom: rotary embeddings, RMSNorm, attention, MLP, block, model. Shapes in comments use
B batch, T query length, S key length, D hidden size, N query heads, K key/value heads, H head size, V vocab.

Packed rows: `segment_ids` [B, T] (0 = padding) and `positions` [B, T] come with the batch; a token attends
only to earlier tokens of its own segment, so each packed example is computed as if it were alone.

Parameters live in `param_dtype` (fp32 master weights); matmuls run in `dtype` (e.g. bf16 on GPU).
Attention goes through `jax.nn.dot_product_attention` (`xla` on CPU, `cudnn` on GPU, or JAX's choice).

Layers are a list of blocks (`layers/3/mlp/up_proj/kernel`), or with `scan_layers` one block whose parameters
carry a leading layer axis (`layers/mlp/up_proj/kernel` [L, D, I]), run by `jax.lax.scan` (what training uses):
XLA compiles one layer instead of L, and under FSDP each step of the loop gathers only its own layer's weights,
where an unrolled graph lets the scheduler gather every layer at once. `stack_layers` / `unstack_layers` convert
between the two parameter layouts.

Generation runs the same layers through `Llama.extend`, which writes keys and values into a KV cache
(one [B, K, S, H] pair per layer, S cache slots) and attends over the slots marked valid, so a batch of
left-padded prompts is decoded one slot at a time for every row at once.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from .presets import LlamaConfig
from .sharding import HIDDEN, constrain

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]


# ----------------------------------------------------------------------------- rotary embeddings


def inv_frequencies(cfg: LlamaConfig) -> jax.Array:
    """[H/2] rotary frequencies, with Llama 3's scaling when the config has it (as transformers computes them)."""
    h = cfg.head_size
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rotary(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, H] for integer positions [B, T] (Hugging Face layout: the two halves repeat)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, H] rotated: x*cos + rotate_half(x)*sin, rotate_half(x) = (-x2, x1)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D], normalised in fp32
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype, param_dtype, implementation, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.head_size
        self.n_heads, self.n_kv, self.head = cfg.num_heads, cfg.num_kv_heads, h
        self.implementation = implementation
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, self.n_heads * h)
        self.k_proj = linear(d, self.n_kv * h)
        self.v_proj = linear(d, self.n_kv * h)
        self.o_proj = linear(self.n_heads * h, d)

        self.qkv_proj: nnx.Linear | None = None  # set by `fuse` (decoding), replacing the three above

    def fuse(self) -> None:
        """One [D, (N + 2K) H] projection instead of three: fewer, wider matmuls, which decoding's few rows favour."""
        kernels = [p.kernel[...] for p in (self.q_proj, self.k_proj, self.v_proj)]
        self.qkv_proj = nnx.data(_linear_like(self.q_proj, jnp.concatenate(kernels, axis=1)))
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, d = x.shape  # x [B, T, D]
        x = x.reshape(b * t, d)  # 2-D projections (see `MLP.__call__`)
        if self.qkv_proj is not None:
            q, k, v = jnp.split(self.qkv_proj(x), [self.n_heads * self.head, (self.n_heads + self.n_kv) * self.head], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, t, self.n_heads, self.head)  # [B, T, N, H]
        k = k.reshape(b, t, self.n_kv, self.head)  # [B, T, K, H]
        v = v.reshape(b, t, self.n_kv, self.head)  # [B, T, K, H]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, blocks: int = 1) -> jax.Array:
        """q [B, T, N, H], k and v [B, S, K, H], mask [B, 1, T, S] -> [B, T, D].

        With `blocks` > 1 (self-attention, S == T, a causal mask), the queries are cut into that many blocks and
        each attends only to the keys up to its own end: causality masks every later key, so the result is the
        same and the masked upper triangle (3/8 of the work for 4 blocks) is never computed.
        """
        t = q.shape[1]
        size = -(-t // blocks)
        outs = [
            jax.nn.dot_product_attention(q[:, i : i + size], k[:, : i + size], v[:, : i + size],
                                         mask=mask[:, :, i : i + size, : i + size], implementation=self.implementation)
            for i in range(0, t, size)
        ]  # each [B, size, N, H]
        return self.output(outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1))

    def output(self, out: jax.Array) -> jax.Array:
        """The heads' outputs [B, T, N, H] through o_proj, on 2-D rows -> [B, T, D]."""
        b, t = out.shape[:2]
        return self.o_proj(out.reshape(b * t, self.n_heads * self.head)).reshape(b, t, -1)

    def causal_blocks(self, t: int) -> int:
        """Query blocks for self-attention over T tokens: 4 for XLA's attention on rows of 128+ tokens (measured
        on CPU: +4 % on a SmolLM2 training step at 4 x 256), else 1; cuDNN's fused kernel is called whole."""
        return 4 if self.implementation != "cudnn" and t >= 128 else 1

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        return self.attend(*self.project(x, cos, sin), mask, self.causal_blocks(x.shape[1]))

    def cached(self, x, cos, sin, mask, kv: tuple[jax.Array, jax.Array], index: jax.Array):
        """Attention of T new tokens written at cache slots index..index+T-1 (`index` a scalar, or one per row [B]);
        returns (out, updated kv).

        The cache is laid out [B, K, S, H]: one query token (decoding) then reads each head's keys contiguously.
        """
        t = x.shape[1]
        q, k, v = self.project(x, cos, sin)  # [B, T, N, H], [B, T, K, H]
        cache_k, cache_v = (write_slots(c, new.swapaxes(1, 2).astype(c.dtype), index) for c, new in zip(kv, (k, v)))  # [B, K, S, H]
        if t == 1:
            out = self.output(one_query_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask))
        else:
            out = self.attend(q, cache_k.swapaxes(1, 2).astype(q.dtype), cache_v.swapaxes(1, 2).astype(q.dtype), mask)
        return out, (cache_k, cache_v)


def write_slots(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """`new` [B, K, T, H] written into `cache` [B, K, S, H] at slots index..index+T-1: one index for every row, or
    one per row ([B]: rows that joined a running batch at different times)."""
    index = jnp.asarray(index, jnp.int32)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i, 0)))(cache, new, index)


def one_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention for one query token per row: q [B, 1, N, H], k and v [B, K, S, H], mask [B, 1, 1, S] -> [B, 1, N, H].

    Written as broadcast products and sums rather than batched matmuls: with a single query, XLA's CPU dot
    handles these many tiny products slowly, while the elementwise form streams the cache once.
    """
    b, _, n, h = q.shape
    groups = n // k.shape[1]
    qg = q.reshape(b, k.shape[1], groups, 1, h).astype(jnp.float32)  # [B, K, G, 1, H]
    scores = (qg * k[:, :, None].astype(jnp.float32)).sum(-1) / math.sqrt(h)  # [B, K, G, S]
    scores = jnp.where(mask[:, :, 0][:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = (probs[..., None] * v[:, :, None].astype(jnp.float32)).sum(-2)  # [B, K, G, H]
    return out.reshape(b, 1, n, h).astype(q.dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype, param_dtype, rngs: nnx.Rngs):
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size)

        self.gate_up_proj: nnx.Linear | None = None  # set by `fuse` (decoding)

    def fuse(self) -> None:
        """One [D, 2I] projection for gate and up."""
        self.gate_up_proj = nnx.data(_linear_like(self.gate_proj, jnp.concatenate([self.gate_proj.kernel[...], self.up_proj.kernel[...]], axis=1)))
        del self.gate_proj, self.up_proj

    def __call__(self, x: jax.Array) -> jax.Array:  # SwiGLU: [B, T, D] -> [B, T, D]
        # On [B*T, D] rows: with 3-D activations XLA's CPU backward materialises the gate gradient transposed
        # ([I, B*T], a slow copy per layer); 2-D rows make the weight-gradient dots plain matmuls (~1.4x faster).
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [B*T, D]
        if self.gate_up_proj is not None:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up).reshape(shape)


def _linear_like(like: nnx.Linear, kernel: jax.Array) -> nnx.Linear:
    """A bias-free Linear with `like`'s dtypes holding `kernel` [in, out]."""
    out = nnx.Linear(kernel.shape[0], kernel.shape[1], use_bias=False, dtype=like.dtype, param_dtype=like.param_dtype,
                     rngs=nnx.Rngs(0), kernel_init=lambda *_: kernel)
    return out


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, dtype, param_dtype, implementation, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, rngs)
        self.self_attn = Attention(cfg, dtype, param_dtype, implementation, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, rngs)
        self.mlp = MLP(cfg, dtype, param_dtype, rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def cached(self, x, cos, sin, mask, kv, index):
        h, kv = self.self_attn.cached(self.input_layernorm(x), cos, sin, mask, kv, index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


# ----------------------------------------------------------------------------- the model


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: causal, and only within a segment (padding, segment 0, attends within padding)."""
    t = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None, :, :]


_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_policy(remat: RematPolicy):
    """The `jax.checkpoint` policy of a remat setting other than `none` (None: save nothing, recompute all)."""
    return _POLICIES[remat]


class Llama(nnx.Module):
    """LlamaForCausalLM: token ids [B, T] -> logits [B, T, V] (computed in `dtype`, returned in fp32)."""

    def __init__(
        self,
        cfg: LlamaConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention: Literal["xla", "cudnn"] | None = None,
        remat: RematPolicy = "none",
        scan_layers: bool = False,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.remat = remat
        self.scan_layers = scan_layers
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        blocks = [Block(cfg, dtype, param_dtype, attention, rngs) for _ in range(cfg.num_layers)]
        self.layers = _stack_blocks(blocks) if scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype, rngs)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Linear(
            cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.inv_freq = nnx.Variable(inv_frequencies(cfg))  # a constant, not a parameter

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), dtype=jnp.int32)
        cos, sin = rotary(positions, self.inv_freq[...])  # [B, T, 1, H]
        mask = attention_mask(segment_ids)  # [B, 1, T, T]
        x = constrain(self.embed_tokens(tokens), HIDDEN)  # [B, T, D]
        if self.scan_layers:
            return self.logits(self._scan(x, cos, sin, mask))
        for block in self.layers:
            if self.remat == "none":
                x = block(x, cos, sin, mask)
            else:
                x = nnx.remat(Block.__call__, policy=remat_policy(self.remat))(block, x, cos, sin, mask)
            x = constrain(x, HIDDEN)
        return self.logits(x)

    def _scan(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """The stacked block applied L times by `lax.scan`, each step on its layer's slice of the parameters."""
        graphdef, stacked = nnx.split(self.layers)

        def step(x, layer):
            return constrain(nnx.merge(graphdef, layer)(x, cos, sin, mask), HIDDEN), None

        if self.remat != "none":
            step = jax.checkpoint(step, policy=remat_policy(self.remat), prevent_cse=False)  # inside a loop CSE is safe
        return jax.lax.scan(step, x, stacked)[0]

    def logits(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape  # hidden states [B, T, D] -> logits [B, T, V] in fp32
        x = self.norm(x).reshape(b * t, -1)  # [B*T, D]: XLA's CPU dot is markedly faster on 2-D operands here
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)  # [B*T, V]
        return logits.reshape(b, t, -1).astype(jnp.float32)  # [B, T, V]

    # ------------------------------------------------------------------------- generation with a KV cache

    def fused(self) -> "Llama":
        """A copy whose attention and MLP projections are fused (q/k/v and gate/up): the same function, fewer
        matmuls per layer. Used for decoding; the copy's parameter names no longer match a checkpoint's."""
        self._unrolled("fused")
        model = nnx.clone(self)
        for block in model.layers:
            block.self_attn.fuse()
            block.mlp.fuse()
        return model

    def init_cache(self, batch: int, slots: int, dtype=None) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """An empty KV cache: one (keys, values) pair [B, K, S, H] per layer, in the compute dtype."""
        dtype = dtype or self.dtype
        shape = (batch, self.cfg.num_kv_heads, slots, self.cfg.head_size)
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers)

    def extend(self, tokens, positions, valid, cache, index, last_only: bool = False):
        """Run tokens [B, T] at cache slots index..index+T-1 and return (logits, updated cache); `index` is one slot
        for every row, or one per row [B] (continuous batching: each row writes where its own answer has got to).

        `valid` [B, S] marks the slots that hold real tokens (these T included): a query at slot i attends to
        the valid slots j <= i, so left padding is never seen. `positions` [B, T] are the rotary positions
        (a row's count of real tokens before each one). With `last_only`, logits [B, 1, V] of the last slot only.
        """
        self._unrolled("extend")
        b, t = tokens.shape
        slots = valid.shape[1]
        query_slot = jnp.asarray(index, jnp.int32)[..., None] + jnp.arange(t)  # [T], or [B, T] for per-row indices
        causal = jnp.arange(slots) <= query_slot[..., None]  # [T, S] or [B, T, S]
        mask = (valid[:, None, :] & causal)[:, None]  # [B, 1, T, S]
        cos, sin = rotary(positions, self.inv_freq[...])  # [B, T, 1, H]
        x = self.embed_tokens(tokens)  # [B, T, D]
        new_cache = []
        for block, kv in zip(self.layers, cache):
            x, kv = block.cached(x, cos, sin, mask, kv, index)
            new_cache.append(kv)
        return self.logits(x[:, -1:] if last_only else x), tuple(new_cache)

    def _unrolled(self, what: str) -> None:
        if self.scan_layers:
            raise ValueError(f"Llama.{what} needs the unrolled layers; build the model with scan_layers=False (unstack_layers converts the parameters)")


def _stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose every parameter is the L blocks' parameters stacked on a new leading axis."""
    splits = [nnx.split(b) for b in blocks]
    return nnx.merge(splits[0][0], jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in splits)))


def stack_layers(params: dict) -> dict:
    """Unrolled parameters (a pure dict, `layers` keyed 0..L-1) -> the scanned layout (`layers` holding [L, ...] arrays)."""
    layers = params["layers"]
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *(layers[i] for i in range(len(layers))))}


def unstack_layers(params: dict) -> dict:
    """The scanned layout -> unrolled parameters, `layers` keyed 0..L-1."""
    count = jax.tree.leaves(params["layers"])[0].shape[0]
    return {**params, "layers": {i: jax.tree.map(lambda x: x[i], params["layers"]) for i in range(count)}}

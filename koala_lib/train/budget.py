"""Compute and memory budgets: FLOPs per token, device peaks for MFU, and bytes per device before allocating.

    useful_flops(llama_cfg, tokens, attention_pairs)     # forward + backward of a batch's real work (MFU)
    executed_dot_flops(llama_cfg, cfg.model, rows, seq_len, mesh)   # the matmuls a step runs (`koala plan`)
    peak_flops(jax.local_devices()[0], "bfloat16")      # FLOP/s of one device (a table for GPUs, measured on CPU)
    estimate_memory(llama_cfg, cfg.model, cfg.train, (1, 8, 1), seq_len)   # bytes per device, by part
    fit_message(...)                                    # None, or what to change when it will not fit

FLOPs follow the usual accounting (PaLM, appendix B): 6 per parameter per token for the matmuls (forward 2,
backward 4; the output head counted, the embedding lookup not), plus 12 · layers · heads · head size per
(query, key) pair for attention scores and values. MFU counts useful work: real tokens, and the causal pairs
within each packed example; padding, masked pairs and rematerialization are not counted.

The memory estimate models the step `fit` compiles (layers scanned, FSDP): the sharded state, one layer
gathered whole at a time, what each layer keeps for the backward pass under the remat policy, and the logits.
`koala plan` sets it beside what XLA allocates. With `train.method: lora` the state is the frozen base in the
compute dtype (sharded the same way) and the fp32 adapters with their AdamW moments (replicated); gradients are
the adapters' alone, so the peaks lose the unsharded weight gradients of full fine-tuning.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from koala_lib.model.presets import LlamaConfig



# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s and memory bandwidth in GB/s per device, from NVIDIA's data
# sheets, matched against `device_kind` in order (the first pattern found wins, so variants come before the base name).
# None: the device has no bf16 rate (V100's tensor cores do fp16), so MFU falls back to a measured matmul.
GPUS: tuple[tuple[str, float | None, float, str], ...] = (
    (r"H200 NVL", 835.0, 4800.0, "H200 NVL data sheet"),
    (r"H200", 989.0, 4800.0, "H200 SXM data sheet"),
    (r"H100 NVL", 835.0, 3900.0, "H100 NVL data sheet"),
    (r"H100 PCIe", 756.0, 2000.0, "H100 PCIe data sheet"),
    (r"H100", 989.0, 3350.0, "H100 SXM data sheet"),
    (r"A100.*80GB.*PCIe", 312.0, 1935.0, "A100 80GB PCIe data sheet"),
    (r"A100.*80GB", 312.0, 2039.0, "A100 80GB SXM data sheet"),
    (r"A100", 312.0, 1555.0, "A100 40GB data sheet"),
    (r"L40S", 362.0, 864.0, "L40S data sheet"),
    (r"L40\b", 181.0, 864.0, "L40 data sheet"),
    (r"L4\b", 121.0, 300.0, "L4 data sheet"),
    (r"A10G", None, 600.0, "A10G (AWS publishes no bf16 peak)"),
    (r"A10\b", 125.0, 600.0, "A10 data sheet"),
    (r"V100", None, 900.0, "V100 data sheet (no bf16 tensor cores)"),
)


def known_gpu(device_kind: str) -> tuple[float | None, float, str] | None:
    """(dense bf16 TFLOP/s or None, memory GB/s, source) of a known GPU, or None."""
    for pattern, tflops, bandwidth, source in GPUS:
        if re.search(pattern, device_kind, re.IGNORECASE):
            return tflops, bandwidth, source
    return None


def matmul_params(cfg: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token: every layer's projections and the output head."""
    h, d = cfg.hidden_size, cfg.head_size
    attn = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    return cfg.num_layers * (attn + 3 * h * cfg.intermediate_size) + cfg.vocab_size * h


def attention_pair_flops(cfg: LlamaConfig) -> float:
    """Training FLOPs per (query, key) pair over all layers: scores and values, forward (4 per head size) and backward (8)."""
    return 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_size


def useful_flops(cfg: LlamaConfig, tokens: float, attention_pairs: float, adapters: int | None = None) -> float:
    """Training FLOPs of the useful work in a batch: 6 per matmul parameter for every real (non-padding) token, and
    the attention over the causal pairs within each packed example (`attention_pairs` = sum over tokens of their
    position in the example + 1). Padding, masked pairs and rematerialization are not counted.

    LoRA (`adapters`: the adapter parameter count) needs no weight gradient of the frozen base: 4 per matmul
    parameter (forward, and the activations' gradient), and 6 per adapter parameter."""
    if adapters is None:
        return 6.0 * matmul_params(cfg) * tokens + attention_pair_flops(cfg) * attention_pairs
    return (4.0 * matmul_params(cfg) + 6.0 * adapters) * tokens + attention_pair_flops(cfg) * attention_pairs


def flops_per_token(cfg: LlamaConfig, seq_len: int, adapters: int | None = None) -> float:
    """Useful training FLOPs per token of one example filling a whole row of `seq_len` (causal attention)."""
    return useful_flops(cfg, seq_len, seq_len * (seq_len + 1) / 2, adapters) / seq_len


_MEASURED: dict[tuple[str, str], float] = {}


def measure_matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted n×n matmul on the default device (the best of `repeats`), cached per dtype."""
    key = (jax.default_backend(), dtype)
    if key not in _MEASURED:
        a = jnp.ones((n, n), dtype=dtype)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
        _MEASURED[key] = 2.0 * n**3 / best
    return _MEASURED[key]


def peak_flops(device: jax.Device, dtype: str, configured_tflops: float | None = None) -> tuple[float, str]:
    """(FLOP/s of one device, where the number comes from): the config, a known GPU's data sheet, or a measurement."""
    if configured_tflops:
        return configured_tflops * 1e12, "train.peak_tflops"
    known = known_gpu(device.device_kind) if device.platform == "gpu" else None
    if known and known[0]:
        return known[0] * 1e12, f"{device.device_kind}: dense bf16, {known[2]}"
    measured = measure_matmul_flops(dtype)
    per_device = measured / max(1, jax.local_device_count()) if device.platform == "cpu" else measured
    return per_device, f"measured {dtype} matmul on {device.device_kind}"


def memory_bandwidth(device: jax.Device) -> tuple[float, str]:
    """(bytes/s of one device's memory, source): a known GPU's data sheet, else a measured copy of 256 MiB."""
    known = known_gpu(device.device_kind) if device.platform == "gpu" else None
    if known:
        return known[1] * 1e9, f"{device.device_kind}: {known[2]}"
    x = jnp.ones((64 * 2**20,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best, f"measured read + write of 256 MiB on {device.device_kind}"


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one train step, by part. `arguments` are what the step is given (the state, donated and
    updated in place, and the batch). Of the temporaries, the gradient and every layer's saved activations are
    alive at the peak, together with the larger of the loss's buffers (`logits`) and one layer's backward
    (`layer`): the step's two high points. For LoRA the trained weights are the adapters: `optimizer` and `grads`
    are theirs, and `params` holds the frozen base (in the compute dtype) beside them."""

    params: float  # fp32 master weights, sharded (LoRA: the frozen base, sharded, + the fp32 adapters, replicated)
    optimizer: float  # AdamW's two moments of the trained weights
    batch: float  # the step's token ids, masks, segments and positions
    grads: float  # the trained weights' gradient (two with accumulation: the running sum and a micro-batch's)
    activations: float  # what every layer keeps for the backward pass, per the remat policy
    logits: float  # at the loss: the output head gathered whole, fp32 logits and their gradient, the head's gradient
    layer: float  # in one layer's backward: its weights gathered whole, their gradient, its recomputed activations

    @property
    def arguments(self) -> float:
        return self.params + self.optimizer + self.batch

    @property
    def temporaries(self) -> float:
        return self.grads + self.activations + max(self.logits, self.layer)

    @property
    def total(self) -> float:
        return self.arguments + self.temporaries

    def parts(self) -> dict[str, float]:
        return {**self.__dict__, "arguments": self.arguments, "temporaries": self.temporaries, "total": self.total}

    def table(self) -> dict[str, float]:
        return {k: round(v / 2**30, 3) for k, v in self.parts().items()}


def _bytes(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


def layer_params(cfg: LlamaConfig) -> int:
    h, d = cfg.hidden_size, cfg.head_size
    return h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * h * cfg.intermediate_size + 2 * h


def attention_keys(seq_len: int, attention: str) -> float:
    """Keys per query the attention scores: all T for one `xla` call, the causal blocks' share when the model cuts
    the queries into 4 blocks (rows of 128+ tokens, see `Attention.causal_blocks`), about half for `cudnn`."""
    if attention == "cudnn":
        return seq_len / 2
    return seq_len * (10 / 16 if seq_len >= 128 else 1.0)


# A layer recomputed in the backward pass holds about 85 % of what it keeps without remat at its high point: XLA
# fuses its masks and elementwise chains into their consumers (measured with `koala plan` on XLA's CPU compiler,
# debug and SmolLM2-135M, every remat policy).
RECOMPUTED_SHARE = 0.85


def estimate_memory(cfg: LlamaConfig, model_cfg, train_cfg, mesh: tuple[int, int, int], seq_len: int) -> MemoryEstimate:
    """Bytes per device of a train step of `train_cfg.batch_size` rows of `seq_len` on a (data, fsdp, tensor) mesh."""
    from .residuals import layer_residual_bytes

    if train_cfg.method == "lora":
        return _lora_memory(cfg, model_cfg, train_cfg, mesh, seq_len)
    data, fsdp, tensor = mesh
    n, p, c = cfg.params_count(), _bytes(model_cfg.param_dtype), _bytes(model_cfg.dtype)
    shards = fsdp * tensor
    accum = train_cfg.grad_accum
    rows = max(1, train_cfg.batch_size // accum // (data * fsdp))  # rows per device per micro-batch
    tokens = rows * seq_len
    copy = c if c != p else 0  # a gathered weight's compute-dtype copy
    saved, weight_copies = layer_residual_bytes(cfg, model_cfg.dtype, model_cfg.remat, rows, seq_len, model_cfg.attention)
    saved = saved / tensor + weight_copies / shards
    recomputed = 0.0 if model_cfg.remat == "none" else layer_residual_bytes(cfg, model_cfg.dtype, "none", rows, seq_len, model_cfg.attention)[0] / tensor
    per_layer = layer_params(cfg) / tensor
    head = cfg.vocab_size * cfg.hidden_size / tensor
    logits = 4 * tokens * cfg.vocab_size / tensor  # one fp32 [tokens, V] array
    return MemoryEstimate(
        params=n * p / shards,
        optimizer=2 * n * p / shards,
        batch=4 * 4 * accum * rows * seq_len,
        grads=(2 if accum > 1 else 1) * n * 4 / shards,
        activations=cfg.num_layers * saved,
        logits=head * (p + copy) + max(2 * logits, logits + 4 * head),  # then the head's unsharded gradient
        layer=per_layer * (p + copy + 4) + RECOMPUTED_SHARE * recomputed,
    )


def _lora_memory(cfg: LlamaConfig, model_cfg, train_cfg, mesh: tuple[int, int, int], seq_len: int) -> MemoryEstimate:
    """`estimate_memory` of a LoRA step: the base frozen in the compute dtype, the adapters trained.

    A frozen weight gets no gradient and no moments, and being stored in the compute dtype needs no cast for its
    matmuls; it is still gathered whole, one layer (and the head) at a time, for the forward and for the gradient
    of the activations. Each layer keeps what the traced LoRA block keeps (`residuals.layer_residual_bytes`)."""
    from .residuals import layer_residual_bytes, lora_adapters

    data, fsdp, tensor = mesh
    c = _bytes(model_cfg.dtype)
    shards = fsdp * tensor
    accum = train_cfg.grad_accum
    rows = max(1, train_cfg.batch_size // accum // (data * fsdp))
    tokens = rows * seq_len
    lora = train_cfg.lora
    adapters = lora_adapters(cfg, lora.rank, tuple(lora.targets))
    a = adapters.count * 4  # fp32 adapters, replicated on every device

    def kept(adapted, remat):  # (activations, adapter casts) per device of a layer with these adapted projections
        saved, copies = layer_residual_bytes(cfg, model_cfg.dtype, remat, rows, seq_len, model_cfg.attention, (lora.rank, adapted))
        return saved / tensor, copies

    traced = [kept(adapted, model_cfg.remat) if adapted is not None else (0.0, 0.0) for adapted in adapters.layers]
    backward = [(adapted, n) for adapted, n in zip(adapters.layers, adapters.layer_params) if adapted is not None]
    per_layer = layer_params(cfg) / tensor
    layer = 0.0
    if backward:  # one layer's backward: its frozen weights gathered, its adapters' gradient, its activations again
        recomputed = 0.0 if model_cfg.remat == "none" else max(kept(adapted, "none")[0] for adapted, _ in backward)
        layer = per_layer * c + 4 * max(n for _, n in backward) + RECOMPUTED_SHARE * recomputed
    head = cfg.vocab_size * cfg.hidden_size / tensor
    logits = 4 * tokens * cfg.vocab_size / tensor  # one fp32 [tokens, V] array
    return MemoryEstimate(
        params=cfg.params_count() * c / shards + a,
        optimizer=2 * a,
        batch=4 * 4 * accum * rows * seq_len,
        grads=(2 if accum > 1 else 1) * a,
        activations=sum(saved + copies for saved, copies in traced),
        logits=head * c + 2 * logits + 4 * adapters.other,  # no gradient of the head, bar an adapter's
        layer=layer,
    )


def executed_dot_flops(cfg: LlamaConfig, model_cfg, rows: int, seq_len: int, mesh: tuple[int, int, int], train_cfg=None) -> float:
    """FLOPs of the matmuls a train step of `rows` x `seq_len` runs, over all devices: every position (padding too),
    attention as computed (causal blocks for `xla`), and the forward matmuls that rematerialization runs again.

    With a LoRA `train_cfg` the frozen weights' gradients are never computed (4 FLOPs per weight per token, not
    6), and each adapter costs 6 per parameter per token, plus its forward again under `remat: full`."""
    tokens = rows * seq_len
    per_layer_mm = layer_params(cfg) - 2 * cfg.hidden_size
    keys = attention_keys(seq_len, model_cfg.attention) or seq_len / 2  # cudnn: its causal kernel skips masked blocks
    attn_fwd = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_size * tokens * keys
    lora = train_cfg is not None and train_cfg.method == "lora"
    adapters = 0
    if lora:
        from .residuals import lora_adapters

        adapters = lora_adapters(cfg, train_cfg.lora.rank, tuple(train_cfg.lora.targets)).count
    total = (4.0 if lora else 6.0) * matmul_params(cfg) * tokens + 6.0 * adapters * tokens + 3 * attn_fwd
    if model_cfg.remat == "full":  # the forward again, but for down_proj, whose output the backward never reads
        total += 2.0 * cfg.num_layers * (per_layer_mm - cfg.hidden_size * cfg.intermediate_size) * tokens + attn_fwd
        total += 2.0 * adapters * tokens
    elif model_cfg.remat == "dots_no_batch":
        total += attn_fwd
    return total


MARGIN = 0.9  # the estimate must fit in this share of what JAX may use: room for fragmentation and XLA's own buffers


def allocator_fraction() -> tuple[float, str]:
    """(share of a GPU's memory JAX's allocator may use, why): XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default, or all
    of it with XLA_PYTHON_CLIENT_ALLOCATOR=platform."""
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform":
        return 1.0, "XLA_PYTHON_CLIENT_ALLOCATOR=platform"
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if value:
        return float(value), f"XLA_PYTHON_CLIENT_MEM_FRACTION={value}"
    return 0.75, "JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION 0.75"


def device_memory(configured_gb: float | None) -> tuple[float, str]:
    """(bytes one device lets JAX use, where the number comes from)."""
    if configured_gb:
        fraction, why = allocator_fraction()
        return configured_gb * 2**30 * fraction, f"{fraction:.0%} of train.device_memory_gb={configured_gb:g}: {why}"
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"the limit {device.device_kind} reports to JAX (its allocator's share of the card)"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host / max(1, jax.local_device_count()), "host memory shared by the local devices"


def fit_message(cfg: LlamaConfig, model_cfg, train_cfg, mesh: tuple[int, int, int], seq_len: int, limit: float, source: str) -> str | None:
    """None when the estimate fits in MARGIN of `limit`; else a message with the estimate and changes that help."""
    est = estimate_memory(cfg, model_cfg, train_cfg, mesh, seq_len)
    budget = MARGIN * limit
    if est.total <= budget:
        return None
    gib = 2**30
    tips = []
    from dataclasses import replace

    if model_cfg.remat != "full":
        alt = estimate_memory(cfg, replace(model_cfg, remat="full"), train_cfg, mesh, seq_len).total
        tips.append(f"model.remat=full ({alt / gib:.1f} GiB)")
    micro = train_cfg.batch_size // train_cfg.grad_accum
    if micro // (mesh[0] * mesh[1]) > 1 and train_cfg.batch_size % (train_cfg.grad_accum * 2) == 0:
        alt = estimate_memory(cfg, model_cfg, replace(train_cfg, grad_accum=train_cfg.grad_accum * 2), mesh, seq_len).total
        tips.append(f"train.grad_accum={train_cfg.grad_accum * 2} ({alt / gib:.1f} GiB)")
    if mesh[0] > 1:
        alt = estimate_memory(cfg, model_cfg, train_cfg, (1, mesh[0] * mesh[1], mesh[2]), seq_len).total
        tips.append(f"train.mesh=1,{mesh[0] * mesh[1]},{mesh[2]} ({alt / gib:.1f} GiB)")
    if model_cfg.dtype != "bfloat16":
        alt = estimate_memory(cfg, replace(model_cfg, dtype="bfloat16"), train_cfg, mesh, seq_len).total
        tips.append(f"model.dtype=bfloat16 ({alt / gib:.1f} GiB)")
    fraction = allocator_fraction()[0]
    if fraction < 0.95 and est.total <= MARGIN * limit / fraction * 0.95:  # the same card, more of it for JAX
        tips.append(f"XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 in the environment ({MARGIN * limit / fraction * 0.95 / gib:.1f} GiB allowed)")
    if train_cfg.method == "full" and model_cfg.init == "pretrained":  # last: another experiment, if often the one that fits
        alt = estimate_memory(cfg, model_cfg, replace(train_cfg, method="lora"), mesh, seq_len).total
        tips.append(f"train.method=lora ({alt / gib:.1f} GiB)")
    parts = ", ".join(f"{k} {v:.1f}" for k, v in est.table().items() if k not in ("arguments", "temporaries", "total"))
    return (f"the run needs about {est.total / gib:.1f} GiB per device ({parts} GiB) but the check allows {budget / gib:.1f} GiB: "
            f"{MARGIN:.0%} of {limit / gib:.1f} GiB ({source}); try {' or '.join(tips) if tips else 'more devices'}, or set train.memory_check=warn to go on")

"""Compute and memory budgets: FLOPs per token, device peaks for MFU, and bytes per device before allocating.

    flops_per_token(llama_cfg, seq_len)                  # forward + backward, per trained position
    peak_flops(jax.local_devices()[0], "bfloat16")      # FLOP/s of one device (a table for GPUs, measured on CPU)
    estimate = estimate_memory(llama_cfg, cfg, (1, 8, 1)); check_fit(estimate, cfg, ...)

FLOPs follow the usual accounting (PaLM, appendix B): 6 per parameter per token for the matmuls (forward 2,
backward 4; the output head counted, the embedding lookup not), plus 12 · layers · T · heads · head size per
token for attention scores and values over the full row length T. Rematerialization is not counted: MFU
measures useful work.
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


def useful_flops(cfg: LlamaConfig, tokens: float, attention_pairs: float) -> float:
    """Training FLOPs of the useful work in a batch: 6 per matmul parameter for every real (non-padding) token, and
    the attention over the causal pairs within each packed example (`attention_pairs` = sum over tokens of their
    position in the example + 1). Padding, masked pairs and rematerialization are not counted."""
    return 6.0 * matmul_params(cfg) * tokens + attention_pair_flops(cfg) * attention_pairs


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Useful training FLOPs per token of one example filling a whole row of `seq_len` (causal attention)."""
    return useful_flops(cfg, seq_len, seq_len * (seq_len + 1) / 2) / seq_len


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
    """Bytes per device."""

    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def table(self) -> dict[str, float]:
        gib = 2**30
        return {k: round(v / gib, 3) for k, v in {**self.__dict__, "total": self.total}.items()}


def _bytes(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize


def activation_bytes_per_token(cfg: LlamaConfig, remat: str, compute_bytes: int, seq_len: int, attention: str, tensor: int) -> float:
    """Bytes kept per token for the backward pass, over all layers (one layer's full set when recomputing)."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    heads = (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_size / tensor  # q, k, v, attention output
    scores = 0 if attention == "cudnn" else 2 * cfg.num_heads * seq_len / tensor  # scores and probabilities (xla)
    layer_all = compute_bytes * (6 * d + heads + 4 * i / tensor + scores)
    matmul_outputs = compute_bytes * (2 * d + heads + 2 * i / tensor)
    if remat == "none":
        return cfg.num_layers * layer_all
    if remat == "full":
        return cfg.num_layers * compute_bytes * d + layer_all
    return cfg.num_layers * matmul_outputs + layer_all  # dots, dots_no_batch


def estimate_memory(cfg: LlamaConfig, model_cfg, train_cfg, mesh: tuple[int, int, int], seq_len: int) -> MemoryEstimate:
    """Bytes per device for params, gradients, AdamW state and activations of one micro-batch."""
    data, fsdp, tensor = mesh
    n = cfg.params_count()
    p = _bytes(model_cfg.param_dtype)
    shards = fsdp * tensor
    rows = max(1, train_cfg.batch_size // train_cfg.grad_accum // (data * fsdp))  # rows per device per micro-batch
    tokens = rows * seq_len
    per_token = activation_bytes_per_token(cfg, model_cfg.remat, _bytes(model_cfg.dtype), seq_len, model_cfg.attention, tensor)
    logits = 3 * 4 * cfg.vocab_size / tensor  # fp32 logits, their softmax and its gradient
    return MemoryEstimate(params=n * p / shards, grads=n * p / shards, optimizer=2 * n * p / shards, activations=tokens * (per_token + logits))


def device_memory(configured_gb: float | None) -> tuple[float, str]:
    """(bytes of memory per device, where the number comes from)."""
    if configured_gb:
        return configured_gb * 2**30, "train.device_memory_gb"
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"{device.device_kind} reports"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host / max(1, jax.local_device_count()), "host memory shared by the local devices"


def fit_message(cfg: LlamaConfig, model_cfg, train_cfg, mesh: tuple[int, int, int], seq_len: int, limit: float, source: str) -> str | None:
    """None when the estimate fits in 90 % of `limit`; else a message with the estimate and changes that help."""
    est = estimate_memory(cfg, model_cfg, train_cfg, mesh, seq_len)
    budget = 0.9 * limit
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
    parts = ", ".join(f"{k} {v:.1f}" for k, v in est.table().items() if k != "total")
    return (f"the run needs about {est.total / gib:.1f} GiB per device ({parts} GiB) but a device has {limit / gib:.1f} GiB "
            f"({source}); try {' or '.join(tips) if tips else 'more devices'}, or set train.memory_check=warn to go on")

"""One command that checks the kit on a GPU: training MFU, memory plan vs real, KV-cache decoding against the memory
roofline, and the numerics of bf16 compute and cuDNN attention.

    python bench/gpu_check.py --out DIR          # a 1.2B LLaMA at seq 2048 on the local GPU(s); < 8 min on one H100/H200
    python bench/gpu_check.py --tiny --out DIR   # the same code on the `debug` model at seq 128 (automatic on a CPU)

Writes DIR/gpu_check.json, one object: `settings`, `environment` and one entry per part (`train`, `memory`,
`decode`, `numerics`), rewritten after every part so a run cut short keeps what it measured; a part that fails
holds {"error": "..."} and the others still run. DIR/gpu_check.log holds everything printed (tracebacks too).
Weights are random (the kit's own init from a fixed jax.random seed); nothing is read or downloaded.

1. train: the kit's train step (bench/train_gpu.py's `build_step`: packed rows, bf16 compute over fp32 AdamW,
   cudnn attention, remat, fsdp over the local devices, layers scanned where the kit's `Llama` has `scan_layers`
   unless --unrolled); MFU from `budget.useful_flops` over real tokens and the causal pairs within each packed
   example, and from the older full-row count for reference.
2. memory: the compiled step's `memory_analysis()` against `budget.estimate_memory` and the device's own peak.
3. decode: greedy tokens/s with the KV cache (`Llama.extend` on the fused model) at batch 1 and 64, against the
   roofline of (weights + KV cache read per step) / `budget.memory_bandwidth`.
4. numerics: log-softmax of one packed batch, bf16 compute vs fp32 (highest matmul precision), and cudnn vs xla
   attention in bf16 (GPU only).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_gpu import ONE_B, build_step, time_steps  # noqa: E402
from workload import batch_work, packed_batch  # noqa: E402


@dataclass(frozen=True)
class Settings:
    tiny: bool
    arch: dict
    length: int
    rows_per_device: int
    steps: int
    remat: str
    attention: str  # for training and the bf16 side of the numerics
    dtype: str = "bfloat16"  # compute dtype everywhere (parameters fp32, except decoding's)
    prompt: int = 16
    new_tokens: int = 128
    decode_batches: tuple[int, ...] = (1, 64)
    numerics_rows: int = 2
    scan_layers: bool = False  # the train step's layers run by lax.scan (decoding and numerics: unrolled)


def settings(tiny: bool, backend: str, rows: int | None, remat: str, unrolled: bool = False) -> Settings:
    attention = "cudnn" if backend == "gpu" else "xla"
    scan = not unrolled  # as `fit` trains (train.scan_layers); decoding and numerics use unrolled layers
    if tiny:
        from koala_lib.model.presets import preset

        return Settings(True, asdict(preset("debug")), 128, rows or 2, 3, remat, attention, prompt=8, new_tokens=16, scan_layers=scan)
    # 8 rows x 2048 per device: about 36 GiB by the kit's estimate with dots_no_batch, well inside an 80 GB card.
    return Settings(False, dict(ONE_B), 2048, rows or 8, 20, remat, attention, scan_layers=scan)


def train_kwargs(s: Settings) -> dict:
    return {"remat": s.remat, "attention": s.attention, "dtype": s.dtype, **({"scan_layers": True} if s.scan_layers else {})}


def llama_config(s: Settings):
    from koala_lib.model.presets import LlamaConfig

    return LlamaConfig(**s.arch)


# ----------------------------------------------------------------------------- 1. training step MFU


def train_part(s: Settings, ctx: dict, log) -> dict:
    import jax

    from koala_lib.train.budget import peak_flops

    arch = llama_config(s)
    built = ctx["built"] = build_step(arch, s.rows_per_device, s.length, **train_kwargs(s))
    log(f"train: compiled in {built['compile_s']:.1f} s; timing {s.steps} steps")
    built["state"], stats, seconds = time_steps(built["step"], built["state"], built["batch"], s.steps)
    work, n = batch_work(arch, built["host"]), built["devices"]
    peak, source = peak_flops(jax.local_devices()[0], "bfloat16")
    rows, length = built["host"]["tokens"].shape
    return {"params": arch.params_count(), "devices": n, "rows": rows, "length": length, "remat": s.remat, "attention": s.attention,
            "scan_layers": s.scan_layers,
            "step_s": seconds, "tokens": work["tokens"], "tokens_per_s": work["tokens"] / seconds,
            "mfu": work["useful_flops"] / seconds / (peak * n), "mfu_full_row": work["full_row_flops"] / seconds / (peak * n),
            "useful_flops": work["useful_flops"], "full_row_flops": work["full_row_flops"], "attention_pairs": work["attention_pairs"],
            "peak_flops_per_device": peak, "peak_source": source, "compile_s": built["compile_s"], "loss": float(stats["loss"])}


# ----------------------------------------------------------------------------- 2. memory: plan vs real


def memory_part(s: Settings, ctx: dict, log) -> dict:
    import jax

    from koala_lib.config import ModelConfig, TrainConfig
    from koala_lib.train.budget import estimate_memory

    built = ctx.get("built")
    if built is None:  # the train part failed after all: compile the step again for its plan (the device peak is moot)
        built = build_step(llama_config(s), s.rows_per_device, s.length, **train_kwargs(s))
    m = built["step"].memory_analysis()
    compiled = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    planned = compiled["argument"] + compiled["output"] - compiled["alias"] + compiled["temp"]
    n = built["devices"]
    model_cfg = ModelConfig(dtype=s.dtype, param_dtype="float32", attention=s.attention, remat=s.remat)
    estimate = estimate_memory(llama_config(s), model_cfg, TrainConfig(batch_size=s.rows_per_device * n), (1, n, 1), s.length)
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    device_peak = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
    return {"compiled_bytes": compiled, "compiled_peak_bytes": planned, "estimate_bytes": estimate.total,
            "estimate_gib": estimate.table(), "estimate_over_compiled": estimate.total / planned,
            "device_peak_bytes": device_peak, "device_peak_over_compiled": device_peak / planned if device_peak else None,
            "fits_80gb": max(planned, device_peak or 0) < 80e9 * 0.95}


# ----------------------------------------------------------------------------- 3. decoding with the KV cache


def decode_part(s: Settings, ctx: dict, log) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from koala_lib.model.llama import Llama
    from koala_lib.train.budget import memory_bandwidth

    arch, dtype = llama_config(s), jnp.dtype(s.dtype)
    model = Llama(arch, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(1)).fused()  # weights held in the compute dtype
    graphdef, weights = nnx.split(model)
    slots = s.prompt + s.new_tokens
    bandwidth, source = memory_bandwidth(jax.local_devices()[0])
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    table = arch.vocab_size * arch.hidden_size * dtype.itemsize  # an untied embedding: only the batch's rows are read

    @jax.jit
    def prefill(weights, prompt, cache):
        b, p = prompt.shape
        positions, valid = jnp.broadcast_to(jnp.arange(p), (b, p)), jnp.ones((b, slots), bool)
        logits, cache = nnx.merge(graphdef, weights).extend(prompt, positions, valid, cache, 0, last_only=True)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    @jax.jit
    def decode(weights, token, cache):  # new_tokens greedy steps from slot `prompt` on, in one lax loop
        m, b = nnx.merge(graphdef, weights), token.shape[0]
        valid = jnp.ones((b, slots), bool)  # causality hides the slots not yet written

        def one(carry, i):
            token, cache = carry
            index = s.prompt + i
            logits, cache = m.extend(token[:, None], jnp.full((b, 1), index), valid, cache, index, last_only=True)
            return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache), token

        (_, cache), tokens = jax.lax.scan(one, (token, cache), jnp.arange(s.new_tokens))
        return tokens, cache

    out = {"dtype": s.dtype, "prompt": s.prompt, "new_tokens": s.new_tokens, "slots": slots,
           "bandwidth_bytes_per_s": bandwidth, "bandwidth_source": source}
    for b in s.decode_batches:
        prompt = jax.random.randint(jax.random.key(b), (b, s.prompt), 0, arch.vocab_size, dtype=jnp.int32)
        token, cache = prefill(weights, prompt, model.init_cache(b, slots))
        jax.block_until_ready(decode(weights, token, cache))  # compile and warm up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(decode(weights, token, cache))
            best = min(best, time.perf_counter() - start)
        kv_read = sum(k.nbytes + v.nbytes for k, v in cache)  # every slot is read each step (masked ones too)
        step_bytes = param_bytes - (0 if arch.tie_word_embeddings else table) + b * arch.hidden_size * dtype.itemsize + kv_read
        roofline = b * bandwidth / step_bytes
        rate = b * s.new_tokens / best
        out[f"batch_{b}"] = {"tokens_per_s": rate, "step_ms": best / s.new_tokens * 1e3, "bytes_per_step": step_bytes,
                             "kv_cache_bytes": kv_read, "roofline_tokens_per_s": roofline, "roofline_fraction": rate / roofline}
        log(f"decode: batch {b}: {rate:,.0f} tokens/s, {rate / roofline:.1%} of the roofline")
        del cache
    return out


# ----------------------------------------------------------------------------- 4. numerics


def compare(a, b) -> dict:
    """Stats of two log-softmax arrays [B, T, V] (a against the reference b)."""
    import jax.numpy as jnp

    diff = jnp.abs(a - b)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def numerics_part(s: Settings, ctx: dict, log) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from koala_lib.model.llama import Llama

    arch = llama_config(s)
    weights = nnx.state(Llama(arch, param_dtype=jnp.float32, rngs=nnx.Rngs(2)))
    host = packed_batch(s.numerics_rows, s.length, arch.vocab_size, seed=1)
    batch = [jnp.asarray(host[k]) for k in ("tokens", "positions", "segment_ids")]

    def log_probs(dtype: str, attention: str, precision: str | None = None):
        """The same weights under another compute dtype / attention (a graphdef of an abstract model, merged)."""
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(arch, dtype=jnp.dtype(dtype), attention=attention, rngs=nnx.Rngs(0))))
        forward = jax.jit(lambda w, *batch: jax.nn.log_softmax(nnx.merge(graphdef, w)(*batch), axis=-1))
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            return forward(weights, *batch)

    reference = log_probs("float32", "xla", "highest")
    top2 = jax.lax.top_k(reference, 2)[0]
    low = log_probs(s.dtype, s.attention)
    out = {"rows": s.numerics_rows, "length": s.length, "segments_per_row": int(host["segment_ids"].max()),
           "fp32_matmul_precision": "highest", "fp32_mean_top2_margin": float((top2[..., 0] - top2[..., 1]).mean()),
           "bf16_vs_fp32": {"attention": s.attention, **compare(low, reference)}}
    if s.attention == "cudnn":
        out["cudnn_vs_xla"] = {"dtype": s.dtype, **compare(low, log_probs(s.dtype, "xla"))}
    else:
        out["cudnn_vs_xla"] = {"skipped": f"cuDNN attention needs a GPU (backend {jax.default_backend()})"}
    return out


# ----------------------------------------------------------------------------- the run


class Log:
    """Prints a line and appends it to the log file at once (a run cut short keeps its log)."""

    def __init__(self, path: Path):
        self.file = path.open("w", encoding="utf-8")

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def environment() -> dict:
    import jax
    from importlib import metadata

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = jax.local_devices()[0]
    return {"backend": jax.default_backend(), "device_kind": device.device_kind, "local_devices": jax.local_device_count(),
            "platform_version": getattr(device.client, "platform_version", None), "python": platform.python_version(),
            "versions": versions}


def summary(result: dict) -> list[str]:
    """One readable line per part."""
    gib = 2**30

    def decode(r):
        return "; ".join(f"batch {k[6:]}: {v['tokens_per_s']:,.0f} tokens/s ({v['roofline_fraction']:.0%} of roofline)"
                         for k, v in r.items() if k.startswith("batch_"))

    def numerics(r):
        low, att = r["bf16_vs_fp32"], r["cudnn_vs_xla"]
        return (f"bf16 vs fp32: max {low['max_abs_diff']:.3g}, mean {low['mean_abs_diff']:.2g}, argmax {low['argmax_agreement']:.1%}; "
                + ("cudnn vs xla skipped" if "skipped" in att else
                   f"cudnn vs xla: max {att['max_abs_diff']:.3g}, argmax {att['argmax_agreement']:.1%}"))

    text = {
        "train": lambda r: (f"{r['tokens_per_s']:,.0f} tokens/s, step {r['step_s'] * 1e3:.0f} ms, MFU {r['mfu']:.1%} "
                            f"(full-row count {r['mfu_full_row']:.1%}), loss {r['loss']:.3f}"),
        "memory": lambda r: (f"compiled peak {r['compiled_peak_bytes'] / gib:.2f} GiB, kit estimate {r['estimate_bytes'] / gib:.2f} GiB, "
                             "device peak " + (f"{r['device_peak_bytes'] / gib:.2f} GiB" if r["device_peak_bytes"] else "n/a")),
        "decode": decode,
        "numerics": numerics,
    }
    lines = []
    for name, r in result.items():
        if name in text:
            try:
                lines.append(f"{name:9s} " + (f"ERROR {r['error']}" if "error" in r else text[name](r)))
            except Exception as error:  # noqa: BLE001
                lines.append(f"{name:9s} (no summary: {type(error).__name__}: {error})")
    return lines


PARTS = (("train", train_part), ("memory", memory_part), ("decode", decode_part), ("numerics", numerics_part))


def run_parts(s: Settings, parts, result: dict, out: Path, log) -> dict:
    """Each part in turn, its result (or its error) written to out/gpu_check.json as soon as it ends."""
    started, ctx = time.perf_counter(), {}
    for name, part in parts:
        if name == "decode":
            ctx.clear()  # free the training state before the other models
            gc.collect()
        start = time.perf_counter()
        log(f"== {name}")
        try:
            result[name] = part(s, ctx, log)
        except Exception as error:  # noqa: BLE001 (one part's failure is recorded; the others still run)
            log(traceback.format_exc())
            result[name] = {"error": f"{type(error).__name__}: {error}"}
        result[name]["seconds"] = round(time.perf_counter() - start, 2)
        log(f"{name} done in {result[name]['seconds']:.1f} s")
        result.pop("total_s", None)
        result["total_s"] = round(time.perf_counter() - started, 2)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    log("")
    for line in summary(result):
        log(line)
    log(f"total {result['total_s']:.0f} s; wrote {out / 'gpu_check.json'}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--tiny", action="store_true", help="the debug model at seq 128 (the default on a CPU)")
    parser.add_argument("--rows", type=int, help="packed rows per device for the train step (default 8; 2 tiny)")
    parser.add_argument("--remat", default="dots_no_batch", choices=("full", "dots_no_batch"))
    parser.add_argument("--unrolled", action="store_true", help="train with unrolled layers even where the kit can scan them")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_check.log")
    import jax

    s = settings(args.tiny or jax.default_backend() == "cpu", jax.default_backend(), args.rows, args.remat, args.unrolled)
    result = {"settings": asdict(s), "environment": environment()}
    env = result["environment"]
    log(f"gpu_check: {env['local_devices']} x {env['device_kind']} ({env['backend']}), "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    log("settings: " + json.dumps(result["settings"]))
    run_parts(s, PARTS, result, args.out, log)
    if not s.tiny:  # a real GPU run: its summary goes to bench/RESULTS.md and the README's performance table
        from results import record_section

        lines = [f"{env['local_devices']} x {env['device_kind']}, jax {env['versions'].get('jax')}; settings: {json.dumps(result['settings'])}", "",
                 *(f"- {line}" for line in summary(result))]
        train = result.get("train", {})
        headline = [(f"one {env['device_kind']} check (`bench/gpu_check.py`): train MFU of a 1.2B LLaMA, seq 2048, bf16, cudnn",
                     f"MFU {train['mfu']:.1%}, {train['tokens_per_s']:,.0f} tokens/s" if "mfu" in train else "failed: see RESULTS.md")]
        record_section("gpu_check", "One GPU check (bench/gpu_check.py)", lines, headline)


if __name__ == "__main__":
    main()

"""Stage 3: fine-tune one variant on its packed rows, on a device mesh, resumable from orbax checkpoints.

    result = fit(cfg, "koala_distill")     # runs/<P>/train/koala_distill/{metrics.jsonl, checkpoints/, hf/}

A run that finds a checkpoint in its folder continues from it: params, AdamW state, step and RNG are restored,
and the data position follows from the step, so an interrupted run ends exactly where an uninterrupted one
would. Checkpoints are written by orbax into a temporary folder and renamed when complete; a kill leaves the
last complete one. metrics.jsonl gets one line per logged step, flushed as it is written.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from koala_lib.config import Config, check_variants, variant_name
from koala_lib.manifest import stale_inputs, warn_stale, write_manifest
from koala_lib.model.checkpoints import abstract_model, load_hf, model_config, param_path, resolve_checkpoint, save_hf
from koala_lib.model.llama import Llama
from koala_lib.model.presets import LlamaConfig
from koala_lib.model.sharding import LLAMA_RULES, make_mesh, match_rules, mesh_shape, path_str
from koala_lib.progress import bar as progress_bar

from . import DoesNotFit
from .budget import device_memory, fit_message, flops_per_token, peak_flops, useful_flops
from .curves import TensorBoardCurves
from .fingerprints import StepLog
from .data import BATCH_SPEC, VariantData
from .state import StateLayout, base_kwargs
from .step import make_eval_step, make_train_step, weights


@dataclass
class TrainResult:
    variant: str
    out_dir: Path
    steps: int
    resumed_from: int | None
    summary: dict


def init_distributed(cfg: Config) -> None:
    """Join a multi-process run (once per process) when the profile asks for one."""
    d = cfg.train.distributed
    if not (d.coordinator or d.auto) or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes (GPUs use NCCL)
    if d.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(d.coordinator, num_processes=d.num_processes, process_id=d.process_id)


def profile_model(cfg: Config) -> tuple[LlamaConfig, Path | None]:
    """(architecture, base folder or None for a random init) of the profile's model."""
    return model_config(cfg.model.init, cfg.model.preset, cfg.model.base, tokenizer_vocab(cfg))


def tokenizer_vocab(cfg: Config) -> int:
    """The vocabulary size the packed token ids come from (stage 2's tokenizer)."""
    from koala_lib.conditioning.template import load_tokenizer

    return len(load_tokenizer(cfg))


def build_model(cfg: Config, arch: LlamaConfig, folder: Path | None, mesh) -> Llama:
    """The base model with each parameter placed on its shards as it is read (or initialized); for LoRA in the
    compute dtype (the frozen base is never updated, so it needs no fp32 master copy)."""
    kwargs = base_kwargs(cfg)
    abstract = nnx.to_pure_dict(nnx.split(abstract_model(arch, **kwargs), nnx.Param, ...)[1])
    specs = {path_str(path): spec for path, spec in jax.tree_util.tree_flatten_with_path(
        match_rules(LLAMA_RULES, abstract), is_leaf=lambda x: isinstance(x, P))[0]}
    if folder is not None:
        return load_hf(folder, sharding=lambda name: NamedSharding(mesh, specs[param_path(name)]), **kwargs)
    graphdef, params, rest = nnx.split(Llama(arch, rngs=nnx.Rngs(cfg.seed), **kwargs), nnx.Param, ...)

    def place(path, x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, NamedSharding(mesh, specs[path_str(path)]), lambda i: host[i])

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(place, nnx.to_pure_dict(params)), rest)


def memory_gb() -> float:
    """Peak memory in GiB: the device's peak on accelerators, the process's peak RSS on CPU."""
    stats = jax.local_devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _manager(folder: Path, keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(folder.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _resume_metrics(path: Path, step: int | None) -> None:
    """Keep the rows of a per-step JSONL (metrics.jsonl, steps.jsonl) up to the restored step (a fresh run starts an
    empty file)."""
    if jax.process_index() != 0:
        return
    kept = []
    if step is not None and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def fit(cfg: Config, variant: str, progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Fine-tune `variant` (a mixture name) and write `runs/<P>/train/<variant>/`; resumes from its last checkpoint."""
    import orbax.checkpoint as ocp

    init_distributed(cfg)
    check_variants(replace(cfg, train=replace(cfg.train, variants=(variant,))))
    started = time.time()
    stale = stale_inputs(cfg, "conditioned", ["conditioned"])
    if jax.process_index() == 0:
        warn_stale(f"training {variant}", "stage 2 (conditioned/)", stale)
    t = cfg.train
    name = variant_name(variant)
    out_dir = cfg.run_dir / "train" / name
    mesh = make_mesh(t.mesh)
    shape = mesh_shape(t.mesh, jax.device_count())
    if (t.batch_size // t.grad_accum) % (shape[0] * shape[1]):
        raise ValueError(f"train.batch_size / grad_accum = {t.batch_size // t.grad_accum} rows per micro-batch do not divide over data x fsdp = {shape[0] * shape[1]} devices")
    data = VariantData.open(cfg, variant)
    total = data.total_steps(t.max_steps)
    arch, folder = profile_model(cfg)
    layout = StateLayout.build(cfg, arch, mesh, total)  # shapes only; checks the LoRA targets

    if t.memory_check != "off":
        limit, source = device_memory(t.device_memory_gb)
        message = fit_message(arch, cfg.model, t, shape, data.seq_len, limit, source)
        if message and t.memory_check == "error":
            raise DoesNotFit(message)
        if message:
            print(f"warning: {message}")

    state = layout.init(nnx.to_pure_dict(nnx.split(build_model(cfg, arch, folder, mesh), nnx.Param, ...)[1]), cfg.seed)
    state_shardings = layout.shardings
    meta = {"variant": name, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "seq_len": data.seq_len,
            "total_steps": total, "rows": [data.rows(e) for e in range(len(data.epochs))], "seed": cfg.seed,
            "scan_layers": t.scan_layers, "method": t.method,
            "lora": {"rank": t.lora.rank, "alpha": t.lora.alpha, "targets": list(t.lora.targets)} if t.method == "lora" else None}
    older = {"scan_layers": False, "method": "full"}  # what a run from before these settings used

    manager = _manager(out_dir / "checkpoints", t.keep_checkpoints)
    resumed = manager.latest_step()
    if resumed is not None:
        saved = manager.restore(resumed, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved = {k: saved.get(k, older.get(k)) for k in meta}
        if saved != meta:
            changed = ", ".join(f"{k}: {saved.get(k)} -> {meta[k]}" for k in meta if saved.get(k) != meta[k])
            back = f" or set train.scan_layers={str(saved['scan_layers']).lower()}" if saved["scan_layers"] != meta["scan_layers"] else ""
            raise ValueError(f"{out_dir / 'checkpoints'} holds a run with other settings ({changed}); delete it{back} or use another runs_dir")
        restored = manager.restore(resumed, args=ocp.args.Composite(state=ocp.args.StandardRestore(layout.checkpointed(layout.abstract()))))
        kept = layout.checkpointed(state)
        state = {**state, **jax.tree.unflatten(jax.tree.structure(kept), jax.tree.leaves(restored["state"]))}
    metrics_path = out_dir / "metrics.jsonl"
    _resume_metrics(metrics_path, resumed)
    _resume_metrics(out_dir / "steps.jsonl", resumed)

    batch_sharding = NamedSharding(mesh, BATCH_SPEC)
    train_step = make_train_step(layout.graphdef, layout.rest, layout.tx, layout.schedule, state_shardings, batch_sharding)
    eval_step = make_eval_step(layout.graphdef, layout.rest, weights(state_shardings), batch_sharding)
    peak, peak_source = peak_flops(jax.devices()[0], cfg.model.dtype, t.peak_tflops)
    flops = flops_per_token(arch, data.seq_len, layout.adapter_count)
    writer = open(metrics_path, "a", encoding="utf-8") if jax.process_index() == 0 else None
    curves = TensorBoardCurves(out_dir / "tensorboard") if writer else None
    steps_log = StepLog(out_dir / "steps.jsonl") if writer else None

    def log(row: dict) -> None:
        if writer:
            writer.write(json.dumps(row) + "\n")
            writer.flush()
            curves.log(row)

    def evaluate(step: int) -> float | None:
        sums = np.zeros(3)
        for batch in data.eval_batches(mesh, t.eval_rows):
            sums += np.array([float(x) for x in eval_step(weights(state), batch)])
        if not sums[2]:  # the variant's sources have no held-out example: no eval loss, rather than a 0
            log({"step": step, "eval_targets": 0})
            return None
        eval_loss = sums[0] / sums[2]
        log({"step": step, "eval_loss": round(eval_loss, 6), "eval_accuracy": round(sums[1] / sums[2], 6), "eval_targets": int(sums[2])})
        return eval_loss

    start = int(resumed or 0)
    compile_s = 0.0
    if start < total:  # compile ahead, so that step times are step times
        tick = time.perf_counter()
        train_step = train_step.lower(state, data.global_batch(start, mesh)).compile()
        compile_s = time.perf_counter() - tick
    first_loss = last = None
    eval_loss = None
    if start == 0:
        evaluate(0)  # the base model's eval loss, the point the curve starts from
    bar = progress_bar(total=total, initial=start, desc=f"train {name}", unit="step", disable=not progress or jax.process_index() != 0)
    began = time.perf_counter()
    try:
        for step in range(start, total):
            batch = data.global_batch(step, mesh)
            tick = time.perf_counter()
            state, stats = train_step(state, batch)
            stats = {k: float(v) for k, v in jax.device_get(stats).items()}  # waits for the step
            if steps_log:
                steps_log.write(step + 1, data.step_rows(step), stats)
            seconds = time.perf_counter() - tick
            epoch, _ = data.position(step)
            positions = t.batch_size * data.seq_len
            row = {"step": step + 1, "epoch": epoch, "loss": round(stats["loss"], 6), "accuracy": round(stats["accuracy"], 6),
                   "lr": stats["lr"], "grad_norm": round(stats["grad_norm"], 6), "targets": int(stats["targets"]),
                   "seconds": round(seconds, 4), "tokens_per_s": round(positions / seconds, 1),
                   "mfu": round(useful_flops(arch, stats["tokens"], stats["attention_pairs"], layout.adapter_count) / seconds / (peak * jax.device_count()), 5), "memory_gb": round(memory_gb(), 3)}
            first_loss = row["loss"] if first_loss is None else first_loss
            last = row
            if (step + 1) % t.log_every == 0 or step + 1 == total:
                log(row)
            bar.set_postfix_str(f"loss {row['loss']:.3f}, {row['tokens_per_s']:.0f} tok/s", refresh=False)  # shown by update
            bar.update(1)
            if on_step:
                on_step(step + 1, row)
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < total:
                evaluate(step + 1)
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == total:
                manager.save(step + 1, args=ocp.args.Composite(state=ocp.args.StandardSave(layout.checkpointed(state)), meta=ocp.args.JsonSave({**meta, "step": step + 1, "epoch": epoch})))
        if start < total:
            eval_loss = evaluate(total)
        else:  # already complete: the eval of the finished run
            rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()] if writer else []
            eval_loss = next((r["eval_loss"] for r in reversed(rows) if "eval_loss" in r), None)
        manager.wait_until_finished()
    finally:
        bar.close()
        if writer:
            writer.close()
            curves.close()
            steps_log.close()
        manager.close()
    seconds = time.perf_counter() - began
    if t.export_hf:
        export(cfg, layout.model(state), folder, out_dir / "hf")
        if layout.lora:
            export_adapter(cfg, layout.adapter(state), arch.num_layers, out_dir / "adapter")
    summary = {"variant": name, "steps": total, "resumed_from": resumed, "first_loss": first_loss,
               "final_loss": last["loss"] if last else None, "final_eval_loss": None if eval_loss is None else round(float(eval_loss), 6),
               "seconds": round(seconds, 2), "compile_seconds": round(compile_s, 2),
               "mesh": list(shape), "devices": jax.device_count(), "processes": jax.process_count(),
               "flops_per_token": flops, "peak_flops_per_device": peak, "peak_source": peak_source,
               "method": t.method, "trained_params": layout.adapter_count or arch.params_count()}
    if jax.process_index() == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        # the checkpoints are orbax's own layout and the run's largest files: the manifest hashes what later stages read
        write_manifest(cfg, f"train/{name}", out_dir, inputs=[cfg.run_dir / "conditioned", *([folder] if folder else [])],
                       outputs=[out_dir / "hf", out_dir / "adapter", out_dir / "rows", metrics_path, out_dir / "steps.jsonl", out_dir / "summary.json"],
                       started=started, stale=stale, extra={"variant": variant})
        print(f"trained {name}: {total - start} steps in {seconds:.1f} s; loss {first_loss} -> {summary['final_loss']}, eval loss {eval_loss} -> {out_dir}")
    return TrainResult(name, out_dir, total, resumed, summary)


def export(cfg: Config, model: Llama, base_folder: Path | None, out: Path) -> None:
    """The fine-tuned params (host arrays gathered from every process: `StateLayout.model`) as a Hugging Face folder,
    written by process 0."""
    if jax.process_index() == 0:
        from koala_lib.conditioning.template import load_tokenizer

        tokenizer_dir = base_folder
        if tokenizer_dir is None:  # a random init: the profile's tokenizer
            tokenizer = load_tokenizer(cfg)
            tokenizer_dir = Path(tokenizer.name_or_path)
        save_hf(model, out, tokenizer_from=tokenizer_dir)


def export_adapter(cfg: Config, adapters: dict, num_layers: int, out: Path) -> None:
    """A LoRA run's adapters alone (host arrays: `StateLayout.adapter`), in PEFT's layout (`adapter_config.json`,
    `adapter_model.safetensors`), written by process 0."""
    from koala_lib.model.peft import save_adapter

    if jax.process_index() == 0:
        lora = cfg.train.lora
        base = cfg.model.base
        if base == "default" or Path(base).expanduser().is_dir():  # a local folder: its absolute path, which PEFT can load
            base = str(resolve_checkpoint(base).resolve())
        save_adapter(adapters, out, rank=lora.rank, alpha=lora.alpha, base_model=base, num_layers=num_layers)

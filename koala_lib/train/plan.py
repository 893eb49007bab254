"""`koala plan`: compile the profile's sharded train step before renting a GPU, and set XLA's memory and FLOPs
beside the kit's estimate.

    plans = plan([cfg])            # a subprocess with as many virtual CPU devices as the mesh needs
    print(plans[0].text())         # per device: arguments, temporaries, peak; FLOPs per step

The step is the one `fit` runs (same `StateLayout`, same `make_train_step`), lowered from abstract arrays only
(`jax.ShapeDtypeStruct`s carrying the rule table's shardings), so nothing is allocated and a 13B model plans on
a laptop. XLA's CPU compiler stands in for the GPU's, which differs in three ways the table states:
`cudnn` attention cannot compile on a CPU, so the plan compiles `xla` attention (it keeps [heads, T, T] scores
the fused kernel never writes); a CPU computes bf16 matmuls in fp32, so bf16 runs hold fp32 copies of each
gathered layer and its matmul inputs; and XLA's GPU scheduler and rematerialization pass, which work to a
memory limit, are not run. A LoRA run's frozen bf16 base is the extreme case: a CPU cannot slice a bf16 array
natively, so XLA converts each stacked [L, ...] weight to fp32 once, outside the layer loop, and holds that copy
(4 bytes per frozen parameter) for the whole step; a GPU slices bf16 as it is. The table shows XLA's peak with
and without that copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from koala_lib.config import Config

GIB = 2**30


@dataclass
class StepPlan:
    profile: str
    architecture: str  # where the model's shape came from
    parameters: int
    mesh: tuple[int, int, int]
    rows_per_device: int  # per micro-batch
    grad_accum: int
    seq_len: int
    dtype: str
    remat: str
    attention: str  # as compiled (xla on a CPU)
    profile_attention: str  # as the profile sets it (what `fit` checks on its devices)
    scan_layers: bool
    compile_seconds: float
    xla: dict  # bytes per device: arguments, outputs, aliased, temporaries, peak
    estimate: dict  # bytes per device, by part, and total
    estimate_profile: float  # the kit's total for the profile's own attention (cudnn on a GPU)
    xla_dot_flops: float  # per device per step, every matmul XLA runs (rematerialized ones included)
    kit_dot_flops: float  # the kit's count of the same
    useful_flops: float  # per device per step, the model FLOPs MFU counts (full rows, causal)
    cpu_upcast: float = 0.0  # bytes per device: the fp32 copy of a frozen bf16 base that only a CPU compile holds

    def fits(self, card_gib: float, fraction: float = 0.75) -> tuple[bool, bool]:
        """(the estimate for the profile's own attention passes `fit`'s check, XLA's CPU peak fits) on a card of `card_gib`
        of which JAX may use `fraction`."""
        from .budget import MARGIN

        usable = card_gib * GIB * fraction
        return self.estimate_profile <= MARGIN * usable, self.xla["peak"] - self.cpu_upcast <= usable

    def text(self) -> str:
        d, f, t = self.mesh
        unit, size = ("GiB", GIB) if self.xla["peak"] >= GIB / 4 else ("MiB", 2**20)
        count = f"{self.parameters / 1e9:.2f}B" if self.parameters >= 1e9 else f"{self.parameters / 1e6:.1f}M"
        lines = [
            f"{self.profile}: {count} parameters ({self.architecture}), mesh {d},{f},{t}, "
            f"{self.rows_per_device} row(s) x {self.seq_len} tokens per device per micro-batch, grad_accum {self.grad_accum}, "
            f"{self.dtype} matmuls, remat {self.remat}, {'scanned' if self.scan_layers else 'unrolled'} layers, "
            f"{self.attention} attention; compiled on {d * f * t} virtual CPU device{'s' if d * f * t > 1 else ''} in {self.compile_seconds:.1f} s",
            f"{unit + ' per device':<34}{'kit estimate':>14}{'XLA (CPU)':>12}",
            f"{'arguments (state, batch)':<34}{self.estimate['arguments'] / size:>14.2f}{self.xla['arguments'] / size:>12.2f}",
            f"{'temporaries':<34}{self.estimate['temporaries'] / size:>14.2f}{self.xla['temporaries'] / size:>12.2f}",
            f"{'peak':<34}{self.estimate['total'] / size:>14.2f}{self.xla['peak'] / size:>12.2f}",
            *([f"{'peak less the CPU fp32 copy':<34}{'':>14}{(self.xla['peak'] - self.cpu_upcast) / size:>12.2f}"
               f"   (the frozen bf16 base converted once, {self.cpu_upcast / size:.2f} {unit}: a CPU compile only)"] if self.cpu_upcast else []),
            f"{'TFLOP per device per step':<34}{self.kit_dot_flops / 1e12:>14.3f}{self.xla_dot_flops / 1e12:>12.3f}"
            f"   (matmuls run, remat included; useful: {self.useful_flops / 1e12:.3f})",
        ]
        parts = ", ".join(f"{k} {v / size:.2f}" for k, v in self.estimate.items() if k not in ("arguments", "temporaries", "total"))
        lines.append(f"estimate by part ({unit}): {parts}")
        if self.estimate_profile != self.estimate["total"]:
            lines.append(f"with the profile's {self.profile_attention} attention (not compiled on a CPU) the estimate is {self.estimate_profile / size:.2f} {unit}")
        from .budget import MARGIN, allocator_fraction

        fraction, why = allocator_fraction()
        for card in (40, 80):
            for share, reason in dict.fromkeys([(fraction, why), (max(fraction, 0.95), "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95")]):
                est, xla = self.fits(card, share)
                peak = "XLA's CPU peak less its fp32 copy" if self.cpu_upcast else "XLA's CPU peak"
                lines.append(f"{card} GB card, JAX may use {share:.0%} ({reason}): the estimate {'passes' if est else 'fails'} the check "
                             f"({MARGIN:.0%} of {card * share:.1f} GiB); {peak} {'fits' if xla else 'does not fit'}")
                if est:
                    break
        return "\n".join(lines)


def architecture(cfg: Config):
    """(LlamaConfig, where it came from), as `fit` would build it: the base's config.json when the base is on this
    machine, or `model.preset` (for a random init with the tokenizer's vocabulary, as stage 2 tokenized)."""
    from koala_lib.model.presets import from_hf_config, preset

    base = cfg.model.base
    if cfg.model.init == "random":
        from .loop import tokenizer_vocab

        try:
            return preset(cfg.model.preset).replace(vocab_size=tokenizer_vocab(cfg)), f"model.preset {cfg.model.preset}, the tokenizer's vocabulary"
        except (OSError, ValueError) as exc:  # the tokenizer is not on this machine
            return preset(cfg.model.preset), f"model.preset {cfg.model.preset} (its own vocabulary: the tokenizer is not here, {exc})"
    folder = None
    if base == "default":
        from koala_lib.model.gguf_default import default_model_dir

        folder = default_model_dir()
    elif Path(base).expanduser().is_dir():
        folder = Path(base).expanduser()
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "config.json")
        folder = Path(cached).parent if isinstance(cached, str) else None
    if folder is not None:
        name = "the embedded SmolLM2-135M" if base == "default" else base
        return from_hf_config(json.loads((folder / "config.json").read_text())), f"{name} config.json"
    return preset(cfg.model.preset), f"model.preset {cfg.model.preset}; {base} is not on this machine"


def compile_step(cfg: Config) -> StepPlan:
    """Lower and compile `cfg`'s train step on this process's devices (as many as the mesh needs)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from koala_lib.model.sharding import make_mesh, mesh_shape

    from .budget import estimate_memory, executed_dot_flops, useful_flops
    from .data import BATCH_SPEC, FIELDS
    from .hlo import dot_flops
    from .state import StateLayout
    from .step import make_train_step

    profile_attention = cfg.model.attention
    if jax.default_backend() == "cpu" and cfg.model.attention != "xla":
        cfg = replace(cfg, model=replace(cfg.model, attention="xla"))
    arch, source = architecture(cfg)
    t, seq = cfg.train, cfg.conditioning.seq_len
    mesh = make_mesh(t.mesh)
    shape = mesh_shape(t.mesh, jax.device_count())
    layout = StateLayout.build(cfg, arch, mesh, total_steps=max(2, t.max_steps or 1000))
    batch_sharding = NamedSharding(mesh, BATCH_SPEC)
    micro = t.batch_size // t.grad_accum
    batch = {k: jax.ShapeDtypeStruct((t.grad_accum, micro, seq), jnp.int32, sharding=batch_sharding) for k in FIELDS}
    step = make_train_step(layout.graphdef, layout.rest, layout.tx, layout.schedule, layout.shardings, batch_sharding)
    start = time.perf_counter()
    compiled = step.lower(layout.abstract(), batch).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    xla = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
           "temporaries": m.temp_size_in_bytes}
    xla["peak"] = xla["arguments"] + xla["outputs"] - xla["aliased"] + xla["temporaries"]
    est = estimate_memory(arch, cfg.model, t, shape, seq)
    est_profile = estimate_memory(arch, replace(cfg.model, attention=profile_attention), t, shape, seq)
    devices = shape[0] * shape[1] * shape[2]
    rows = micro // (shape[0] * shape[1])
    return StepPlan(
        profile=cfg.profile, architecture=source, parameters=arch.params_count(), mesh=shape, rows_per_device=rows,
        grad_accum=t.grad_accum, seq_len=seq, dtype=cfg.model.dtype, remat=cfg.model.remat, attention=cfg.model.attention, profile_attention=profile_attention,
        scan_layers=t.scan_layers, compile_seconds=round(seconds, 2), xla=xla, estimate=est.parts(), estimate_profile=est_profile.total,
        xla_dot_flops=dot_flops(compiled.as_text()),
        kit_dot_flops=executed_dot_flops(arch, cfg.model, t.batch_size, seq, shape, t) / devices,
        useful_flops=useful_flops(arch, t.batch_size * seq, t.batch_size * seq * (seq + 1) / 2, layout.adapter_count) / devices,
        cpu_upcast=cpu_upcast(layout) if jax.default_backend() == "cpu" else 0.0,
    )


def cpu_upcast(layout) -> float:
    """Bytes per device of the fp32 copy XLA's CPU compiler makes of a LoRA run's frozen bf16 weights (see above)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not layout.lora:
        return 0.0
    shardings = jax.tree.leaves(layout.shardings["frozen"])
    return float(sum(4 * np.prod(s.shard_shape(x.shape)) for x, s in zip(jax.tree.leaves(layout.frozen), shardings) if x.dtype == jnp.bfloat16))


def plan(cfgs: list[Config], devices: int | None = None, timeout: float = 1800) -> list[StepPlan]:
    """Compile each config's train step in a subprocess with the virtual CPU devices its mesh needs (`devices`: what a
    -1 in `train.mesh` stands for; by default this machine's device count)."""
    from koala_lib.model.sharding import mesh_shape

    cfgs = list(cfgs)
    results: list[StepPlan | None] = [None] * len(cfgs)
    groups: dict[int, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        if "-1" in cfg.train.mesh.split(","):
            if devices is None:
                import jax

                devices = jax.device_count()  # the -1 of `1,-1,1`: this machine's devices, as `fit` would take
            cfgs[i] = cfg = replace(cfg, train=replace(cfg.train, mesh=",".join(map(str, mesh_shape(cfg.train.mesh, devices)))))
        n = math.prod(int(x) for x in cfg.train.mesh.split(","))
        groups.setdefault(n, []).append(i)
    for n, indices in groups.items():
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()}
        payload = json.dumps([dataclasses.asdict(cfgs[i]) for i in indices])
        done = subprocess.run([sys.executable, "-m", "koala_lib.train.plan"], input=payload, capture_output=True, text=True,
                              env=env, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"compiling the train step on {n} virtual devices failed:\n{done.stderr[-4000:]}")
        for i, row in zip(indices, json.loads(done.stdout.strip().splitlines()[-1])):
            row["mesh"] = tuple(row["mesh"])
            results[i] = StepPlan(**row)
    return results  # type: ignore[return-value]


def _main() -> None:
    from koala_lib.config import Config as C
    from koala_lib.typed_yaml import build

    cfgs = [build(C, raw, "") for raw in json.loads(sys.stdin.read())]
    print(json.dumps([dataclasses.asdict(compile_step(c)) for c in cfgs]))


if __name__ == "__main__":
    _main()

"""What stage 3 leaves behind, read back: metrics per variant, the loss-curves figure, a summary table.

    report = train_all(cfg)          # every variant of the profile, then the figure
    report.table(); report.figure(); report.metrics()
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from koala_lib.config import Config, check_variants, variant_name
from koala_lib.plots import loss_curves, save

from .loop import TrainResult, fit


def read_metrics(cfg: Config, variant: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of `runs/<P>/train/<variant>/metrics.jsonl`."""
    path = cfg.run_dir / "train" / variant_name(variant) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; run `koala train --profile {cfg.profile}` first")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


@dataclass
class TrainReport:
    cfg: Config
    variants: tuple[str, ...]
    results: list[TrainResult] = field(default_factory=list)

    def curves(self) -> dict[str, tuple[list[dict], list[dict]]]:
        return {variant_name(v): read_metrics(self.cfg, v) for v in self.variants}

    def figure(self):
        return loss_curves(self.curves())

    def table(self):
        """One row per variant: steps, losses at the start and the end, eval loss, throughput (a DataFrame)."""
        import pandas as pd

        rows = []
        for name, (train, evals) in self.curves().items():
            timed = [r for r in train if r["step"] > 1] or train
            rows.append({
                "variant": name,
                "steps": train[-1]["step"],
                "first loss": train[0]["loss"],
                "last loss": train[-1]["loss"],
                "first eval loss": evals[0]["eval_loss"] if evals else None,
                "last eval loss": evals[-1]["eval_loss"] if evals else None,
                "tokens/s": round(sum(r["tokens_per_s"] for r in timed) / len(timed)),
            })
        return pd.DataFrame(rows).set_index("variant")

    def metrics(self) -> dict:
        out = {}
        for name, (train, evals) in self.curves().items():
            out[name] = {
                "steps": train[-1]["step"],
                "first_loss": train[0]["loss"],
                "last_loss": train[-1]["loss"],
                "eval_losses": [r["eval_loss"] for r in evals],
                "targets": sum(r["targets"] for r in train),
            }
        return out


def train_all(cfg: Config, variants: list[str] | None = None, progress: bool = True) -> TrainReport:
    """Fine-tune each variant in turn (each resumes if interrupted), then save the loss-curves figure."""
    check_variants(cfg)
    report = TrainReport(cfg, tuple(variants or cfg.variants))
    for variant in report.variants:
        report.results.append(fit(cfg, variant, progress=progress))
    import jax

    if jax.process_index() == 0:
        save(report.figure(), cfg.figures_path / "loss_curves.png")
    return report


def budget_table(cfg: Config):
    """Before training: the model, the mesh, bytes per device by kind, and FLOPs per token (a DataFrame)."""
    import jax
    import pandas as pd

    from koala_lib.model.sharding import mesh_shape

    from .budget import device_memory, estimate_memory, flops_per_token
    from .loop import init_distributed, profile_model

    init_distributed(cfg)
    arch, _ = profile_model(cfg)
    shape = mesh_shape(cfg.train.mesh, jax.device_count())
    est = estimate_memory(arch, cfg.model, cfg.train, shape, cfg.conditioning.seq_len).table()
    limit, source = device_memory(cfg.train.device_memory_gb)
    adapters = None
    if cfg.train.method == "lora":
        from .residuals import lora_adapters

        adapters = lora_adapters(arch, cfg.train.lora.rank, tuple(cfg.train.lora.targets)).count
    rows = {
        "parameters": f"{arch.params_count():,}" + ("" if adapters is None else f" ({adapters:,} trained: LoRA adapters)"),
        "mesh (data, fsdp, tensor)": str(shape),
        **{f"{k} (GiB per device)": v for k, v in est.items()},
        "device memory (GiB)": f"{limit / 2**30:.1f} ({source})",
        "training GFLOP per token": f"{flops_per_token(arch, cfg.conditioning.seq_len, adapters) / 1e9:.3f}",
        "remat": str(cfg.model.remat),
    }
    return pd.DataFrame({"value": rows})


def plan_table(cfg: Config):
    """The train step compiled on virtual CPU devices (`koala plan`): the kit's estimate beside XLA's figures (a DataFrame)."""
    import pandas as pd

    from .plan import plan

    p = plan([cfg])[0]
    gib = 2**30
    rows = {
        "arguments: state and batch (GiB per device)": (p.estimate["arguments"] / gib, p.xla["arguments"] / gib),
        "temporaries (GiB per device)": (p.estimate["temporaries"] / gib, p.xla["temporaries"] / gib),
        "peak (GiB per device)": (p.estimate["total"] / gib, p.xla["peak"] / gib),
        "matmul TFLOP per device per step": (p.kit_dot_flops / 1e12, p.xla_dot_flops / 1e12),
    }
    if p.cpu_upcast:  # a LoRA run's frozen bf16 base, converted to fp32 by XLA's CPU compiler only (see `plan`)
        rows["peak less the CPU-only fp32 copy of the frozen base (GiB per device)"] = (float("nan"), (p.xla["peak"] - p.cpu_upcast) / gib)
    table = pd.DataFrame(rows, index=["kit estimate", f"XLA ({p.mesh[0] * p.mesh[1] * p.mesh[2]} CPU devices)"]).T
    return table.round(4)


def checkpoints_table(cfg: Config, variants: tuple[str, ...] | None = None):
    """The orbax checkpoints, Hugging Face export and (LoRA) PEFT adapter each variant left (a DataFrame)."""
    import pandas as pd

    rows = []
    for variant in variants or cfg.variants:
        folder = cfg.run_dir / "train" / variant_name(variant)
        steps = sorted(int(p.name) for p in (folder / "checkpoints").iterdir() if p.name.isdigit()) if (folder / "checkpoints").is_dir() else []
        row = {"variant": variant_name(variant), "checkpoint steps": ", ".join(map(str, steps)),
               "hugging face export": "hf/" if (folder / "hf" / "config.json").is_file() else "-"}
        if cfg.train.method == "lora":
            row["PEFT adapter"] = "adapter/" if (folder / "adapter" / "adapter_config.json").is_file() else "-"
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")

"""Run the stage notebooks in order with papermill, each with the two parameters `profile` and `overrides`.

    run_pipeline("demo", stages=["01"])   # -> runs/demo/notebooks/01_data_curation.ipynb

An executed notebook is kept whether it passed or failed, so a failure can be opened in JupyterLab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from koala_lib.config import ConfigError, load, project_root

# (stage id, notebook file); later stages append here.
STAGES = [
    ("01", "01_data_curation.ipynb"),
    ("02", "02_marker_conditioning.ipynb"),
    ("03", "03_finetune.ipynb"),
    ("04", "04_inference.ipynb"),
    ("05", "05_evaluation.ipynb"),
]


class StageFailed(RuntimeError):
    """A notebook raised; the message names the stage, the cell's error and the executed notebook."""


@dataclass
class StageRun:
    stage: str
    notebook: Path
    seconds: float


def select_stages(stages: Sequence[str] | str | None) -> list[tuple[str, str]]:
    """Stages by id (`01,02`), in pipeline order; all when None."""
    if not stages:
        return list(STAGES)
    wanted = [s.strip().zfill(2) for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    known = {sid for sid, _ in STAGES}
    for sid in wanted:
        if sid not in known:
            raise ConfigError(f"--stages: unknown stage {sid!r} (available: {', '.join(sorted(known))})")
    return [(sid, nb) for sid, nb in STAGES if sid in wanted]


def run_pipeline(
    profile: str,
    overrides: Sequence[str] = (),
    stages: Sequence[str] | str | None = None,
    progress: bool = True,
) -> list[StageRun]:
    """Execute the selected notebooks into `runs/<profile>/notebooks/`; raise StageFailed on the first error."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    cfg = load(profile, overrides)  # fail fast on a bad profile, before starting a kernel
    selected = select_stages(stages)
    out_dir = cfg.run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    nb_dir = project_root() / "notebooks"
    runs: list[StageRun] = []
    for i, (sid, name) in enumerate(selected, start=1):
        src, dst = nb_dir / name, out_dir / name
        print(f"[{i}/{len(selected)}] stage {sid}: {name} (profile {profile})", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(src),
                str(dst),
                parameters={"profile": profile, "overrides": list(overrides)},
                cwd=str(nb_dir),
                progress_bar=progress,
                kernel_name="python3",
            )
        except PapermillExecutionError as exc:
            raise StageFailed(
                f"stage {sid} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
                f"executed notebook: {dst}"
            ) from None
        seconds = time.perf_counter() - start
        runs.append(StageRun(sid, dst, seconds))
        print(f"      done in {seconds:.1f} s -> {dst}", flush=True)
    return runs


def written_since(profile: str, overrides: Sequence[str], since: float) -> dict[str, list[Path]]:
    """The figures and metrics files the run wrote (modified at or after `since`, a time.time() value)."""
    cfg = load(profile, overrides)
    fresh = lambda paths: sorted(p for p in paths if p.is_file() and p.stat().st_mtime >= since)
    return {"figures": fresh(cfg.figures_path.glob("*.png")), "metrics": fresh(cfg.run_dir.glob("*/metrics.json")),
            "summaries": fresh([cfg.run_dir / "eval" / "summary.json"])}

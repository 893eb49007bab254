"""Run the stage notebooks in order with papermill, each with the two parameters `profile` and `overrides`.

    run_pipeline("demo", stages=["01"])   # -> runs/demo/notebooks/01_data_curation.ipynb

An executed notebook is kept whether it passed or failed, so a failure can be opened in JupyterLab.

Progress: the runner sets KOALA_PROGRESS for each stage's kernel to `<notebook stem>.progress.log` beside the
executed notebook, so the stage's bars (koala_lib/progress.py: training steps, answers, judged pairs, curation
rows) go there as plain lines instead of into the notebook's outputs. With `progress=True` a thread follows the
file and prints its new lines prefixed with the stage id, `  03 | train koala_all: 6/10 step ...`, above
papermill's cell bar (shown when stderr is a terminal); the log stays for a look after the run.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from koala_lib.config import ConfigError, load, project_root
from koala_lib.progress import ENV as PROGRESS_ENV

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
    cfg = load(profile, overrides)  # fail fast on a bad profile, before starting a kernel
    selected = select_stages(stages)
    out_dir = cfg.run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    nb_dir = project_root() / "notebooks"
    cell_bar = progress and sys.stderr.isatty()  # papermill's \r bar only where it redraws in place
    runs: list[StageRun] = []
    with tempfile.TemporaryDirectory(prefix="koala-kernel-") as sockets:
        for i, (sid, name) in enumerate(selected, start=1):
            runs.append(_run_stage(i, len(selected), sid, nb_dir / name, out_dir / name, profile, overrides, progress,
                                   cell_bar, _local_kernel(Path(sockets))))
            record_seconds(out_dir / "pipeline.json", sid, runs[-1].seconds)
    return runs


def record_seconds(path: Path, stage: str, seconds: float) -> None:
    """Keep each stage's wall time of its latest run in `notebooks/pipeline.json` ({stage id: seconds})."""
    import json

    from koala_lib.files import atomic_text

    times = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    times[stage] = round(seconds, 1)
    atomic_text(path, json.dumps(dict(sorted(times.items())), indent=2) + "\n")


def _local_kernel(folder: Path):
    """Kernel settings for a stage: its channels are Unix sockets in `folder` (private to this user), not TCP ports on
    loopback, so nothing else on the machine can reach the kernel and it has no plain-text transport to warn about."""
    from traitlets.config import Config

    settings = Config()
    settings.KernelManager.transport = "ipc"
    settings.KernelManager.ip = str(folder / "kernel")
    return settings


def _run_stage(i: int, total: int, sid: str, src: Path, dst: Path, profile: str, overrides: Sequence[str],
               progress: bool, cell_bar: bool, kernel) -> StageRun:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    log = dst.with_suffix(".progress.log")
    log.write_text("", encoding="utf-8")
    print(f"[{i}/{total}] stage {sid}: {src.name} (profile {profile})", flush=True)
    start = time.perf_counter()
    try:
        with _environ(PROGRESS_ENV, str(log)), (streaming(log, f"  {sid} | ") if progress else nullcontext()):
            papermill.execute_notebook(
                str(src),
                str(dst),
                parameters={"profile": profile, "overrides": list(overrides)},
                cwd=str(src.parent),
                progress_bar=cell_bar,
                kernel_name="python3",
                config=kernel,
            )
    except PapermillExecutionError as exc:
        raise StageFailed(
            f"stage {sid} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
            f"executed notebook: {dst}"
        ) from None
    seconds = time.perf_counter() - start
    print(f"      done in {seconds:.1f} s -> {dst}", flush=True)
    return StageRun(sid, dst, seconds)


def follow(path: Path, emit: Callable[[str], None], stop: threading.Event, poll: float = 0.25) -> None:
    """Call `emit` with each line appended to `path` until `stop` is set, then with the lines written before it.

    Lines are emitted whole (a line still being written waits for its newline, or for the end), stripped, and
    blank ones skipped; a carriage return ends a line too, so a bar that redraws in place reads as lines.
    """
    pending = b""
    with open(path, "rb") as fh:
        while True:
            last = stop.is_set()  # read once more after stop is seen: what was written before it is caught
            chunk = fh.read()
            if chunk:
                *lines, pending = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
                for line in lines:
                    _emit_line(emit, line)
            if last:
                break
            stop.wait(poll)
    _emit_line(emit, pending)


def _emit_line(emit: Callable[[str], None], raw: bytes) -> None:
    line = raw.decode("utf-8", errors="replace").strip()
    if line:
        emit(line)


def _print_line(line: str) -> None:
    """Print above papermill's cell bar (tqdm clears and redraws it) where it is shown, else plainly."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


@contextmanager
def streaming(path: Path, prefix: str, emit: Callable[[str], None] = _print_line, poll: float = 0.25) -> Iterator[None]:
    """Print the lines appended to `path` (prefixed) from a background thread while the block runs, and the rest after."""
    stop = threading.Event()
    thread = threading.Thread(target=follow, args=(path, lambda line: emit(prefix + line), stop, poll),
                              name=f"follow {Path(path).name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


@contextmanager
def _environ(key: str, value: str) -> Iterator[None]:
    """`os.environ[key] = value` inside the block (a kernel started in it inherits it), as before after."""
    before = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def written_since(profile: str, overrides: Sequence[str], since: float) -> dict[str, list[Path]]:
    """The figures and metrics files the run wrote (modified at or after `since`, a time.time() value)."""
    cfg = load(profile, overrides)
    fresh = lambda paths: sorted(p for p in paths if p.is_file() and p.stat().st_mtime >= since)
    return {"figures": fresh(cfg.figures_path.glob("*.png")), "metrics": fresh(cfg.run_dir.glob("*/metrics.json")),
            "summaries": fresh([cfg.run_dir / "eval" / "summary.json"])}

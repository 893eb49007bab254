"""The numbers each stage leaves for tests and notebooks: `runs/<profile>/<stage>/metrics.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class HasRunDir(Protocol):
    """A profile's Config, or anything else that names a run folder."""

    run_dir: Path


def write_metrics(cfg: HasRunDir, stage: str, metrics: dict) -> Path:
    """Write (atomically) and return the path of the stage's metrics file."""
    path = cfg.run_dir / stage / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_metrics(cfg: HasRunDir, stage: str) -> dict:
    return json.loads((cfg.run_dir / stage / "metrics.json").read_text(encoding="utf-8"))

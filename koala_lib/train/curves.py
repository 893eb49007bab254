"""Training curves where researchers look: TensorBoard event files beside each variant's metrics.jsonl.

    curves = TensorBoardCurves(out_dir / "tensorboard")
    curves.log({"step": 3, "loss": 2.11, "lr": 1e-4, ...})   # the rows fit() writes to metrics.jsonl
    curves.close()

`tensorboard --logdir runs/demo/train` shows every variant side by side. Event files are written with
tensorboardX (no TensorFlow); metrics.jsonl stays the record that tests and the report read. A resumed run
appends a new event file, and TensorBoard joins them by step.
"""

from __future__ import annotations

from pathlib import Path

# metrics.jsonl key -> TensorBoard tag
TAGS = {"loss": "train/loss", "accuracy": "train/accuracy", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
        "tokens_per_s": "speed/tokens_per_s", "mfu": "speed/mfu", "memory_gb": "speed/memory_gb",
        "eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy"}


class TensorBoardCurves:
    def __init__(self, folder: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder), flush_secs=5)

    def log(self, row: dict) -> None:
        """Every known scalar of a metrics row, at the row's optimizer step."""
        for key, tag in TAGS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, float(row[key]), global_step=int(row["step"]))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

"""Run every benchmark script in bench/ (each rewrites its section of RESULTS.md); train_gpu.py only with a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["curation.py", "conditioning.py", "model_forward.py", "train_step.py", "generate.py", "serve.py", "leakage.py"]

if __name__ == "__main__":
    import jax

    for script in SCRIPTS + (["train_gpu.py"] if jax.default_backend() == "gpu" else []):
        print(f"== bench/{script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], check=True)
    sys.path.insert(0, str(HERE))
    from results import update_readme

    update_readme()

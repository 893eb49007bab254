"""Run every benchmark script in bench/ (each rewrites its section of RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["curation.py", "conditioning.py", "model_forward.py"]

if __name__ == "__main__":
    for script in SCRIPTS:
        print(f"== bench/{script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], check=True)

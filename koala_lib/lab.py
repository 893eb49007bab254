"""`koala lab` (`make lab`): JupyterLab on the kit's notebooks, with the kit's own Python as the kernel.

    koala lab                  # http://localhost:8888/lab?token=... on this machine only
    koala lab --port 8890

Jupyter refuses to start as root unless told `--allow-root`; in a container or a cloud VM root is the usual
user, so the flag is added then (and said in one line), never otherwise. The server listens on loopback only:
from another machine, forward the port over SSH (`ssh -L 8888:localhost:8888 you@host`) rather than opening it
to the network.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from koala_lib.config import project_root

ROOT_NOTICE = "koala lab: running as root (usual in a container), so JupyterLab is started with --allow-root"


def lab_command(port: int = 8888, *, root: bool | None = None, notebook_dir: Path | None = None,
                browser: bool = True, extra: list[str] | None = None) -> list[str]:
    """The command line that starts JupyterLab on `notebook_dir` (default: the kit's notebooks/) at localhost:`port`,
    with `--allow-root` when `root` (default: whether this process runs as uid 0)."""
    root = (os.geteuid() == 0) if root is None else root
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.is_file():  # the environment's own jupyter, else whichever is on the PATH
        jupyter = Path(shutil.which("jupyter") or "jupyter")
    folder = notebook_dir or project_root() / "notebooks"
    command = [str(jupyter), "lab", f"--notebook-dir={folder}", "--ip=localhost", f"--port={port}"]
    command += ["--allow-root"] if root else []
    command += [] if browser else ["--no-browser"]
    return command + list(extra or [])


def run_lab(port: int = 8888, browser: bool = True) -> None:
    """Replace this process by JupyterLab (Ctrl-C stops it), after the one-line root notice when it applies."""
    command = lab_command(port, browser=browser)
    if not Path(command[0]).is_file():
        raise FileNotFoundError(f"{command[0]}: JupyterLab is not installed here; `make lab` installs it (pip install -e '.[lab]')")
    if "--allow-root" in command:
        print(ROOT_NOTICE, flush=True)
    os.execv(command[0], command)

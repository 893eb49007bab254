"""`make lab` / `koala lab`: JupyterLab on the notebooks, on localhost, with --allow-root only for root."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from koala_lib.config import project_root
from koala_lib.lab import ROOT_NOTICE, lab_command

JUPYTER = Path(sys.executable).with_name("jupyter")


def test_the_command_line_as_a_user_and_as_root():
    user = lab_command(8890, root=False)
    assert user == [str(JUPYTER), "lab", f"--notebook-dir={project_root() / 'notebooks'}", "--ip=localhost", "--port=8890"]
    root = lab_command(8890, root=True)
    assert root == [*user, "--allow-root"]
    assert "--ip=0.0.0.0" not in root and "--no-browser" in lab_command(root=False, browser=False)
    assert ROOT_NOTICE.startswith("koala lab: running as root") and "\n" not in ROOT_NOTICE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jupyterlab_starts_on_the_kits_kernel_and_answers_on_its_port(tmp_path):
    """A real start with the command line this process would use (as root here when the tests run as root, the
    case Jupyter refuses without --allow-root): the server answers, lists the notebooks and the python3 kernel
    of this very environment."""
    port, token = _free_port(), secrets.token_hex(8)
    command = lab_command(port, browser=False, extra=[f"--IdentityProvider.token={token}"])
    assert ("--allow-root" in command) == (os.geteuid() == 0)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://localhost:{port}/api/contents?token={token}", timeout=5) as reply:
                    answer = json.loads(reply.read())
                break
            except OSError:
                time.sleep(0.5)
        assert answer is not None, f"JupyterLab did not answer on port {port}: {proc.poll()=}"
        names = {item["name"] for item in answer["content"]}
        assert {"01_data_curation.ipynb", "05_evaluation.ipynb"} <= names
        with urllib.request.urlopen(f"http://localhost:{port}/api/kernelspecs?token={token}", timeout=10) as reply:
            specs = json.loads(reply.read())["kernelspecs"]
        # the notebooks' kernel, python3, is the native one: jupyter_client runs it with the server's own Python, and
        # the server is this environment's jupyter, so the kernel imports this very koala_lib
        assert specs["python3"]["spec"]["argv"][:3] == ["python", "-m", "ipykernel_launcher"] and command[0] == str(JUPYTER)
        auth = {"Authorization": f"token {token}"}
        start = urllib.request.Request(f"http://localhost:{port}/api/kernels", data=b'{"name": "python3"}', headers=auth, method="POST")
        with urllib.request.urlopen(start, timeout=60) as reply:
            kernel = json.loads(reply.read())
        assert kernel["name"] == "python3" and kernel["execution_state"] in ("starting", "idle")
        stop = urllib.request.Request(f"http://localhost:{port}/api/kernels/{kernel['id']}", headers=auth, method="DELETE")
        with urllib.request.urlopen(stop, timeout=60) as reply:
            assert reply.status == 204
        with urllib.request.urlopen(f"http://localhost:{port}/lab?token={token}", timeout=10) as reply:
            assert reply.status == 200 and "JupyterLab" in reply.read().decode()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

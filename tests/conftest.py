"""Shared fixtures: a config whose runs go to a temporary folder, the real upstream files when present, models,
servers and a browser, and a way to kill a run as a crash would."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from koala_lib import config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def make_cfg(tmp_path):
    """load(profile, overrides) with runs under tmp_path."""

    def make(profile: str = "smoke", *overrides: str) -> config.Config:
        return config.load(profile, [f"runs_dir={tmp_path / 'runs'}", f"figures_dir={tmp_path / 'figures'}", *overrides])

    return make


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real upstream files not found at {SHARED_DATA} (they sit beside the checkout in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_generator():
    """A Generator for the random `debug` model with the real SmolLM2 tokenizer (fast; the text is noise)."""
    from flax import nnx

    from koala_lib.conditioning.template import load_tokenizer
    from koala_lib.inference.generate import Generator
    from koala_lib.model.llama import Llama
    from koala_lib.model.presets import preset

    tokenizer = load_tokenizer(config.load("smoke"))
    model = Llama(preset("debug").replace(vocab_size=len(tokenizer)), rngs=nnx.Rngs(0))
    return Generator(model, tokenizer)


@pytest.fixture(scope="session")
def smollm2_generator():
    """A Generator for the default model (SmolLM2-135M-Instruct from the embedded GGUF, fp32); skipped without it."""
    from transformers import AutoTokenizer

    from koala_lib.inference.generate import Generator
    from koala_lib.model.checkpoints import load_hf, resolve_checkpoint

    try:
        folder = resolve_checkpoint("default")
    except FileNotFoundError as missing:
        pytest.skip(f"the default model is not installed: {missing}")
    return Generator(load_hf(folder), AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="session")
def tiny_server(tiny_generator):
    """`koala serve`'s app on the tiny model, on a free loopback port: yields (base URL, app).

    Model name `koala-debug`; no API key; moderation refuses the word `forbidden`."""
    from koala_lib.conditioning.template import template_for
    from koala_lib.inference.serve import create_app, serving, word_list

    template = template_for(config.load("smoke"), tiny_generator.tokenizer)
    app = create_app(tiny_generator, template, model_name="koala-debug", moderation=word_list(["forbidden"]), max_queue=64)
    with serving(app) as url:
        yield url, app


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def chromium():
    """Headless Debian Chromium through selenium, with a fresh profile; skipped where it is not installed."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="koala-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
        "--window-size=1100,900",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def kill_when_written():
    """kill(proc, path): wait (up to 300 s) until `path` exists, then SIGKILL the process, as a crash would."""
    import os
    import signal
    import time

    def kill(proc, path: Path) -> None:
        deadline = time.time() + 300
        while not path.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert path.exists(), proc.communicate()[0][-3000:] if proc.poll() is not None else f"{path} not written in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL

    return kill

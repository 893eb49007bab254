"""Shared fixtures: a config whose runs go to a temporary folder, and the real upstream files when present."""

from __future__ import annotations

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

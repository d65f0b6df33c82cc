"""Fixtures shared by the checkpoint tests."""

from __future__ import annotations

import pytest
import torch

from tests.support.checkpoints import run_script


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The resumable script's run, never interrupted: what every killed and resumed run must equal."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    done = run_script(str(directory / "ckpt"), str(directory / "out.pt"))
    assert done.returncode == 0, done.stderr
    return torch.load(directory / "out.pt", weights_only=True)

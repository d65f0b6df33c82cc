import os
import sys

import pytest

# The shared reference models and loops live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _no_trainloop_environment(monkeypatch):
    """Tests start without spawn's settings, whatever the shell that runs them has set."""
    for name in list(os.environ):
        if name.startswith("TRAINLOOP_"):
            monkeypatch.delenv(name)

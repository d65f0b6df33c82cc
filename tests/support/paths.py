"""Where things are: the repository, the scripts the tests launch, the stored test data."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tests" / "support" / "scripts"
DATA = REPO / "tests" / "support" / "data"

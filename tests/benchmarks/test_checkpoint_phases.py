"""`benchmarks/checkpoint.py --phases` times every phase of a background save and of a load, and
leaves the library as it was (its timing wrappers removed). Timings are never asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support.paths import REPO

PHASES = ("load: deserialize", "load: hash model.safetensors", "load: hash optimizer.pt",
          "load: read and verify, all of it", "load: fit to the run", "load: restore in place",
          "save: stage", "save: serialize\\+write\\+hash model.safetensors",
          "save: serialize\\+write\\+hash optimizer.pt", "save: fsync each file",
          "save: rename into place", "save: the writer thread, all of it")


def test_checkpoint_benchmark_phases_names_every_phase():
    done = subprocess.run([sys.executable, os.path.join("benchmarks", "checkpoint.py"), "--quick", "--phases"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "phases (median ms" in done.stdout, done.stdout
    for phase in PHASES:
        assert re.search(rf"^\s+{phase}.*\s[0-9.]+ ms$", done.stdout, re.MULTILINE), f"no {phase}:\n{done.stdout}"

"""benchmarks/memory.py runs to the end and prints its tables (figures are never asserted).

Only the build table runs here (two 2-rank jobs): the strategy table takes four more.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.paths import REPO


@pytest.mark.multiprocess
def test_memory_benchmark_quick_build_table():
    done = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "memory.py"), "--quick", "--tables", "builds"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    out = done.stdout
    assert re.search(r"^\s*whole\s+0(\s+[0-9.]+){4}\s+yes$", out, re.MULTILINE), out
    # meta-init is measured where prepare takes meta models, else skipped, saying so.
    assert re.search(r"^\s*meta-init\s+0\s+.*yes$", out, re.MULTILINE) or "meta-init: skipped" in out, out

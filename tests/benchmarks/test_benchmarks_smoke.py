"""The benchmarks run to the end and print their tables. Timings are never asserted: they
depend on the machine, and a benchmark that fails on a busy one is noise, not a signal."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support.paths import REPO


def test_overhead_benchmark_quick_run_prints_its_tables():
    done = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "overhead.py"), "--quick", "--profile"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    out = done.stdout
    assert re.search(r"^\s*accumulate\s+variant\s+us/step\s+vs raw\b", out, re.MULTILINE), out
    for accumulate in ("1", "4"):
        for variant in ("raw PyTorch", "trainloop"):
            row = rf"^\s*{accumulate}\s+{variant}\s+[0-9.]+\s+[0-9.]+x"
            assert re.search(row, out, re.MULTILINE), f"no {variant} row for accumulate {accumulate}:\n{out}"
    assert "import time on top of `import torch`" in out
    assert re.search(r"^\s*trainloop\s+[0-9.]+ ms$", out, re.MULTILINE), out
    # --profile (in the same process: no start-up of its own): calls per micro-step, then cProfile.
    for accumulate in ("1", "4"):
        for variant in ("trainloop", "trainloop \\+ JSONLines"):
            row = rf"^\s*{accumulate}\s+{variant}\s+[0-9.]+\s+\+[0-9.]+\s+[0-9.]+\s+\+[0-9.]+$"
            assert re.search(row, out, re.MULTILINE), f"no calls row for {variant}, accumulate {accumulate}:\n{out}"
    assert "-- by cumulative" in out and "-- by tottime" in out and "steps.py" in out, out

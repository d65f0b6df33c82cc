"""benchmarks/memory.py runs to the end and prints its tables.

The build table runs here at its quick size (two 2-rank jobs; the strategy table takes four
more), its figures not asserted. The cold table runs at the issue's size and its bound is
asserted: a memory bound, not a time, so a loaded machine does not move it.
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


@pytest.mark.multiprocess
def test_meta_init_and_load_peak_at_most_1_3_times_the_ranks_shard_as_the_os_counts_it():
    """Issue 20: meta-init + load_weights on 2 FSDP2 ranks of the 28M-parameter model (12 x 1536^2
    Linear blocks and a head, one safetensors file), cold: each rank's peak VmHWM and ru_maxrss
    above its post-init resident set <= 1.3x its shard bytes (was 1.40x: the whole tensor of
    each module's init held beside the shard, and a bool copy of it left in the heap)."""
    done = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "memory.py"), "--tables", "cold", "--linear",
         "--width", "1536", "--depth", "12"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    rows = re.findall(r"^\s+(\d)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)x\s+([0-9.]+)\s+([0-9.]+)x\s+(yes|NO)$",
                      done.stdout, re.MULTILINE)
    assert len(rows) == 2, done.stdout
    for _rank, shard, _hwm, hwm_ratio, _maxrss, maxrss_ratio, equal in rows:
        assert float(shard) > 50 and equal == "yes", done.stdout
        assert float(hwm_ratio) <= 1.3 and float(maxrss_ratio) <= 1.3, done.stdout

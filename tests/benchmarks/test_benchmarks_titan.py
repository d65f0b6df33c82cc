"""benchmarks/llama.py and benchmarks/activation_checkpointing.py run to the end at a tiny size and
print their tables. Timings are never asserted: they depend on the machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support import paths

REPO = str(paths.REPO)
NUMBER = r"[0-9.]+"


def run_quick(script: str) -> str:
    done = subprocess.run([sys.executable, os.path.join("benchmarks", script), "--quick"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def test_llama_benchmark_quick_run_prints_trainloop_beside_raw_pytorch():
    out = run_quick("llama.py")
    assert "FSDP2 + bf16 + activation checkpointing + per-block compile" in out, out
    for loop in ("trainloop", "raw PyTorch"):
        assert re.search(rf"^{loop}\s+{NUMBER}\s+{NUMBER}x\s+(n/a|{NUMBER}%)\s+(n/a|{NUMBER})$", out, re.MULTILINE), out


def test_activation_checkpointing_benchmark_quick_run_prints_every_variant():
    out = run_quick("activation_checkpointing.py")
    for variant in ("none", "every block", r"selective \(op\)", "every 2nd block"):
        assert re.search(rf"^{variant}\s+{NUMBER}\s+{NUMBER}x\s+{NUMBER}\s+{NUMBER}x$", out, re.MULTILINE), out

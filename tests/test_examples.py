"""The examples run as users run them, from a shell, and learn something."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCURACY_LINE = re.compile(r"^held-out accuracy: ([0-9.]+) \((\d+)/(\d+) images\)$", re.MULTILINE)
HELD_OUT_IMAGES = 360  # examples/digits.py holds out 360 of the 1797 images

pytest.importorskip("sklearn", reason="the digits example reads scikit-learn's bundled images")


def run_example(*command: str) -> str:
    done = subprocess.run([sys.executable, *command], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def test_digits_learns_on_one_process(tmp_path):
    out = run_example("examples/digits.py", "--epochs", "3", "--run-dir", str(tmp_path))
    found = ACCURACY_LINE.findall(out)
    assert len(found) == 1, out
    accuracy, correct, total = float(found[0][0]), int(found[0][1]), int(found[0][2])
    assert total == HELD_OUT_IMAGES and correct / total == pytest.approx(accuracy, abs=1e-4)
    assert accuracy > 0.7, out  # ~0.90 after 3 epochs; chance is 0.1


@pytest.mark.multiprocess
def test_digits_runs_unchanged_on_two_processes_and_counts_each_image_once(tmp_path):
    out = run_example("-m", "trainloop.spawn", "-n", "2", "examples/digits.py", "--epochs", "3",
                      "--run-dir", str(tmp_path))
    found = ACCURACY_LINE.findall(out)
    assert len(found) == 1, out  # only the main process prints
    accuracy, total = float(found[0][0]), int(found[0][2])
    assert total == HELD_OUT_IMAGES, out  # gather dropped the padding that sharding added
    assert accuracy > 0.5, out  # half the optimizer steps of one process: ~0.78 after 3 epochs

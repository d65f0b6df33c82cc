"""The examples run as users run them, from a shell, and learn something."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support.paths import REPO

pytestmark = pytest.mark.slow  # every example runs as users run it: a fresh process

ACCURACY_LINE = re.compile(r"^held-out accuracy: ([0-9.]+) \((\d+)/(\d+) images\)$", re.MULTILINE)
HELD_OUT_IMAGES = 360  # examples/digits.py holds out 360 of the 1797 images

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="the digits example reads scikit-learn's bundled images")


def run_example(*command: str) -> str:
    done = subprocess.run([sys.executable, *command], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@needs_sklearn
def test_digits_learns_on_one_process(tmp_path):
    out = run_example("examples/digits.py", "--epochs", "3", "--run-dir", str(tmp_path))
    found = ACCURACY_LINE.findall(out)
    assert len(found) == 1, out
    accuracy, correct, total = float(found[0][0]), int(found[0][1]), int(found[0][2])
    assert total == HELD_OUT_IMAGES and correct / total == pytest.approx(accuracy, abs=1e-4)
    assert accuracy > 0.7, out  # ~0.90 after 3 epochs; chance is 0.1


@needs_sklearn
@pytest.mark.multiprocess
def test_digits_runs_unchanged_on_two_processes_and_counts_each_image_once(tmp_path):
    out = run_example("-m", "trainloop.spawn", "-n", "2", "examples/digits.py", "--epochs", "3",
                      "--run-dir", str(tmp_path))
    found = ACCURACY_LINE.findall(out)
    assert len(found) == 1, out  # only the main process prints
    accuracy, total = float(found[0][0]), int(found[0][2])
    assert total == HELD_OUT_IMAGES, out  # gather dropped the padding that sharding added
    assert accuracy > 0.5, out  # half the optimizer steps of one process: ~0.78 after 3 epochs


# -- examples/stdlib_gpt.py: a byte-level GPT on the standard library's source ----------------

BITS_LINE = re.compile(r"held-out bits per byte: ([0-9.]+)$")
# Smaller than --smoke: CI runs this script several times.
TINY_GPT = ("examples/stdlib_gpt.py", "--smoke", "--steps", "16", "--checkpoint-every", "4", "--log-every", "2",
            "--max-train-bytes", "60000", "--eval-windows", "32", "--dim", "32")


def bits_per_byte(out: str) -> float:
    last = out.strip().splitlines()[-1]
    found = BITS_LINE.fullmatch(last)
    assert found, f"the last line is not the bits per byte:\n{out}"
    return float(found.group(1))


def curve(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["bits_per_byte"] for record in map(json.loads, lines)}


def reported_at_a_checkpoint(run_dir) -> bool:
    saved = {int(p.name[len("step-"):]) for p in (run_dir / "checkpoints").glob("step-*")}
    metrics = run_dir / "metrics.jsonl"
    if not saved or not metrics.exists():
        return False
    reported = {json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")}
    return bool(saved & reported)


@pytest.fixture(scope="module")
def uninterrupted_gpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpt")
    return run_dir, run_example(*TINY_GPT, "--run-dir", str(run_dir))


def test_stdlib_gpt_learns_and_prints_bits_per_byte_last(uninterrupted_gpt):
    run_dir, out = uninterrupted_gpt
    bits = bits_per_byte(out)
    assert bits < 6.5, out  # 8.0 is a uniform guess over 256 bytes; ~5.6 after these 16 tiny steps
    assert sorted(curve(run_dir)) == list(range(2, 17, 2))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_stdlib_gpt_killed_with_sigkill_resumes_and_ends_as_if_never_killed(tmp_path, uninterrupted_gpt):
    command = [sys.executable, *TINY_GPT, "--run-dir", str(tmp_path)]
    running = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    # Killed once the first checkpoint is in place and the report of its step is written: the
    # report comes right after the save, and one killed in between is not made again on resume.
    while not reported_at_a_checkpoint(tmp_path):
        assert running.poll() is None and time.monotonic() < deadline, running.stdout.read().decode()
        time.sleep(0.01)
    running.send_signal(signal.SIGKILL)
    assert running.wait(timeout=60) == -signal.SIGKILL
    running.stdout.close()

    out = run_example(*TINY_GPT, "--run-dir", str(tmp_path))
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", out).group(1))
    assert 4 <= resumed_at < 16, out
    run_dir, uninterrupted = uninterrupted_gpt
    assert bits_per_byte(out) == bits_per_byte(uninterrupted)
    assert curve(tmp_path) == curve(run_dir)  # every step's training loss, bit for bit


@pytest.mark.multiprocess
def test_stdlib_gpt_runs_under_spawn_with_fsdp(tmp_path):
    out = run_example("-m", "trainloop.spawn", "-n", "2", "--strategy", "fsdp", *TINY_GPT, "--steps", "12",
                      "--run-dir", str(tmp_path))
    assert "2 process(es)" in out and bits_per_byte(out) < 7.5, out  # 8.0 is a uniform guess
    assert (tmp_path / "checkpoints" / "step-00000012" / "__1_0.distcp").exists()  # sharded by 2 ranks


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_finetune_trains_a_tiny_llama_from_its_config(tmp_path):
    out = run_example("examples/hf_finetune.py", "--smoke", "--steps", "10", "--run-dir", str(tmp_path))
    assert bits_per_byte(out) < 6.5, out  # 8.0 is a uniform guess; ~5.8 after 10 steps
    assert (tmp_path / "checkpoints" / "step-00000010").is_dir()

"""The DDP and checkpoint benchmarks run to the end and print their tables. Timings are never
asserted: they depend on the machine, and a benchmark that fails on a busy one is noise, not a
signal. (The overhead benchmark's smoke test is in test_benchmarks_smoke.py.)"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.support.paths import REPO

NUMBER = r"[0-9.]+"
SPREAD = rf"{NUMBER}-{NUMBER}"  # the lowest and highest per-round ratio
# The peers run beside trainloop where the bench extra is installed (CI has the dev extra only).
PEERS = tuple(name for name, package in (("Accelerate", "accelerate"), ("Lightning Fabric", "lightning"))
              if importlib.util.find_spec(package))


def run_quick(script: str, *flags: str) -> str:
    """stdout of `python benchmarks/<script> --quick [flags]`, which must exit 0."""
    done = subprocess.run(
        [sys.executable, os.path.join("benchmarks", script), "--quick", *flags],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@pytest.mark.multiprocess
def test_ddp_benchmark_quick_run_prints_its_table():
    out = run_quick("ddp.py")
    header = r"^\s*accumulate\s+variant\s+us/step\s+vs raw\s+spread\s+cpu us/step\s+vs raw\s+spread$"
    assert re.search(header, out, re.MULTILINE), out
    for accumulate in ("1", "4"):
        for variant in ("raw DDP", "raw DDP \\+ synced log", "trainloop", *PEERS):
            row = rf"^\s*{accumulate}\s+{variant}\s+{NUMBER}\s+{NUMBER}x\s+{SPREAD}\s+{NUMBER}\s+{NUMBER}x\s+{SPREAD}$"
            assert re.search(row, out, re.MULTILINE), f"no {variant} row for accumulate {accumulate}:\n{out}"
        assert re.search(rf"^\s*per-step, accumulate {accumulate}: {NUMBER}x raw DDP", out, re.MULTILINE), out



@pytest.mark.multiprocess
def test_fsdp_benchmark_quick_run_prints_its_tables_and_says_which_peers_it_left_out():
    out = run_quick("fsdp.py")
    header = r"^\s*accumulate\s+variant\s+ms/step\s+vs raw\s+spread\s+cpu ms/step\s+vs raw\s+spread$"
    assert re.search(header, out, re.MULTILINE), out
    fabric = importlib.util.find_spec("lightning") is not None
    variants = ["raw fully_shard", "trainloop fsdp", "raw HSDP 2x1", "trainloop HSDP 2x1"]
    variants += ["Fabric FSDP2"] * fabric  # every variant was checked sharded over 2 ranks first
    for accumulate in ("1", "4"):
        for variant in variants:
            row = rf"^\s*{accumulate}\s+{variant}\s+{NUMBER}\s+{NUMBER}x\s+{SPREAD}\s+{NUMBER}\s+{NUMBER}x\s+{SPREAD}$"
            assert re.search(row, out, re.MULTILINE), f"no {variant} row for accumulate {accumulate}:\n{out}"
        assert re.search(rf"^\s*per-step, accumulate {accumulate}: {NUMBER}x raw", out, re.MULTILINE), out
        assert re.search(rf"^\s*HSDP per-step, accumulate {accumulate}: {NUMBER}x raw", out, re.MULTILINE), out
    # The peers left out, each with why: Fabric's FSDPStrategy in its own words, Accelerate with
    # what its prepare gave instead of a sharded model (or a row, should it ever shard on the CPU).
    if fabric:
        assert "note: Fabric's strategy='fsdp' (FSDPStrategy)" in out, out
    else:
        assert "note: Lightning Fabric skipped: lightning is not installed" in out, out
    assert "note: Accelerate skipped:" in out or re.search(r"^\s*1\s+Accelerate FSDP2\s", out, re.MULTILINE), out
    assert "per rank" in out  # the memory table


PHASES = ("load: deserialize", "load: hash model.safetensors", "load: hash optimizer.pt",
          "load: read and verify, all of it", "load: fit to the run", "load: restore in place",
          "save: stage", "save: serialize\\+write\\+hash model.safetensors",
          "save: serialize\\+write\\+hash optimizer.pt", "save: fsync each file",
          "save: rename into place", "save: the writer thread, all of it")


def test_checkpoint_benchmark_quick_run_prints_its_tables_and_every_phase():
    # --phases times every phase of a background save and of a load after the table, and takes its
    # timing wrappers off again; one run checks both (a start-up of the benchmark costs seconds).
    out = run_quick("checkpoint.py", "--phases")
    assert "phases (median ms" in out, out
    for phase in PHASES:
        assert re.search(rf"^\s+{phase}.*\s[0-9.]+ ms$", out, re.MULTILINE), f"no {phase}:\n{out}"
    assert re.search(r"^op\s+variant\s+ms\s+vs raw\s+spread$", out, re.MULTILINE), out
    # The peers' rows need the bench extra; CI installs the dev extra only, and says so.
    peers = tuple(name for name, package in (("accelerate", "accelerate"), ("fabric", "lightning"))
                  if importlib.util.find_spec(package))
    for name, package in (("accelerate", "accelerate"), ("fabric", "lightning")):
        if name not in peers:
            assert f"the {name} rows are left out" in out, out
    rows = [("save", v) for v in ("raw", "raw durable", *peers, "dcp", "trainloop",
                                  "trainloop background: blocked", "trainloop background: committed")]
    rows += [("load", v) for v in ("raw", *peers, "dcp", "trainloop")]
    for op, variant in rows:
        row = rf"^{op}\s+{variant}\s+{NUMBER}\s+{NUMBER}x\s+{SPREAD}$"
        assert re.search(row, out, re.MULTILINE), f"no {op} {variant} row:\n{out}"
    for target in ("background save, loop blocked", "background save, committed", "tl.load, verified"):
        assert re.search(rf"^\s*{target}: {NUMBER}x raw", out, re.MULTILINE), out

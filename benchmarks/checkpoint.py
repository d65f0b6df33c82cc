"""Checkpoint save and load time of `tl.save`/`tl.load` against plain safetensors + torch.save.

    python benchmarks/checkpoint.py                # the full run (~40 s on 2 CPU cores)
    python benchmarks/checkpoint.py --quick        # a smoke run: small numbers, same code paths

What is measured, and why it is fair:

- The same run state for both: a stack of `nn.Linear(width, width)` layers and its AdamW
  optimizer after one real step (so every parameter has its `exp_avg` and `exp_avg_sq`), in two
  sizes: "small" (~1 MB of weights) and "medium" (~100 MB of weights; with AdamW's two moments
  ~300 MB on disk). One process, the CPU.
- raw: what a hand-written loop does: `safetensors.torch.save_file(model.state_dict())` and
  `torch.save(optimizer.state_dict())` into a new directory; loading is `load_file` +
  `model.load_state_dict` and `torch.load(weights_only=True)` + `optimizer.load_state_dict`.
  trainloop: `tl.save(state, path)` and `tl.load(state, path)`, which do the same plus what
  makes a checkpoint safe: RNG states, counters and a manifest; the SHA-256 of every file;
  fsync of every file and the directory, then an atomic rename; and on load, every file's
  size and hash checked before anything is read.
- Both write into a temporary directory on one filesystem (`--dir`, default: the system's temp
  directory) and load what they just wrote, from the page cache. Before each timed operation
  `os.sync()` (not timed) writes back what the previous one left dirty, so that raw's deferred
  writeback never lands in another operation's time. raw's save is not durable when it
  returns; that difference in promise is the point of the comparison, not an unfairness.
- Rounds interleave the variants in a rotating order (raw save, raw load, trainloop save,
  trainloop load; then trainloop first); ms is each operation's median over rounds; the ratio
  is the median over rounds of (trainloop / raw) within the round; the spread is the ratio's
  interquartile range.
- Where tl.save's time goes: extra, untimed-by-the-table saves and loads run under cProfile;
  the cumulative time of trainloop.checkpoint's `_sha256` (read back and hash) and `_fsync`
  shows what integrity and durability cost, next to the rest.

Target (issue 5): tl.save and tl.load <= 1.3x raw. Timings are printed, never asserted: the
exit code is 0.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import trainloop as tl

# `common` sits next to this file: put its directory on sys.path, however this file was loaded.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import quick_note, ratio_cells, ratio_summary, rotated, target_line

TARGET = 1.3
# name: (width, depth): weights are depth * (width^2 + width) float32 values.
SIZES = {"small": (256, 4), "medium": (1024, 24)}
QUICK_SIZES = {"small": (256, 4), "medium": (512, 4)}
VARIANTS = ("raw", "trainloop")
TABLE_HEADER = f"{'model':<8}{'MB':>7}  {'op':<6}{'variant':<11}{'ms':>9}{'vs raw':>9}{'spread':>9}"


class Run:
    """One run's model, optimizer and trainloop state: what both variants save and load."""

    def __init__(self, width: int, depth: int):
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
        self.state = tl.init(seed=0)
        self.state, self.model, self.optimizer = tl.prepare(
            self.state, model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        # One real step: AdamW's state then holds both moments for every parameter.
        self.model(torch.randn(8, width)).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.weights_mb = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 1e6


# -- the variants ------------------------------------------------------------------------------


def raw_save(run: Run, directory: Path) -> None:
    directory.mkdir()
    save_file(run.model.state_dict(), str(directory / "model.safetensors"))
    torch.save(run.optimizer.state_dict(), directory / "optimizer.pt")


def raw_load(run: Run, directory: Path) -> None:
    run.model.load_state_dict(load_file(str(directory / "model.safetensors")))
    run.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))


def trainloop_save(run: Run, directory: Path) -> None:
    tl.save(run.state, directory)


def trainloop_load(run: Run, directory: Path) -> None:
    run.state = tl.load(run.state, directory)


OPERATIONS: dict[str, dict[str, Callable[[Run, Path], None]]] = {
    "raw": {"save": raw_save, "load": raw_load},
    "trainloop": {"save": trainloop_save, "load": trainloop_load},
}


# -- measuring ---------------------------------------------------------------------------------


def timed(operation: Callable[[Run, Path], None], run: Run, directory: Path) -> float:
    """ms that `operation` takes, from a clean start: no garbage, nothing dirty to write back."""
    gc.collect()
    os.sync()
    start = time.perf_counter_ns()
    operation(run, directory)
    return (time.perf_counter_ns() - start) / 1e6


def measure(run: Run, scratch: Path, rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """{variant: {"save": [ms per round], "load": [...]}}; each round saves and loads with every
    variant, the order rotating from round to round."""
    times = {variant: {"save": [], "load": []} for variant in VARIANTS}
    for round_index in range(-warmup, rounds):
        for variant in rotated(VARIANTS, round_index):
            directory = scratch / f"{variant}-{round_index}"
            for op in ("save", "load"):
                milliseconds = timed(OPERATIONS[variant][op], run, directory)
                if round_index >= 0:
                    times[variant][op].append(milliseconds)
            shutil.rmtree(directory)
    return times


def profiled(function: Callable[[], object]) -> tuple[float, float, float]:
    """(total, in trainloop.checkpoint._sha256, in trainloop.checkpoint._fsync), in ms, of one
    call of `function` under cProfile (which adds little here: few Python calls, big I/O)."""
    profiler = cProfile.Profile()
    profiler.runcall(function)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, ..., own, cumulative, callers)}
    total = sum(entry[2] for entry in stats.values())  # the own times add up to the whole

    def cumulative(name: str) -> float:
        return sum(entry[3] for (file, _, function_name), entry in stats.items()
                   if function_name == name and file.endswith(os.path.join("trainloop", "checkpoint.py")))

    return total * 1e3, cumulative("_sha256") * 1e3, cumulative("_fsync") * 1e3


def integrity_costs(run: Run, scratch: Path, runs: int) -> dict[str, tuple[float, float, float]]:
    """Medians over `runs` profiled saves and loads: {"save"|"load": (total, sha256, fsync) ms}."""
    records: dict[str, list[tuple[float, float, float]]] = {"save": [], "load": []}
    for index in range(runs):
        directory = scratch / f"profiled-{index}"
        gc.collect()
        os.sync()
        records["save"].append(profiled(lambda: tl.save(run.state, directory)))  # noqa: B023 (called at once)
        gc.collect()
        records["load"].append(profiled(lambda: trainloop_load(run, directory)))  # noqa: B023 (called at once)
        shutil.rmtree(directory)
    return {op: tuple(statistics.median(column) for column in zip(*rows)) for op, rows in records.items()}


def checkpoint_mb(run: Run, scratch: Path) -> float:
    directory = scratch / "size"
    tl.save(run.state, directory)
    size = sum(file.stat().st_size for file in directory.iterdir()) / 1e6
    shutil.rmtree(directory)
    return size


# -- the report --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=0,
                        help="interleaved rounds per size (default: 50 small, 25 medium)")
    parser.add_argument("--profile-runs", type=int, default=5, help="profiled saves and loads per size")
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temp directory)")
    parser.add_argument("--quick", action="store_true", help="tiny numbers for a smoke run")
    args = parser.parse_args()
    if args.rounds < 0 or args.profile_runs < 1:
        parser.error("--rounds must be >= 0 and --profile-runs >= 1")
    sizes = QUICK_SIZES if args.quick else SIZES
    rounds = {"small": 50, "medium": 25}
    if args.rounds:
        rounds = dict.fromkeys(sizes, args.rounds)
    if args.quick:
        rounds, args.profile_runs = dict.fromkeys(sizes, 2), 1
    torch.set_num_threads(1)  # one process on a shared machine: like its I/O, its compute stays put

    print(f"trainloop {tl.__version__} checkpoints, torch {torch.__version__}: a stack of Linear layers "
          f"+ AdamW state; rounds interleaved, medians", flush=True)
    rows, integrity, ratios, raw_ms = [], {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="trainloop-ckpt-bench-", dir=args.dir) as scratch:
        scratch = Path(scratch)
        for size, (width, depth) in sizes.items():
            run = Run(width, depth)
            # Move everything alive now (torch and dynamo: ~300k objects) out of the collector's
            # reach: the gc.collect() before each timed operation then costs microseconds.
            gc.freeze()
            megabytes = checkpoint_mb(run, scratch)
            times = measure(run, scratch, rounds[size], warmup=1)
            integrity[size] = integrity_costs(run, scratch, args.profile_runs)
            for op in ("save", "load"):
                raw = times["raw"][op]
                raw_ms[size, op] = statistics.median(raw)
                for variant in VARIANTS:
                    milliseconds, ratio, spread = ratio_summary(times[variant][op], raw)
                    rows.append((size, megabytes, op, variant, milliseconds, ratio, spread))
                    if variant == "trainloop":
                        ratios[size, op] = ratio
            print(f"  {size}: {run.weights_mb:.1f} MB of weights ({depth} x Linear({width}, {width})), "
                  f"{megabytes:.1f} MB on disk; {rounds[size]} rounds", flush=True)
            del run

    print(TABLE_HEADER)
    for size, megabytes, op, variant, milliseconds, ratio, spread in rows:
        print(f"{size:<8}{megabytes:>7.1f}  {op:<6}{variant:<11}{ratio_cells(milliseconds, ratio, spread)}")
    print("  MB: the checkpoint on disk; ms: median time per operation; vs raw: median of the per-round "
          "ratios; spread: their interquartile range")

    print(f"\nwhere trainloop's time goes (cProfile, median of {args.profile_runs} run(s); ms and share of the total):")
    print(f"{'model':<8}{'op':<6}{'total':>9}{'sha256':>17}{'fsync':>17}{'the rest':>17}{'rest vs raw':>13}")
    for size, costs in integrity.items():
        for op, (total, sha256, fsync) in costs.items():
            parts = (sha256, fsync, total - sha256 - fsync)
            shares = "".join(f"{f'{part:.1f} ({part / total:.0%})':>17}" for part in parts)
            print(f"{size:<8}{op:<6}{total:>9.1f}{shares}{parts[2] / raw_ms[size, op]:>12.2f}x")
    print("  sha256: reading every file back and hashing it (save: for the manifest; load: to verify); "
          "fsync: every file,\n  the directory and its parent; the rest: the writes and reads themselves, "
          "RNG states, manifest, rename;\n  rest vs raw: the rest against raw's median time for the same "
          "operation (what trainloop would cost without hashing and fsync)")

    print("\ntargets:")
    for (size, op), ratio in ratios.items():
        print(target_line(f"tl.{op}, {size}", ratio, TARGET))
    if args.quick:
        print(quick_note("rounds"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

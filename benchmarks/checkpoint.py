"""Checkpoint save and load of `tl.save`/`tl.load`, synchronous and in the background, side by
side with raw safetensors + torch.save, the same made durable, Accelerate, Fabric and raw DCP.

    python benchmarks/checkpoint.py                # the 289 MB state, 8 rounds (0.5-2 min on 2 cores)
    python benchmarks/checkpoint.py --quick        # a smoke run: a small state, same code paths

What is measured, and why it is fair:

- One run state for every variant: a 25M-parameter MLP (6 x Linear(2000, 2000)) and its AdamW
  optimizer after one real step (every parameter has both moments): 289 MB on disk. One
  process, the CPU, one torch thread; trainloop's own threads (the background writer, the
  hashing beside each write, the staging copy split across idle cores) are part of what it costs.
- Save variants, each into a new directory on one filesystem (`--dir`, default the system's
  temp directory):
  raw: `safetensors.torch.save_file(model.state_dict())` + `torch.save(optimizer.state_dict())`,
  what a hand-written loop does; not durable when it returns (the bytes sit in the page cache).
  raw durable: the same, then each file, the directory and its parent fsynced.
  accelerate: `Accelerator.save_state` (its own copy of the model and optimizer).
  fabric: `Fabric.save(path, {"model": ..., "optimizer": ...})` (its own copy too), and
  `Fabric.load` back.
  dcp: `torch.distributed.checkpoint.save` of `get_state_dict(model, optimizer)`, one process.
  trainloop: `tl.save`: RNG states, counters, a manifest, every file hashed (XXH3-128) as it is
  written and fsynced, then an atomic rename: durable and verifiable when it returns.
  trainloop background: `tl.save(background=True)`; "blocked" is the time until it returns
  (the loop's stall: staging copies of the tensors), "committed" the time until its Future's
  result (durable, hashed, renamed), with nothing else running meanwhile.
- Load variants read what that variant just wrote, from the page cache: raw (`load_file` +
  `load_state_dict`, `torch.load(weights_only=True)` + `load_state_dict`), accelerate
  (`load_state`), dcp (`dcp.load` + `set_state_dict`), trainloop (`tl.load`: every file's size
  and hash checked, deserialized from the same bytes, fitted to the run before restoring).
- Before each timed operation `os.sync()` (not timed) writes back what the previous one left
  dirty, so that no variant's deferred writeback lands in another one's time.
- Rounds run the variants in a rotating order; ms is each operation's median over rounds; a
  ratio is the median over rounds of (variant / raw) within the round, its spread the lowest and
  highest of those ratios. "committed" is also reported against raw durable: the same promise.

Goals, in every round: background blocked <= 0.2x raw save; background committed <= 1.1x raw
durable; tl.load <= 1.2x raw load. Accelerate and Fabric are skipped, saying so, where the
`bench` extra is not installed. Timings are printed, never asserted: the exit code is 0.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import trainloop as tl

# `common` sits next to this file: put its directory on sys.path, however this file was loaded.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import quick_note, ratio_cells, ratio_summary, rotated, spread_text, target_line

WIDTH, DEPTH = 2000, 6  # 24M parameters: 96 MB of weights, 289 MB with AdamW's two moments
QUICK_WIDTH, QUICK_DEPTH = 256, 4
VARIANTS = ("raw", "raw durable", "accelerate", "fabric", "dcp", "trainloop", "trainloop background")
PEERS = {"accelerate": "accelerate", "fabric": "lightning"}  # variant: the package it needs
GOALS = {"blocked": 0.2, "committed": 1.1, "load": 1.2}
TABLE_HEADER = f"{'op':<6}{'variant':<32}{'ms':>9}{'vs raw':>9}{'spread':>13}"


class Run:
    """The model and optimizer every variant saves and loads, prepared for trainloop and (copies)
    for Accelerate and Fabric."""

    def __init__(self, width: int, depth: int):
        torch.manual_seed(0)
        self.model = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
        self.state = tl.init(seed=0)
        self.state, self.model, self.optimizer = tl.prepare(
            self.state, self.model, torch.optim.AdamW(self.model.parameters(), lr=1e-3))
        # One real step: AdamW's state then holds both moments for every parameter.
        self.state = tl.backward(self.state, self.model(torch.randn(8, width)).square().mean())
        self.state = tl.step(self.state, self.optimizer)  # a prepared optimizer is stepped by tl.step
        self.accelerate_model = copy.deepcopy(tl.unwrap(self.model))
        self.accelerate_optimizer = torch.optim.AdamW(self.accelerate_model.parameters(), lr=1e-3)
        self.accelerate_optimizer.load_state_dict(self.optimizer.state_dict())
        self.accelerator = None
        self.fabric = None
        self.fabric_state: dict | None = None
        self.pending = None  # the background save's Future, between "blocked" and "committed"


# -- the variants ------------------------------------------------------------------------------


def raw_save(run: Run, directory: Path) -> None:
    directory.mkdir()
    save_file(tl.unwrap(run.model).state_dict(), str(directory / "model.safetensors"))
    torch.save(run.optimizer.state_dict(), directory / "optimizer.pt")


def raw_durable_save(run: Run, directory: Path) -> None:
    raw_save(run, directory)
    for path in (directory / "model.safetensors", directory / "optimizer.pt", directory, directory.parent):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def raw_load(run: Run, directory: Path) -> None:
    tl.unwrap(run.model).load_state_dict(load_file(str(directory / "model.safetensors")))
    run.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))


def accelerator(run: Run):
    if run.accelerator is None:
        from accelerate import Accelerator

        logging.getLogger("accelerate").setLevel(logging.ERROR)
        run.accelerator = Accelerator(cpu=True)
        run.accelerate_model, run.accelerate_optimizer = run.accelerator.prepare(
            run.accelerate_model, run.accelerate_optimizer)
    return run.accelerator


def accelerate_save(run: Run, directory: Path) -> None:
    accelerator(run).save_state(str(directory))


def accelerate_load(run: Run, directory: Path) -> None:
    accelerator(run).load_state(str(directory))


def fabric(run: Run):
    if run.fabric is None:
        from lightning.fabric import Fabric

        run.fabric = Fabric(accelerator="cpu", devices=1)
        model = copy.deepcopy(tl.unwrap(run.model))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        optimizer.load_state_dict(run.optimizer.state_dict())
        model, optimizer = run.fabric.setup(model, optimizer)
        run.fabric_state = {"model": model, "optimizer": optimizer}
    return run.fabric


def fabric_save(run: Run, directory: Path) -> None:
    fabric(run).save(directory / "checkpoint.ckpt", run.fabric_state)


def fabric_load(run: Run, directory: Path) -> None:
    fabric(run).load(directory / "checkpoint.ckpt", run.fabric_state)


def dcp_save(run: Run, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = get_state_dict(tl.unwrap(run.model), run.optimizer)
    dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=str(directory))


def dcp_load(run: Run, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer = get_state_dict(tl.unwrap(run.model), run.optimizer)
    state = {"model": model, "optimizer": optimizer}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(tl.unwrap(run.model), run.optimizer,
                   model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def trainloop_save(run: Run, directory: Path) -> None:
    tl.save(run.state, directory)


def trainloop_load(run: Run, directory: Path) -> None:
    run.state = tl.load(run.state, directory)


SAVES: dict[str, Callable[[Run, Path], None]] = {
    "raw": raw_save, "raw durable": raw_durable_save, "accelerate": accelerate_save, "fabric": fabric_save,
    "dcp": dcp_save, "trainloop": trainloop_save,
}
LOADS: dict[str, Callable[[Run, Path], None]] = {
    "raw": raw_load, "accelerate": accelerate_load, "fabric": fabric_load, "dcp": dcp_load,
    "trainloop": trainloop_load,
}


def installed(variant: str) -> bool:
    return variant not in PEERS or importlib.util.find_spec(PEERS[variant]) is not None


# -- measuring ---------------------------------------------------------------------------------


def clean_start() -> None:
    """No garbage to collect, nothing dirty to write back: each operation pays only its own."""
    gc.collect()
    os.sync()


def timed(operation: Callable[[], object]) -> float:
    clean_start()
    start = time.perf_counter_ns()
    operation()
    return (time.perf_counter_ns() - start) / 1e6


def background_save(run: Run, directory: Path) -> tuple[float, float]:
    """(ms until tl.save(background=True) returned, ms until its checkpoint was committed)."""
    clean_start()
    start = time.perf_counter_ns()
    future = tl.save(run.state, directory, background=True)
    blocked = time.perf_counter_ns()
    future.result()
    return (blocked - start) / 1e6, (time.perf_counter_ns() - start) / 1e6


def measure(run: Run, scratch: Path, rounds: int, warmup: int) -> dict[str, list[float]]:
    """{"save raw": [ms per round], ...}: each round saves (and loads) with every variant, in an
    order that rotates from round to round."""
    times: dict[str, list[float]] = {}

    def record(key: str, milliseconds: float, round_index: int) -> None:
        if round_index >= 0:
            times.setdefault(key, []).append(milliseconds)

    variants = tuple(v for v in VARIANTS if installed(v))
    for round_index in range(-warmup, rounds):
        for variant in rotated(variants, round_index):
            directory = scratch / f"{variant.replace(' ', '-')}-{round_index}"
            if variant == "trainloop background":
                blocked, committed = background_save(run, directory)
                record("save trainloop background: blocked", blocked, round_index)
                record("save trainloop background: committed", committed, round_index)
            else:
                record(f"save {variant}", timed(lambda: SAVES[variant](run, directory)), round_index)  # noqa: B023
            if variant in LOADS:
                record(f"load {variant}", timed(lambda: LOADS[variant](run, directory)), round_index)  # noqa: B023
            shutil.rmtree(directory)
            (scratch / "latest").unlink(missing_ok=True)  # trainloop's pointer
    return times


def checkpoint_mb(run: Run, scratch: Path) -> float:
    directory = scratch / "size"
    tl.save(run.state, directory)
    size = sum(file.stat().st_size for file in directory.iterdir()) / 1e6
    shutil.rmtree(directory)
    return size


# -- where the time goes (--phases) -------------------------------------------------------------


def phase_report(run: Run, scratch: Path, rounds: int) -> list[str]:
    """Median ms per phase of `tl.save(background=True)` and `tl.load`, timed by wrapping the
    functions that do each phase (in this process only: the wrappers are removed afterwards).
    Phases on other threads overlap one another: their times do not add up to the total."""
    from trainloop.checkpoint import api, files, reading, writing

    times: dict[str, list[float]] = {}
    originals: list[tuple[object, str, object]] = []

    def wrap(owner: object, name: str, phase: Callable[..., str] | str) -> None:
        function = getattr(owner, name)
        originals.append((owner, name, function))

        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                key = phase(*args) if callable(phase) else phase
                times.setdefault(key, []).append((time.perf_counter() - start) * 1e3)
        setattr(owner, name, timed_call)

    wrap(writing._Snapshot, "__init__", "save: stage (copies, the loop blocked)")
    wrap(writing, "write_file", _file_phase)
    wrap(files.HashingFile, "close", "save: fsync each file")
    wrap(writing, "_replace_dir", "save: rename into place")
    wrap(api, "_write", "save: the writer thread, all of it")
    wrap(reading, "check_hash", lambda file, *rest: f"load: hash {Path(file).name} (hash threads)")
    wrap(reading, "_deserialize", "load: deserialize (beside the hashing)")
    wrap(api, "_read_checkpoint", "load: read and verify, all of it")
    wrap(api, "plan", "load: fit to the run")
    wrap(api, "restore", "load: restore in place")
    try:
        for index in range(rounds):
            clean_start()
            tl.save(run.state, scratch / f"phases-{index}", background=True).result()
            clean_start()
            run.state = tl.load(run.state, scratch / f"phases-{index}")
            shutil.rmtree(scratch / f"phases-{index}")
    finally:
        for owner, name, function in reversed(originals):
            setattr(owner, name, function)
    return [f"  {key:<62}{statistics.median(values):8.1f} ms" for key, values in sorted(times.items())]


def _file_phase(file: Path, *rest: object) -> str:
    name = Path(file).name
    name = "the latest pointer" if name.startswith(".latest") else name
    return f"save: serialize+write+hash {name} (writer threads)"


# -- the report --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temp directory)")
    parser.add_argument("--quick", action="store_true", help="a small state and 2 rounds, for a smoke run")
    parser.add_argument("--phases", action="store_true",
                        help="also time each phase of a background save and of a load (after the table)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    width, depth = (QUICK_WIDTH, QUICK_DEPTH) if args.quick else (WIDTH, DEPTH)
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(1)  # one process on a shared machine: its compute stays put

    print(f"trainloop {tl.__version__} checkpoints, torch {torch.__version__}: {depth} x Linear({width}, {width}) "
          f"+ AdamW; {rounds} rounds, rotating order, medians", flush=True)
    with tempfile.TemporaryDirectory(prefix="trainloop-ckpt-bench-", dir=args.dir) as scratch, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group says so at every call
        scratch = Path(scratch)
        run = Run(width, depth)
        gc.freeze()  # what is alive now (torch: ~300k objects) stays out of the collector's way
        megabytes = checkpoint_mb(run, scratch)
        times = measure(run, scratch, rounds, warmup=1)
        phases = phase_report(run, scratch, rounds) if args.phases else []
        tl.finish(run.state)
    print(f"  {megabytes:.1f} MB on disk (trainloop's checkpoint)")
    for variant, package in PEERS.items():
        if not installed(variant):
            print(f"  {package} is not installed (pip install -e .[bench]): the {variant} rows are left out")

    print(TABLE_HEADER)
    ratios = {}
    for key, values in sorted(times.items(), key=lambda item: item[0].startswith("load")):
        op, variant = key.split(" ", 1)
        milliseconds, ratio, spread = ratio_summary(values, times[f"{op} raw"])
        ratios[key] = ratio, spread
        print(f"{op:<6}{variant:<32}{ratio_cells(milliseconds, ratio, spread)}")
    _, committed_vs_durable, spread = ratio_summary(times["save trainloop background: committed"],
                                                    times["save raw durable"])
    _, sync_vs_durable, sync_spread = ratio_summary(times["save trainloop"], times["save raw durable"])
    print(f"  vs raw durable: trainloop {sync_vs_durable:.3f}x (rounds {spread_text(sync_spread)}), "
          f"trainloop background committed {committed_vs_durable:.3f}x (rounds {spread_text(spread)})")
    print("  ms: median per operation; vs raw: median of the per-round ratios to raw's save or load; "
          "spread: the lowest and highest of them")

    print("\ntargets:")
    blocked, blocked_spread = ratios["save trainloop background: blocked"]
    load, load_spread = ratios["load trainloop"]
    print(target_line("background save, loop blocked", blocked, GOALS["blocked"], "raw save", spread=blocked_spread))
    print(target_line("background save, committed", committed_vs_durable, GOALS["committed"], "raw durable save",
                      spread=spread))
    print(target_line("tl.load, verified", load, GOALS["load"], "raw load", spread=load_spread))
    if phases:
        print("\nphases (median ms; threads overlap, so they do not add up):")
        print("\n".join(phases))
    if args.quick:
        print(quick_note("rounds"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

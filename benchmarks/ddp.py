"""DDP step overhead of trainloop against a hand-written DistributedDataParallel loop, 2 processes.

    python benchmarks/ddp.py                 # the full run (~1 minute on 2 CPU cores)
    python benchmarks/ddp.py --quick         # a smoke run: small numbers, same code paths
    python benchmarks/ddp.py --profile       # also: where trainloop's per-step time goes (rank 0)

What is measured, and why it is fair:

- Two processes (gloo on the CPU, one torch thread each) started by `trainloop.spawn.run`. Both
  loops live side by side in the *same* two processes and share one process group: one tiny
  model (MLP 64-128-10, batch 16 per rank, AdamW), each loop with its own copy of the same
  initial weights and the same list of batches (different on each rank), already in memory.
  A step costs a few hundred us here, mostly Python, dispatch and one gloo all-reduce, so a
  framework's bookkeeping shows up instead of hiding behind the matmuls.
- The raw loop is what the PyTorch DDP tutorial teaches: `DistributedDataParallel`, `no_sync()`
  on every micro-step of a window but the last, the loss scaled by 1/k, `optimizer.step()` and
  `zero_grad(set_to_none=True)` at the window's end; logging keeps the detached losses and
  takes their mean every 10 optimizer steps (no host sync). The trainloop loop is the README's
  loop: `tl.init`, `tl.prepare`, `with tl.accumulate(...)`, `tl.backward`, `tl.step`, `tl.log`.
  One difference in work is trainloop's, by design: `tl.log` reports the mean *across ranks*,
  one all-reduce per report. The row "raw DDP + synced log" is the raw loop doing the same
  (`dist.all_reduce` of its mean), so the two rows bracket the fair comparison.
- Variants run interleaved in rounds (A B C, B C A, ...: the order rotates so none always runs
  first), after a warm-up. Both ranks run the same variant at the same time (the collectives
  need it): a barrier, outside the timed span, starts every segment together; rank 0 times it.
  The us/step column is each variant's median over rounds; the ratio is the median over rounds
  of (variant / raw DDP) *within* the round, which cancels the machine's slow drift; the spread
  is the lowest and highest of those ratios.

Target: trainloop's per-step time <= 1.03x the raw DDP loop, at accumulate 1 and 4, in every round.
Fabric and Accelerate (the `bench` extra) run the same loop beside it where installed.
Timings are printed, never asserted: the exit code is 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import trainloop as tl
from trainloop import spawn
from trainloop.topology import leave_process_group

# The workers re-import this file by path, with no guarantee that its directory is on their
# sys.path: put it there, so that `common` resolves in them as it does in the script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    BATCH_SIZE,
    CLASSES,
    HIDDEN,
    IN_FEATURES,
    LOG_EVERY,
    US,
    Loop,
    LossLog,
    adamw,
    build_mlp,
    classification_batches,
    finish_all,
    interleaved_rounds,
    peer_variants,
    profile_by_own_time,
    quick_note,
    ratio_cells,
    ratio_summary,
    round_up,
    target_line,
    trainloop_loop,
    wall_and_cpu_per_step,
)

WORLD_SIZE = 2
STEP_TARGET = 1.03
ACCUMULATIONS = (1, 4)
BASELINE = "raw DDP"
TABLE_HEADER = (f"{'accumulate':>10}  {'variant':<22}{'us/step':>9}{'vs raw':>9}{'spread':>13}"
                f"{'cpu us/step':>13}{'vs raw':>9}{'spread':>13}")


# -- the variants ------------------------------------------------------------------------------


def raw_ddp(accumulate: int, *, synced_log: bool = False) -> Loop:
    # build_mlp seeds the weights alike on every rank (DDP broadcasts rank 0's anyway).
    model = DistributedDataParallel(build_mlp())
    optimizer = adamw(model)
    log = LossLog(synced=synced_log)
    micro_steps = 0

    def run(batches):
        nonlocal micro_steps
        for x, y in batches:
            micro_steps += 1
            at_window_end = micro_steps % accumulate == 0
            # The DDP tutorial's accumulation: skip the all-reduce off the window's end, scale
            # each micro-batch's loss by 1/k.
            with contextlib.nullcontext() if at_window_end else model.no_sync():
                loss = F.cross_entropy(model(x), y)
                (loss / accumulate if accumulate > 1 else loss).backward()
            log.micro_step(loss)
            if at_window_end:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                log.optimizer_step()

    return run


def raw_ddp_synced_log(accumulate: int) -> Loop:
    return raw_ddp(accumulate, synced_log=True)


VARIANTS: dict[str, Callable[[int], Loop]] = {
    BASELINE: raw_ddp,
    "raw DDP + synced log": raw_ddp_synced_log,
    "trainloop": trainloop_loop,
}


def all_variants(accumulate: int) -> tuple[dict[str, Loop], list[str]]:
    """The raw loops, trainloop's, and the peers' where installed (notes for those skipped)."""
    peers, notes = peer_variants(accumulate)
    return {**{name: factory(accumulate) for name, factory in VARIANTS.items()}, **peers}, notes


# -- measuring (inside each worker) ------------------------------------------------------------


def measure(loops: dict[str, Loop], batches: list, rounds: int,
            warmup: int) -> dict[str, dict[str, list[float]]]:
    """{variant: {"wall": [us/step per round], "cpu": [...]}}; rounds interleave the loops in a
    rotating order. Every rank runs this with the same arguments, so both run the same loop at
    the same time. The collector is frozen first (torch: ~100k objects)."""
    times = interleaved_rounds(loops, batches, rounds, warmup, partial(wall_and_cpu_per_step, unit=US),
                               freeze_gc=True)
    return {name: {"wall": [wall for wall, _ in pairs], "cpu": [cpu for _, cpu in pairs]}
            for name, pairs in times.items()}


def profile_trainloop(batches: list, accumulate: int, top: int) -> str:
    """cProfile of the trainloop loop on rank 0 (rank 1 runs the same loop unprofiled): the
    trainloop, attrs and torch.distributed functions by own time. The profiler inflates small
    Python calls; read it for where, not for how much."""
    loop = trainloop_loop(accumulate)
    loop(batches)  # warm up outside the profile
    dist.barrier()
    if dist.get_rank() != 0:
        loop(batches * 10)
        return ""
    return profile_by_own_time(loop, batches * 10, pattern=r"trainloop|attr|distributed", top=top)


def worker(steps: int, rounds: int, warmup: int, profile: bool) -> dict | None:
    """One rank's part: both loops, measured in the same interleaved rounds as the other rank.

    Returns rank 0's times {accumulate: {variant: [us/step per round]}} (and the profile);
    the other ranks return None."""
    torch.set_num_threads(1)  # the overhead is single-threaded Python; keep the 2 cores apart
    # Each rank's batches are its own shard already (seeded by rank), as that warning allows.
    warnings.filterwarnings("ignore", message=r"this run has \d+ processes but no prepared DataLoader")
    dist.init_process_group("gloo")  # from the launcher's variables, as a torchrun script does
    try:
        rank = dist.get_rank()
        batches = classification_batches(steps, rank=rank)
        results: dict = {"world_size": dist.get_world_size(), "times": {}, "notes": set()}
        for accumulate in ACCUMULATIONS:
            loops, notes = all_variants(accumulate)
            results["notes"].update(notes)
            results["times"][accumulate] = measure(loops, batches, rounds, warmup)
            finish_all(loops)
        if profile:
            results["profile"] = {accumulate: profile_trainloop(batches, accumulate, top=25)
                                  for accumulate in ACCUMULATIONS}
        return results if rank == 0 else None
    finally:
        leave_process_group()  # with gloo's grace period for DDP's threads


# -- the report --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40,
                        help=f"micro-steps per variant per round (rounded up to whole logging periods: "
                             f"a multiple of {LOG_EVERY} x {max(ACCUMULATIONS)})")
    parser.add_argument("--rounds", type=int, default=150, help="interleaved rounds (medians over these)")
    parser.add_argument("--quick", action="store_true", help="tiny numbers for a smoke run")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the trainloop loop")
    args = parser.parse_args()
    if min(args.steps, args.rounds) < 1:
        parser.error("--steps and --rounds must be >= 1")
    if args.quick:
        args.steps, args.rounds = 1, 2
    # Every segment holds whole logging periods (the reports every LOG_EVERY optimizer steps), so
    # each round of each variant does the same work and the per-round ratios are like for like.
    args.steps = round_up(args.steps, LOG_EVERY * max(ACCUMULATIONS))
    warmup = 1 if args.quick else 3

    print(f"trainloop {tl.__version__} DDP overhead, torch {torch.__version__}, {WORLD_SIZE} processes "
          f"(gloo, CPU, 1 thread each): MLP {IN_FEATURES}-{HIDDEN}-{CLASSES}, batch {BATCH_SIZE} per rank, "
          f"AdamW; {args.steps} micro-steps x {args.rounds} interleaved rounds, medians", flush=True)
    results = spawn.run(worker, args.steps, args.rounds, warmup, args.profile, n=WORLD_SIZE)

    print(TABLE_HEADER)
    trainloop_ratios = {}
    for accumulate, times in results["times"].items():
        for name, measured in times.items():
            wall, wall_ratio, wall_spread = ratio_summary(measured["wall"], times[BASELINE]["wall"])
            cpu, cpu_ratio, cpu_spread = ratio_summary(measured["cpu"], times[BASELINE]["cpu"])
            print(f"{accumulate:>10}  {name:<22}{ratio_cells(wall, wall_ratio, wall_spread)}"
                  f"{ratio_cells(cpu, cpu_ratio, cpu_spread, width=13)}")
            if name == "trainloop":
                trainloop_ratios[accumulate] = wall_ratio, wall_spread, cpu_ratio
    print(f"  us/step: rank 0's median wall-clock time per micro-step (batch); vs raw: median of the "
          f"per-round ratios to {BASELINE!r}; spread: the lowest and highest of them.\n"
          f"  cpu us/step: the same for rank 0's main-thread CPU time: the loop's own work, mostly without the "
          f"waits for gloo\n  and for other processes, so it stays readable on a busy machine.")
    for note in sorted(results["notes"]):
        print(f"  note: {note}")

    print("\ntargets:")
    for accumulate, (wall_ratio, wall_spread, cpu_ratio) in trainloop_ratios.items():
        print(target_line(f"per-step, accumulate {accumulate}", wall_ratio, STEP_TARGET, baseline=BASELINE,
                          spread=wall_spread)
              + f"; main-thread CPU {cpu_ratio:.3f}x")
    if args.quick:
        print(quick_note())

    if args.profile:
        for accumulate, profile in results["profile"].items():
            print(f"\ncProfile of the trainloop loop on rank 0, accumulate {accumulate}, by own time:")
            print(profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

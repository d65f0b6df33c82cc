"""Per-step overhead of trainloop against a plain PyTorch loop, Accelerate and Lightning Fabric.

    python benchmarks/overhead.py                 # the full run (~1.5 minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # a smoke run: small numbers, same code paths
    python benchmarks/overhead.py --profile       # also: where trainloop's per-step time goes

What is measured, and why it is fair:

- One tiny model (MLP 64-128-10, batch 16, AdamW): a step costs ~200 us here, almost all of it
  Python and dispatch, so a framework's per-step bookkeeping shows up instead of hiding behind
  the matmuls. Every variant gets its own copy of the same initial weights and the same list of
  batches, already in memory (no DataLoader: its collation would dwarf the differences).
- Every variant does the same work per micro-step: forward, `F.cross_entropy`, backward, keep
  the loss for logging; and per window of `accumulate` micro-steps: one `optimizer.step()` and
  `zero_grad(set_to_none=True)`. Each variant is written the way its documentation says users
  write it; the differences are noted at each loop.
- Variants run interleaved in rounds (A B C D, B C D A, ...: the order rotates so none always
  runs first), after a warm-up. The us/step column is each variant's median over rounds; the
  ratio is the median over rounds of (variant / raw) *within* the round, which cancels the
  machine's slow drift; the spread is the lowest and highest of those ratios.
- With a tracker: "trainloop + JSONLines" is the same loop with `JSONLines` attached (a report,
  with one host sync for the floats, every `log_every` = 10 steps, written and flushed), against
  "raw + JSON lines", the raw loop writing its mean loss as one flushed JSON line as often.
- `import` time is measured in fresh interpreters: the time `import <module>` takes after
  `import torch`, timed inside the process, median over runs. trainloop is imported from a copy laid
  out as a wheel installs it, with compiled bytecode, as users get it; a second row shows the
  same copy without bytecode (what an editable tree under PYTHONDONTWRITEBYTECODE=1 costs).

Targets, in every round: trainloop's per-step time <= 1.02x raw PyTorch, and <= 1.03x with a
tracker attached (against the raw loop that writes its metrics too); `import trainloop` adds
<= 15 ms to `import torch`. Timings are printed, never asserted: the exit code is 0.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

import trainloop as tl

# `common` sits next to this file: put its directory on sys.path, however this file was loaded.
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
    time_per_step,
    trainloop_loop,
)

STEP_TARGET, TRACKER_TARGET, IMPORT_TARGET_MS = 1.02, 1.03, 15.0
RAW_TRACKED, TRACKED = "raw + JSON lines", "trainloop + JSONLines"
TABLE_HEADER = f"{'accumulate':>10}  {'variant':<22}{'us/step':>9}{'vs raw':>9}{'spread':>13}"


# -- the variants ------------------------------------------------------------------------------


def raw_pytorch(accumulate: int, on_report: Callable[[torch.Tensor, int], None] | None = None) -> Loop:
    """The hand-written loop; `on_report(mean loss, step)` every LOG_EVERY optimizer steps."""
    model = build_mlp()
    optimizer = adamw(model)
    log = LossLog()
    micro_steps = 0

    def run(batches):
        nonlocal micro_steps
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            # The usual hand-written accumulation: scale each micro-batch's loss by 1/k.
            (loss / accumulate if accumulate > 1 else loss).backward()
            log.micro_step(loss)
            micro_steps += 1
            if micro_steps % accumulate == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                log.optimizer_step()
                if on_report is not None and log.steps % LOG_EVERY == 0:
                    on_report(log.last_mean, log.steps)

    return run


def raw_with_json_lines(accumulate: int, path: str) -> Loop:
    """The raw loop, writing each mean loss it takes (every LOG_EVERY steps) as a flushed JSON line."""
    file = open(path, "w", encoding="utf-8")  # noqa: SIM115  (open for the benchmark's life)

    def write(mean: torch.Tensor, step: int) -> None:
        file.write(json.dumps({"step": step, "loss": float(mean)}) + "\n")
        file.flush()

    return raw_pytorch(accumulate, on_report=write)


def trainloop_with_json_lines(accumulate: int, path: str) -> Loop:
    from trainloop.callbacks import JSONLines

    return trainloop_loop(accumulate, callbacks=[JSONLines(path)])


def available_variants(accumulate: int, scratch: str) -> tuple[dict[str, Loop], list[str]]:
    """The variants that can run here, built for `accumulate`, and notes on those skipped."""
    peers, notes = peer_variants(accumulate)
    return {"raw PyTorch": raw_pytorch(accumulate), "trainloop": trainloop_loop(accumulate), **peers,
            RAW_TRACKED: raw_with_json_lines(accumulate, os.path.join(scratch, f"raw-{accumulate}.jsonl")),
            TRACKED: trainloop_with_json_lines(accumulate, os.path.join(scratch, f"tl-{accumulate}.jsonl"))}, notes


# -- measuring ---------------------------------------------------------------------------------


def measure(loops: dict[str, Loop], batches: list, rounds: int, warmup: int) -> dict[str, list[float]]:
    """us/step of each loop in each round; rounds interleave the loops in a rotating order.
    The collector is frozen first: torch, Accelerate and Lightning hold ~400k objects."""
    return interleaved_rounds(loops, batches, rounds, warmup, partial(time_per_step, unit=US), freeze_gc=True)


def step_rows(times: dict[str, list[float]]) -> list[tuple[str, float, float, float]]:
    """(variant, median us/step, median ratio to raw, ratio's interquartile range) per variant."""
    raw = times["raw PyTorch"]
    return [(name, *ratio_summary(values, raw)) for name, values in times.items()]


# Run in a fresh interpreter: prints how long importing {module} took once torch was already
# imported, and where {module} was found.
IMPORT_PROBE = """\
import sys, time, torch
start = time.perf_counter()
import {module}
print(time.perf_counter() - start, sys.modules["{module}"].__file__)
"""


def installed_copy(directory: str, *, compiled: bool) -> str:
    """A copy of trainloop laid out as a wheel installs it (callbacks/ as trainloop/callbacks) in
    `directory`, its bytecode compiled or not; returns the directory, for PYTHONPATH.

    An editable install imports the source tree, and with PYTHONDONTWRITEBYTECODE set (as on
    this project's machines) or a read-only tree, every import compiles every module again:
    ~10 ms that users of an installed trainloop never pay. Both numbers are worth knowing.
    """
    import trainloop.callbacks

    package = os.path.join(directory, "trainloop")
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(os.path.dirname(tl.__file__), package, ignore=skip)
    shutil.copytree(os.path.dirname(trainloop.callbacks.__file__), os.path.join(package, "callbacks"),
                    dirs_exist_ok=True, ignore=skip)
    if compiled:
        compileall.compile_dir(package, quiet=1)
    return directory


def import_times(probes: dict[str, tuple[str, str | None]], runs: int, cwd: str) -> dict[str, float]:
    """Per probe `label: (module, directory to import it from or None)`: the median ms that
    `import module` takes after `import torch`, in fresh interpreters started in `cwd`, the probes
    interleaved so that the machine's drift hits them alike. Timed inside the process: subtracting
    the wall time of a torch-only process gives the same number under ~100 ms of start-up noise."""
    times: dict[str, list[float]] = {label: [] for label in probes}
    for _ in range(runs):
        for label, (module, directory) in probes.items():
            env = dict(os.environ)
            if directory is not None:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [directory, env.get("PYTHONPATH")]))
                env["PYTHONDONTWRITEBYTECODE"] = "1"  # a copy without bytecode stays without
            done = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(module=module)], env=env,
                                  cwd=cwd, capture_output=True, text=True, check=True)
            seconds, found_at = done.stdout.split(maxsplit=1)
            found_at = found_at.strip()
            if directory is not None and not found_at.startswith(directory):
                raise RuntimeError(f"{label}: imported {found_at}, not the copy in {directory}")
            times[label].append(float(seconds) * 1e3)
    return {label: statistics.median(values) for label, values in times.items()}


def profile_trainloop(batches: list, accumulate: int, top: int) -> str:
    """cProfile of the trainloop loop: trainloop's functions (and attrs', which they call), by own
    time. The profiler inflates small Python calls; read it for where, not for how much."""
    loop = trainloop_loop(accumulate)
    loop(batches)  # warm up outside the profile
    profile = profile_by_own_time(loop, batches * 20, pattern=r"trainloop|attr", top=top)
    finish_all({"trainloop": loop})
    return profile


# -- the report --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="micro-steps per variant per round")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved rounds (medians over these)")
    parser.add_argument("--import-runs", type=int, default=7, help="fresh interpreters per import timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: the overhead is single-threaded Python, "
                             "and one thread keeps the other cores' noise out)")
    parser.add_argument("--quick", action="store_true", help="tiny numbers for a smoke run")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the trainloop loop")
    args = parser.parse_args()
    if min(args.steps, args.rounds, args.import_runs, args.threads) < 1:
        parser.error("--steps, --rounds, --import-runs and --threads must be >= 1")
    if args.quick:
        args.steps, args.rounds, args.import_runs = 8, 2, 1
    accumulations = (1, 4)
    args.steps = round_up(args.steps, max(accumulations))  # whole windows only
    torch.set_num_threads(args.threads)
    batches = classification_batches(args.steps)

    print(f"trainloop {tl.__version__} overhead, torch {torch.__version__}, {args.threads} thread(s): "
          f"MLP {IN_FEATURES}-{HIDDEN}-{CLASSES}, batch {BATCH_SIZE}, AdamW; "
          f"{args.steps} micro-steps x {args.rounds} interleaved rounds, medians")
    print(TABLE_HEADER)
    trainloop_ratios, tracked_ratios, notes = {}, {}, set()
    with tempfile.TemporaryDirectory() as metrics_files:
        for accumulate in accumulations:
            loops, skipped = available_variants(accumulate, metrics_files)
            notes.update(skipped)
            times = measure(loops, batches, args.rounds, warmup=1 if args.quick else 3)
            finish_all(loops)
            for name, per_step, ratio, spread in step_rows(times):
                print(f"{accumulate:>10}  {name:<22}{ratio_cells(per_step, ratio, spread)}")
                if name == "trainloop":
                    trainloop_ratios[accumulate] = ratio, spread
            tracked_ratios[accumulate] = ratio_summary(times[TRACKED], times[RAW_TRACKED])[1:]
    print("  us/step: median time per micro-step (batch); vs raw: median of the per-round ratios; "
          "spread: the lowest and highest of them")
    for note in sorted(notes):
        print(f"  note: {note}")

    print(f"\nimport time on top of `import torch` (fresh interpreters, median of {args.import_runs}):")
    with tempfile.TemporaryDirectory() as scratch:
        compiled, source, empty = (os.path.join(scratch, name) for name in ("compiled", "source", "empty"))
        os.mkdir(empty)
        probes = {"trainloop": ("trainloop", installed_copy(compiled, compiled=True)),
                  "trainloop, no .pyc cache": ("trainloop", installed_copy(source, compiled=False))}
        for module in ("accelerate", "lightning.fabric"):
            if importlib.util.find_spec(module.split(".")[0]) is not None:
                probes[module] = (module, None)
        # Started in an empty directory: from the repository, `import trainloop` finds ./trainloop.
        imports = import_times(probes, args.import_runs, cwd=empty)
    for label, milliseconds in imports.items():
        print(f"  {label:<26}{milliseconds:>8.1f} ms")

    print("\ntargets:")
    for accumulate, (ratio, spread) in trainloop_ratios.items():
        print(target_line(f"per-step, accumulate {accumulate}", ratio, STEP_TARGET, spread=spread))
    for accumulate, (ratio, spread) in tracked_ratios.items():
        print(target_line(f"per-step with JSONLines, accumulate {accumulate}", ratio, TRACKER_TARGET,
                          RAW_TRACKED, spread=spread))
    trainloop_import = imports["trainloop"]
    verdict = "meets" if trainloop_import <= IMPORT_TARGET_MS else "MISSES"
    print(f"  import trainloop: +{trainloop_import:.1f} ms ({verdict} <= {IMPORT_TARGET_MS:.0f} ms)")
    if args.quick:
        print(quick_note("steps and runs"))

    if args.profile:
        print("\ncProfile of the trainloop loop, accumulate 1, by own time:")
        print(profile_trainloop(batches, accumulate=1, top=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())

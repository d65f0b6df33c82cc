"""Per-step overhead of trainloop against a plain PyTorch loop, Accelerate and Lightning Fabric.

    python benchmarks/overhead.py                 # the full run (~1.5 minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # a smoke run: small numbers, same code paths
    python benchmarks/overhead.py --profile       # also: calls per step, and where trainloop's time goes

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

`--profile` adds two load-independent views: the Python function calls (and C function calls
made from Python) per micro-step of each variant, counted with `sys.setprofile` — a number that
does not move with the machine's load, unlike the timings — and a cProfile of the trainloop loop
with JSONLines attached (its frames by cumulative time, then by own time).

Targets, in every round: trainloop's per-step time <= 1.02x raw PyTorch, and <= 1.03x with a
tracker attached (against the raw loop that writes its metrics too); `import trainloop` adds
<= 15 ms to `import torch`. Timings are printed, never asserted: the exit code is 0.
"""

from __future__ import annotations

import argparse
import collections
import compileall
import cProfile
import importlib.util
import io
import json
import os
import pstats
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


def calls_per_step(loop: Loop, batches: list) -> tuple[float, float]:
    """(Python function calls, C function calls made from Python) per micro-step of one run of
    `loop` over `batches` (after a warm-up run), counted with `sys.setprofile`. Unlike a time,
    the count does not depend on the machine's load; a C call (a tensor op included) counts once
    whatever it costs, so read it beside the timings, not instead of them."""
    loop(batches)
    counts = collections.Counter()

    def count(frame, event, arg):
        counts[event] += 1

    sys.setprofile(count)
    try:
        loop(batches)
    finally:
        sys.setprofile(None)
    return counts["call"] / len(batches), counts["c_call"] / len(batches)


def call_rows(accumulate: int, batches: list, scratch: str) -> list[str]:
    """One line per variant (raw, trainloop, each with and without its JSON lines): calls per
    micro-step and the difference to the raw loop that does the same logging."""
    loops = {"raw PyTorch": raw_pytorch(accumulate), "trainloop": trainloop_loop(accumulate),
             RAW_TRACKED: raw_with_json_lines(accumulate, os.path.join(scratch, f"calls-raw-{accumulate}.jsonl")),
             TRACKED: trainloop_with_json_lines(accumulate, os.path.join(scratch, f"calls-tl-{accumulate}.jsonl"))}
    counted = {name: calls_per_step(loop, batches) for name, loop in loops.items()}
    finish_all(loops)
    baseline = {"raw PyTorch": "raw PyTorch", "trainloop": "raw PyTorch", RAW_TRACKED: RAW_TRACKED, TRACKED: RAW_TRACKED}
    rows = []
    for name, (python, c) in counted.items():
        base_python, base_c = counted[baseline[name]]
        rows.append(f"{accumulate:>10}  {name:<22}{python:>9.1f}{python - base_python:>+8.1f}"
                    f"{c:>9.1f}{c - base_c:>+8.1f}")
    return rows


def profile_trainloop(batches: list, accumulate: int, top: int, scratch: str) -> str:
    """cProfile of the trainloop loop with JSONLines attached (the report path included): the
    frames of trainloop and of its callbacks by cumulative time, then by own time. The profiler
    inflates small Python calls; read it for where, not for how much."""
    loop = trainloop_with_json_lines(accumulate, os.path.join(scratch, "profiled.jsonl"))
    loop(batches)  # warm up outside the profile
    profiler = cProfile.Profile()
    profiler.runcall(loop, batches * 20)
    finish_all({TRACKED: loop})
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    for order in ("cumulative", "tottime"):
        out.write(f"-- by {order}\n")
        stats.sort_stats(order).print_stats(r"trainloop|callbacks|contextlib", top)
    return out.getvalue()


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
        print("\nfunction calls per micro-step (sys.setprofile; independent of the machine's load):")
        print(f"{'accumulate':>10}  {'variant':<22}{'Python':>9}{'vs raw':>8}{'C':>9}{'vs raw':>8}")
        # Counted over 200 micro-steps whatever --steps is: whole logging periods (reports
        # included), after a warm-up run that made the first report (the tracker's start).
        counted_batches = classification_batches(round_up(200, LOG_EVERY * max(accumulations)))
        with tempfile.TemporaryDirectory() as scratch:
            for accumulate in accumulations:
                print("\n".join(call_rows(accumulate, counted_batches, scratch)))
            print("  vs raw: against raw PyTorch; the JSON lines rows against the raw loop writing JSON lines")
            print("\ncProfile of trainloop + JSONLines, accumulate 1 (trainloop's and the callbacks' frames):")
            print(profile_trainloop(batches, accumulate=1, top=15, scratch=scratch))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the benchmarks share: interleaved timing rounds, per-round ratios, table cells and target
lines, the small MLP and its batches, and trainloop's loop as users write it.

Kept in one place so that every benchmark measures and reports the same way: a fix to the
statistics or to the round order then reaches all of them. Each benchmark imports this as
`common` after putting its own directory on sys.path (see the top of any of them).
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import trainloop as tl

Loop = Callable[[list], None]  # runs the micro-steps of one list of batches
T = TypeVar("T")

# Nanoseconds per unit, for `time_per_step`.
US, MS, S = 1e3, 1e6, 1e9

# The tiny classifier of overhead.py and ddp.py: a step costs a few hundred us, almost all of it
# Python and dispatch, so a framework's per-step bookkeeping shows up instead of hiding behind
# the matmuls.
IN_FEATURES, HIDDEN, CLASSES, BATCH_SIZE = 64, 128, 10, 16
LOG_EVERY = 10  # trainloop's default `log_every`: the raw loops reduce their losses as often


# -- models and data ---------------------------------------------------------------------------


def build_mlp() -> nn.Module:
    """MLP IN_FEATURES-HIDDEN-CLASSES, seeded: every variant starts from the same weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def classification_batches(count: int, *, rank: int = 0, features: int = IN_FEATURES, classes: int = CLASSES,
                           batch_size: int = BATCH_SIZE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (inputs, class labels) batches, already in memory (no DataLoader: its collation
    would dwarf the differences measured). Seeded by rank: each rank gets its own shard."""
    generator = torch.Generator().manual_seed(1 + rank)
    return [(torch.randn(batch_size, features, generator=generator),
             torch.randint(0, classes, (batch_size,), generator=generator)) for _ in range(count)]


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


class LossLog:
    """What a hand-written loop does for logging: keep the detached losses (no host sync), and
    reduce them to one mean every LOG_EVERY optimizer steps (where a tracker would get it).
    With `synced`, that mean is also averaged across ranks (one all-reduce), as `tl.log` does."""

    def __init__(self, synced: bool = False):
        self.synced = synced
        self.losses: list[torch.Tensor] = []
        self.steps = 0
        self.last_mean: torch.Tensor | None = None

    def micro_step(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())

    def optimizer_step(self) -> None:
        self.steps += 1
        if self.steps % LOG_EVERY == 0:
            mean = torch.stack(self.losses).mean()
            self.losses.clear()
            if self.synced:
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            self.last_mean = mean


def trainloop_loop(accumulate: int, callbacks: Sequence[Any] = ()) -> Loop:
    """trainloop's loop on `build_mlp`, as users write it (the README's loop). Under a process
    group (ddp.py's workers) `tl.init` joins it and the model is wrapped in DDP."""
    state = tl.init(accumulate=accumulate, seed=0, callbacks=callbacks)
    model = build_mlp()
    state, model, optimizer = tl.prepare(state, model, adamw(model))

    def run(batches):
        nonlocal state
        # `accumulate` enters DDP's no_sync off the window's end (when distributed); `step`
        # normalises the summed gradients by 1/k once per window; `log` buffers the loss tensor,
        # reducing it (across ranks, when distributed) every log_every steps.
        for x, y in batches:
            with tl.accumulate(state, model):
                loss = F.cross_entropy(model(x), y)
                state = tl.backward(state, loss)
            state = tl.step(state, optimizer)
            state = tl.log(state, loss=loss)

    run.finish = lambda: tl.finish(state)  # type: ignore[attr-defined]  (see `finish_all`)
    return run


def finish_all(loops: dict[str, Loop]) -> None:
    """End the trainloop runs among `loops` (a run left unfinished is finished at exit, warning)."""
    for loop in loops.values():
        finish = getattr(loop, "finish", None)
        if finish is not None:
            finish()


# The peers, each as its own documentation writes the loop.
PEERS_NEED = {"Accelerate": "accelerate", "Lightning Fabric": "lightning"}


def accelerate_loop(accumulate: int) -> Loop:
    """Accelerate's documented loop. Under a process group (ddp.py's workers) Accelerate joins it
    and wraps the model in DDP."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    model = build_mlp()
    model, optimizer = accelerator.prepare(model, adamw(model))
    log = LossLog()

    def run(batches):
        # Accelerate's documented loop: `backward` scales the loss by 1/k; the wrapped optimizer's
        # step and zero_grad are called every micro-step and do nothing off the window's end.
        for x, y in batches:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            log.micro_step(loss)
            if accelerator.sync_gradients:
                log.optimizer_step()

    return run


def fabric_loop(accumulate: int) -> Loop:
    """Lightning Fabric's documented loop. Under a process group (ddp.py's workers, started by
    torch's elastic launcher) it is Fabric's DDP strategy over that group."""
    from lightning.fabric import Fabric

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1:
        fabric = Fabric(accelerator="cpu", devices=world_size, strategy="ddp")
        fabric.launch()  # processes started outside: this only sets Fabric up in this one
    else:
        fabric = Fabric(accelerator="cpu", devices=1)
    model = build_mlp()
    model, optimizer = fabric.setup(model, adamw(model))
    log = LossLog()
    micro_steps = 0

    def run(batches):
        nonlocal micro_steps
        # Fabric's documented accumulation: the user counts micro-steps, skips the gradient sync
        # off the window's end with `no_backward_sync`, and scales the loss by 1/k.
        for x, y in batches:
            micro_steps += 1
            at_window_end = micro_steps % accumulate == 0
            with fabric.no_backward_sync(model, enabled=not at_window_end):
                loss = F.cross_entropy(model(x), y)
                fabric.backward(loss / accumulate if accumulate > 1 else loss)
            log.micro_step(loss)
            if at_window_end:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                log.optimizer_step()

    return run


def peer_variants(accumulate: int) -> tuple[dict[str, Loop], list[str]]:
    """Accelerate's and Fabric's loops where installed, and a note for each one skipped."""
    import importlib.util
    import warnings

    factories = {"Accelerate": accelerate_loop, "Lightning Fabric": fabric_loop}
    loops, notes = {}, []
    for name, factory in factories.items():
        needs = PEERS_NEED[name]
        if importlib.util.find_spec(needs) is None:
            notes.append(f"{name} skipped: {needs} is not installed (pip install -e '.[bench]')")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # start-up chatter about CPU-only runs
            loops[name] = factory(accumulate)
    return loops, notes


# -- measuring ---------------------------------------------------------------------------------


def rotated(names: Sequence[T], round_index: int) -> Sequence[T]:
    """The order of round `round_index`: A B C, then B C A, ...: none always runs first, so the
    machine's warming up or slowing down within a round hits every variant alike."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def time_per_step(loop: Loop, batches: list, *, unit: float,
                  synchronize: Callable[[], None] | None = None) -> float:
    """Time per batch of one run of `loop` over `batches`, in `unit` (US, MS or S). `synchronize`
    (e.g. torch.cuda.synchronize) runs inside the timed span, so queued device work counts."""
    gc.collect()  # every timed segment starts with no garbage (cheap after gc.freeze)
    start = time.perf_counter_ns()
    loop(batches)
    if synchronize is not None:
        synchronize()
    return (time.perf_counter_ns() - start) / len(batches) / unit


def wall_and_cpu_per_step(loop: Loop, batches: list, *, unit: float) -> tuple[float, float]:
    """(wall-clock, this thread's CPU) time per batch of one run of `loop` over `batches`, in
    `unit`, on every rank of a process group: a barrier, not timed, starts the ranks together.
    The CPU time is the loop's own work, mostly without the waits for collectives (gloo runs them
    in threads of its own) and for other processes: it stays readable on a busy machine."""
    gc.collect()  # every timed segment starts with no garbage (cheap after gc.freeze)
    dist.barrier()
    start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
    loop(batches)
    wall, cpu = time.perf_counter_ns() - start, time.thread_time_ns() - start_cpu
    return wall / len(batches) / unit, cpu / len(batches) / unit


def interleaved_rounds(loops: dict[str, Loop], batches: list, rounds: int, warmup: int,
                       timer: Callable[[Loop, list], T], *, freeze_gc: bool = False,
                       after_warmup: Callable[[], None] | None = None) -> dict[str, list[T]]:
    """{name: [timer(loop, batches) per round]}: `warmup` untimed runs of every loop, then
    `rounds` rounds that each time every loop once, in the rotating order of `rotated`. Timing
    the variants within the same round lets the report take per-round ratios, which cancel the
    machine's slow drift."""
    names = list(loops)
    if freeze_gc:
        # Move everything alive now (torch and the frameworks: 100k-400k objects) out of the
        # collector's reach. A full collection then costs microseconds instead of a ~0.1-0.4 s
        # that would land in a random variant's segment; the loops' own garbage is still collected.
        gc.freeze()
    for _ in range(warmup):
        for name in names:
            loops[name](batches)
    if after_warmup is not None:
        after_warmup()
    times: dict[str, list[T]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in rotated(names, round_index):
            times[name].append(timer(loops[name], batches))
    return times


def profile_by_own_time(function: Callable[..., Any], *args: Any, pattern: str, top: int) -> str:
    """cProfile of `function(*args)`: the `top` functions matching `pattern`, by own time. The
    profiler inflates small Python calls; read it for where, not for how much."""
    profiler = cProfile.Profile()
    profiler.runcall(function, *args)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(pattern, top)
    return out.getvalue()


# -- the report --------------------------------------------------------------------------------


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); a single value is all three."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


Spread = tuple[float, float]  # (lowest, highest) per-round ratio


def ratio_summary(values: list[float], baseline: list[float]) -> tuple[float, float, Spread]:
    """(median of `values`, median ratio to `baseline`, (lowest, highest) ratio of any round). The
    ratios are paired within each round (values[i] / baseline[i]): that cancels the drift. The
    spread is the whole range, not a quartile range: a goal "in every run" must hold at its top."""
    ratios = [value / base for value, base in zip(values, baseline)]
    return statistics.median(values), statistics.median(ratios), (min(ratios), max(ratios))


def spread_text(spread: Spread) -> str:
    low, high = spread
    return f"{low:.3f}-{high:.3f}"


def ratio_cells(median: float, ratio: float, spread: Spread, *, width: int = 9, digits: int = 1) -> str:
    """A row's "time, vs raw, spread (min-max of the rounds)" columns, in the layout every table shares."""
    return f"{median:>{width}.{digits}f}{ratio:>8.3f}x  {spread_text(spread):>11}"


def round_up(count: int, multiple: int) -> int:
    """`count` rounded up to a multiple: whole accumulation windows or logging periods only."""
    return -(-count // multiple) * multiple


def target_line(label: str, ratio: float, target: float, baseline: str = "raw",
                spread: Spread | None = None) -> str:
    """One line of a "targets:" section: the median ratio, the range of the rounds when given, and
    whether the target is met at the median and in every round."""
    verdict = "meets" if ratio <= target else "MISSES"
    if spread is None:
        return f"  {label}: {ratio:.3f}x {baseline} ({verdict} <= {target}x)"
    if ratio > target:
        return f"  {label}: {ratio:.3f}x {baseline}, rounds {spread_text(spread)} (MISSES <= {target}x at the median)"
    every = "and in every round" if spread[1] <= target else f"but not in every round (worst {spread[1]:.3f}x)"
    return f"  {label}: {ratio:.3f}x {baseline}, rounds {spread_text(spread)} (meets <= {target}x at the median {every})"


def quick_note(what: str = "steps and rounds") -> str:
    """The caveat printed under the targets of a --quick run."""
    return f"  (--quick: too few {what} for these numbers to mean anything)"

"""The functions called every micro-step: accumulate, backward, step, log.

They are the hot path, so they do the least they can: a run with no callbacks and
`accumulate=1` pays a few attribute reads and one record copy per call.

Exact accumulation. `backward` lets gradients accumulate unnormalised; `step` normalises them
once, at the window's end, by the window's real size:

- without `num_items`: by the number of micro-batches in the window (`accumulate`, or fewer
  for the short window at an epoch's end). Each micro-batch loss is a mean, so the update is
  the mean over micro-batches; across ranks DDP already averages.
- with `num_items` (the loss a *sum* over items, e.g. tokens): by the window's total items over
  all ranks. DDP averages over ranks, i.e. divides the summed gradient by world_size, so the
  factor is `world_size / total_items`. One all-reduce of the count per optimizer step.

Either way, k micro-batches on n ranks give the update of one big batch.

A micro-step is a window position (one micro-batch), not a `backward` call: several `backward`
calls in one micro-step (two losses, two models) give the plain autograd gradients, and the
normalisation counts micro-steps. Where one begins:

- with `accumulate=1`: every `backward` call until the `step` is one micro-step (the window);
- inside `tl.accumulate(...)`: each call of it opens a micro-step, which every `backward` until
  the next `tl.accumulate` or `tl.step` call joins;
- otherwise (`accumulate > 1` without `tl.accumulate`): each `backward` call is one; several
  losses of one micro-batch are then one `backward` of their sum.

`num_items` sums over every `backward` call of the window, whatever its micro-step.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from operator import itemgetter
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainloop.collectives import collective_device
from trainloop.forwarding import unwrap
from trainloop.optimizers import (
    chosen_schedulers,
    narrowed,
    normalise_gradients,
    raise_no_optimizer,
    refuse_untracked_gradients,
    registered,
    step_schedulers,
    step_with_closure,
    zero_grads,
)
from trainloop.state import RunState, raise_stale


class _NothingToDo:
    """A context manager that does nothing, made of C functions: `with` looks its methods up
    on the class and, as neither is a descriptor, calls them unbound, so entering and leaving
    cost no Python call (`contextlib.nullcontext` costs two, on every micro-step).
    `__enter__` is `NoneType()`, which returns None; `__exit__(type, value, traceback)` is
    `"".format(...)`, which returns "": falsy, so an exception inside propagates."""

    __enter__ = type(None)
    __exit__ = "".format


_NOTHING_TO_DO: Any = _NothingToDo()


def accumulate(state: RunState, model: nn.Module | None = None) -> contextlib.AbstractContextManager:
    """Context manager around a micro-step's forward and backward.

    On every micro-step but the window's last it turns off gradient synchronisation across ranks
    (the strategy's `no_sync`: DDP `no_sync`, FSDP `set_requires_gradient_sync(False)`) for
    `model`, or for every prepared model when None; gradients then accumulate locally and are
    synchronised once, on the last micro-step. A window also closes at the last batch of a
    prepared loader's epoch. On one process there is nothing to synchronise.

    Each call opens one micro-step: every `backward` until the next `accumulate` or `step` call
    is part of it (see the module doc). `model` is a model `prepare` returned, or the user's
    module inside one; any other module raises ValueError (its sync could not be turned off).
    """
    lineage = state.lineage
    lineage.grouping, lineage.counted = True, False
    if model is not None and model not in state.models:
        model = prepared_model(state, model, "accumulate")
    if state.topology.world_size == 1 or state.sync_now:
        return _NOTHING_TO_DO
    return state.strategy.no_sync(state.models if model is None else (model,))


def no_sync(state: RunState, model: nn.Module | None = None, *, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Context manager: no gradient synchronisation across ranks inside, when `enabled`.

    For loops that decide accumulation themselves (Lightning Fabric's `no_backward_sync`): keep
    `accumulate=1`, run the micro-batches that must not sync under `no_sync(state, model)`, the
    last one with `enabled=False` (it synchronises everything accumulated), then `tl.step`. The
    gradients are then the plain sum of the `backward` calls (scale each loss yourself), as with
    Fabric. It does not count micro-steps; `tl.accumulate` does both for you. `model`: as in
    `accumulate` (None: every prepared model). On one process it does nothing.
    """
    if model is not None and model not in state.models:
        model = prepared_model(state, model, "no_sync")
    if not enabled or state.topology.world_size == 1:
        return _NOTHING_TO_DO
    return state.strategy.no_sync(state.models if model is None else (model,))


def prepared_model(state: RunState, model: nn.Module, caller: str) -> nn.Module:
    """The prepared model that is `model` or wraps it; ValueError for a module never prepared."""
    for candidate in state.models:
        if candidate is model or unwrap(candidate) is model:
            return candidate
    raise ValueError(
        f"tl.{caller} was given a {type(model).__name__} that was not prepared in this run, so its "
        "gradient sync cannot be turned off: pass the model tl.prepare returned (or leave model "
        "out: every prepared model)"
    )


def backward(state: RunState, loss: torch.Tensor, *, num_items: Any = None) -> RunState:
    """Backpropagate `loss` (after the `on_backward` hooks, e.g. loss scaling); count the micro-step.

    `loss` is a scalar: a mean over the micro-batch, or — with `num_items` — a sum over the
    micro-batch's `num_items` items (an int or a tensor, e.g. the number of non-padding tokens;
    it may differ per rank and per micro-batch). Give `num_items` on every micro-step of a window
    or on none. Returns the new state, and `state` becomes stale (see `trainloop.state.Lineage`).
    """
    if state.generation != state.lineage.generation:
        raise_stale(state, "backward")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"backward needs a scalar loss tensor (got {shape}): reduce it with .mean() or .sum()"
        )
    if not loss.requires_grad:
        raise ValueError(
            "backward got a loss that does not require grad: it was computed under "
            "torch.no_grad() or detached, or the model has no trainable parameters"
        )
    items = state.window_items
    if (num_items is None) != (items is None) and state.window_micro_steps:
        raise ValueError(
            "num_items was given on some micro-steps of this accumulation window and not on "
            "others: pass num_items to every backward call of a window, or to none"
        )
    if num_items is not None:
        items = num_items if items is None else items + num_items
    for hook in state.hooks.on_backward:
        loss = hook(state, loss)
    if state.config.mesh.loss_parallel:  # torch's loss_parallel() must cover the backward too
        from trainloop.strategies.tensor_parallel import loss_parallel

        with loss_parallel(state):
            loss.backward()
    else:
        loss.backward()
    # Does this backward begin a micro-step, or join the open one? (the module doc's rule)
    lineage = state.lineage
    window = state.window_micro_steps
    if not window:
        new = 1
    elif state.config.accumulate == 1:
        new = 0
    elif lineage.grouping:
        new = 0 if lineage.counted else 1
    else:
        new = 1
    lineage.counted = True
    return state.advance(
        "backward",
        micro_step=state.micro_step + new,
        window_micro_steps=window + new,
        window_items=items,
    )


def step(state: RunState, optimizer: Any = None, scheduler: Any = None, *,
         closure: Callable[[], torch.Tensor] | None = None) -> RunState:
    """At the accumulation window's end, take one optimizer step; elsewhere return `state`.

    At the end of a window, in this order: normalise the gradients by the window's size (see
    the module doc); `on_before_step` hooks (unscale and skip on overflow, clip), which see the
    optimizers being stepped as `state.stepping`; the step of each of them that no hook skipped
    (`skip_step` skips all); `zero_grad(set_to_none=True)` of each; the step of the schedulers
    of the optimizers that really stepped; `state.step += 1` (if any stepped); `on_step` hooks.

    `optimizer` is one prepared optimizer, a sequence of them, or None for every prepared one.
    Several optimizers (a GAN's) are stepped by one call, or each by its own call: hooks act on
    exactly the optimizers of the call. `scheduler` is one prepared scheduler, a sequence, or
    None for the prepared schedulers of the optimizers stepped.

    A closure optimizer (`torch.optim.LBFGS`) takes its step with `closure=`: a function of no
    arguments that computes and returns the loss (a mean), without calling backward. The
    optimizer calls it as often as it needs; each time trainloop zeroes the gradients, runs
    the `on_backward` hooks and the backward (synchronised across ranks), and hands the
    optimizer the loss averaged across ranks, so that every rank takes the same decisions and
    n ranks take one process's step over the global batch. It is one whole step: no
    `tl.backward` before it, `accumulate=1`, no `on_before_step` hooks (clip in the closure).

    Raises RuntimeError when the window is empty but the optimizers' parameters have gradients
    (a `loss.backward()` that `tl.backward` did not see would leak into the next step).
    """
    lineage = state.lineage
    if state.generation != lineage.generation:
        raise_stale(state, "step")
    if not state.optimizers:
        raise_no_optimizer(state)
    lineage.grouping = False  # a step call closes the open micro-step
    if closure is not None:
        return step_with_closure(state, optimizer, scheduler, closure)
    in_window = state.window_micro_steps
    # (`state.loaders and`: no property call off a window's end when no loader was prepared)
    if in_window < state.config.accumulate and not (in_window and state.loaders and state.at_epoch_end):
        if not in_window:
            refuse_untracked_gradients(state, optimizer)
        return state
    if not lineage.data_checked:
        _warn_without_prepared_loader(state)
    optimizers = state.optimizers
    if optimizer is not None and not (len(optimizers) == 1 and optimizer is optimizers[0]):
        optimizers = registered(optimizer, optimizers, "optimizer")  # (the one optimizer: no call)
    schedulers = state.schedulers if scheduler is None else chosen_schedulers(scheduler, state, optimizers)
    if in_window > 1 or state.window_items is not None:  # else the gradients are already the mean
        normalise_gradients(state, optimizers)
    hooks = state.hooks
    if hooks.on_before_step or hooks.on_step:
        return _step_with_hooks(state, hooks, optimizers, schedulers)
    lineage.stepping = True  # lets the step pre-hook (`guard_optimizer`) pass; not a context manager: cheaper
    try:
        for opt in optimizers:  # no hooks: every optimizer of the call steps
            opt.step()
    finally:
        lineage.stepping = False
    try:  # `zero_grads`, inlined
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    except TypeError:
        zero_grads(optimizers)
    if schedulers:
        step_schedulers(schedulers, optimizers)
    return state.advance("step", step=state.step + 1, window_micro_steps=0, window_items=None)


def _warn_without_prepared_loader(state: RunState) -> None:
    """Once per run, at its first optimizer step: several processes and no prepared loader
    most likely means every rank reads all the data, each training on the same batches."""
    state.lineage.data_checked = True
    if state.world_size > 1 and not state.loaders and state.is_main:
        import warnings

        warnings.warn(
            f"this run has {state.world_size} processes but no prepared DataLoader: a DataLoader that "
            "was not passed to tl.prepare gives every rank all the data, so each trains on the same "
            "batches. Pass it to tl.prepare (`state, model, optimizer, loader = tl.prepare(state, model, "
            "optimizer, loader)`) and iterate over the loader it returns; if each rank already reads "
            "a shard of its own, ignore this warning", UserWarning, stacklevel=3)


def _step_with_hooks(state: RunState, hooks: Any, optimizers: tuple, schedulers: tuple) -> RunState:
    state = state.evolve(stepping=optimizers)
    for hook in hooks.on_before_step:
        state = hook(state) or state
    stepped = () if state.skip_step else narrowed(state.stepping, optimizers)
    lineage = state.lineage
    lineage.stepping = True
    try:
        for opt in stepped:
            opt.step()
    finally:
        lineage.stepping = False
    zero_grads(optimizers)
    if not stepped:
        return state.advance("step", window_micro_steps=0, window_items=None, skip_step=False, stepping=())
    step_schedulers(schedulers, stepped)
    state = state.advance("step", step=state.step + 1, window_micro_steps=0, window_items=None,
                          stepping=stepped)
    for hook in hooks.on_step:
        state = hook(state) or state
    return state.evolve(stepping=())


def log(state: RunState, metrics: dict[str, Any] | None = None, *, step: int | None = None,
        **values: Any) -> RunState:
    """Buffer scalar metrics; every `log_every` optimizer steps, report their means.

    With `step=`, the values are reported at once at that step, not buffered (an evaluation's
    metrics): every rank calls it, with the same step; the means across ranks go to `on_log`.
    Reports reach the trackers in step order, so `step` lies between the run's last report and
    `state.step`.

    Values are scalar tensors (kept on the device: no host sync here) or numbers. When
    `log_every` steps have passed since the last report, the buffered values are averaged over
    the calls and across ranks (one collective) and the `on_log` hooks get plain floats on the
    main process; `tl.finish` reports what is still buffered. Every rank must log the same
    names by each report: the names are checked across ranks, and ranks that logged different
    ones raise the same ValueError, naming each rank's names, never a hang or a mixed-up value.
    A name logged a different number of times on different ranks is averaged over all its
    values. NaN and inf are reported as they are.
    """
    if state.generation != state.lineage.generation:
        raise_stale(state, "log")
    if metrics:
        values = {**metrics, **values}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"log: {name} must be a scalar (got a tensor of shape {tuple(value.shape)})")
            # Detached: a buffered value must not keep its autograd graph alive until the report.
            value = value.detach()
            # A DTensor (the loss under loss_parallel): its plain value, which the reduction takes.
            # (`type(...) is` first: a plain tensor, every step, skips a failing attribute lookup.)
            full = None if type(value) is torch.Tensor else getattr(value, "full_tensor", None)
            values[name] = full() if full is not None else value
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"log: {name} must be a number or a scalar tensor (got {type(value).__name__})")
    if step is not None:
        return _report_at(state, values, step)
    pending = (values, state.pending_logs)
    every = state.config.log_every  # `report_due`, inlined: it runs every step
    if state.step // every > state.logged_step // every:
        # Advanced only once reported: a report that raises (names that differ across ranks)
        # leaves `state` the current one.
        reported = state.evolve(pending_logs=None, logged_step=state.step)  # `flush_logs`, one copy less
        _report(reported, pending)
        return reported.advance("log")
    return state.advance("log", pending_logs=pending)


def _report_at(state: RunState, values: dict[str, Any], step: Any) -> RunState:
    """`log(..., step=)`: report `values` now, at `step`; the buffer and the schedule stay as they are."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"log: step must be an integer (got {type(step).__name__})")
    if step > state.step:
        raise ValueError(f"log: step={step} is after the run's step ({state.step}): the run's own reports "
                         "up to it would come after it; log at a step the run has reached")
    last = state.lineage.reported_step
    if last is not None and step < last:
        raise ValueError(f"log: step={step} is before the last report (step {last}): trackers record steps "
                         f"in order (W&B drops earlier ones); log at step {last} or later, or log the "
                         "x value as a metric of its own (epoch=...)")
    flush_logs(state.evolve(pending_logs=(values, None), step=step))
    return state.advance("log")


def report_due(state: RunState) -> bool:
    """Whether the next `log` call reports: the step count crossed a multiple of `log_every`
    since the last report (the same steps whether or not the run was resumed in between)."""
    every = state.config.log_every
    return state.step // every > state.logged_step // every


def add_to_report(state: RunState, metrics: dict[str, float]) -> RunState:
    """The state with `metrics` buffered for the next report, as if logged (for callbacks: an
    `on_step` hook returns it). Unlike `log` it never reports and does not supersede `state`."""
    return state.evolve(pending_logs=(dict(metrics), state.pending_logs))


def flush_logs(state: RunState, *, every_rank: bool = False) -> RunState:
    """Report the buffered metrics now, at `state.step` (`log` calls this; so does `finish`).

    `every_rank`: every rank calls this now (`finish`), so a rank with nothing buffered still
    takes part, with no names: a rank that logged a last value alone gets the names error, not
    a hang.

    Across ranks, the per-name sums and counts travel in one all-reduce. The metric names are
    checked inside it: a rank whose names are those of the last report (which every rank agreed
    on) adds 0 to a flag element, any other rank adds 1 (and zeros for the values). A flag that
    comes back 0 proves that every rank logged the agreed names; otherwise (and at the first
    report, or after a change of names) the ranks compare (count, hash) of their names in one
    fixed-size all-gather, which cannot hang whatever the names, and then either all raise the
    same error naming each rank's names, or all report the new names.
    """
    node = state.pending_logs
    state = state.evolve(pending_logs=None, logged_step=state.step)
    _report(state, node, every_rank)
    return state


def _report(state: RunState, node: Any, every_rank: bool = False) -> None:
    """`flush_logs`' report of the buffer `node` (a `PendingLogs` list), `state` being the
    flushed state that the `on_log` hooks get. Called by `log` directly: one state copy less."""
    world_size = state.topology.world_size
    hooks = state.hooks.on_log
    if world_size == 1 and not hooks:
        # One process and no on_log hook: no rank to agree with and no one to receive the
        # means, so the buffer is dropped unread. Averaging it (five tensor ops and a host
        # copy) was the largest part of trainloop's per-step cost in the overhead benchmark.
        return
    entries = []
    while node is not None:
        values, node = node
        entries.append(values)
    if not entries and not (every_rank and world_size > 1):
        return
    entries.reverse()
    names = sorted(set().union(*entries))  # not a comprehension: no Python frame per report
    device = collective_device(state)
    sums, counts = _summed(entries, names, device)
    if world_size > 1:
        totals, counts = _reduce_across_ranks(state, tuple(names), sums, counts, device)
    else:
        totals = sums.tolist()  # the report's one host sync
    if names:
        state.lineage.reported_step = state.step  # the same on every rank: `log(step=)` checks it
    if names and hooks and state.topology.rank == 0:  # the main process only
        metrics = {}
        for name, total, count in zip(names, totals, counts):
            metrics[name] = total / count
        for hook in hooks:
            hook(state, metrics)


def _summed(entries: list[dict[str, Any]], names: list[str],
            device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Per name (in `names`' order), the float32 sum of its logged values, as one tensor, and
    how many values it has. When every entry holds every name as a tensor (a loop logging the
    same metrics each step) that is one stack and one sum, whatever the numbers of names and
    values; otherwise one stack and one sum per name."""
    count = len(entries)
    if names:
        values: list[Any] = []
        try:
            for name in names:  # name-major; itemgetter: no Python frame per report
                values += map(itemgetter(name), entries)
            stacked = torch.stack(values)
        except (KeyError, TypeError, RuntimeError):  # a name some entries lack, a plain number,
            pass                                     # or scalar shapes () and (1,) mixed
        else:
            summed = stacked.to(device, torch.float32).reshape(len(names), count).sum(1)
            return summed, [count] * len(names)
    sums, counts = [], []
    for name in names:
        series = [entry[name] for entry in entries if name in entry]
        tensors = [v for v in series if isinstance(v, torch.Tensor)]
        plain = float(sum(v for v in series if not isinstance(v, torch.Tensor)))
        if tensors:  # one stack and one sum per name, whatever the number of values
            if len({t.shape for t in tensors}) > 1:  # scalars of shapes () and (1,) mixed
                tensors = [t.reshape(()) for t in tensors]
            total = torch.stack(tensors).to(device, torch.float32).sum()
            sums.append(total + plain if plain else total)
        else:
            sums.append(torch.tensor(plain, device=device, dtype=torch.float32))
        counts.append(len(series))
    if not sums:
        return torch.zeros(0, device=device, dtype=torch.float32), counts
    return torch.stack(sums), counts


def _reduce_across_ranks(state: RunState, names: tuple[str, ...], sums: torch.Tensor, counts: list,
                         device: torch.device) -> tuple[list[float], list[float]]:
    """Every rank's summed values and counts per name, in one all-reduce when the names are the
    agreed ones (see `flush_logs`); raises the same ValueError on every rank when they differ."""
    lineage = state.lineage
    agreed = lineage.log_names
    if agreed is not None:
        if names == agreed:
            tail = torch.tensor([*counts, 0.0], device=device)
            vector = torch.cat([sums, tail])
        else:  # agreed's length, so that the all-reduce matches the other ranks' and completes
            vector = torch.zeros(2 * len(agreed) + 1, device=device)
            vector[-1] = 1.0
        dist.all_reduce(vector)
        values = vector.tolist()
        if values[-1] == 0.0:
            n = len(names)
            return values[:n], values[n:2 * n]
    lineage.log_names = None
    _check_same_names(state, names, device)
    lineage.log_names = names
    if not names:  # every rank agreed that there is nothing to report (a finish after a report)
        return [], []
    vector = torch.cat([sums, torch.tensor(counts, device=device, dtype=torch.float32)])
    dist.all_reduce(vector)
    values = vector.tolist()
    return values[:len(names)], values[len(names):]


def _check_same_names(state: RunState, names: tuple[str, ...], device: torch.device) -> None:
    digest = hashlib.blake2b("\0".join(names).encode(), digest_size=7).digest()
    header = torch.tensor([len(names), int.from_bytes(digest, "big")], dtype=torch.int64, device=device)
    headers = [torch.empty_like(header) for _ in range(state.world_size)]
    dist.all_gather(headers, header)
    if all(torch.equal(h, headers[0]) for h in headers):
        return
    every_rank: list[Any] = [None] * state.world_size
    dist.all_gather_object(every_rank, list(names))  # the failure path only: the names, for the error
    listed = "; ".join(f"rank {rank}: {', '.join(logged) or '(none)'}" for rank, logged in enumerate(every_rank))
    raise ValueError(
        f"log: the ranks logged different metric names for the report at step {state.step} ({listed}). "
        "Every rank must log the same names between two reports: log each name on every rank, "
        "or reduce a value only some ranks have with tl.reduce"
    )

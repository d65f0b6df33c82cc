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
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainloop.collectives import collective_device
from trainloop.state import RunState

_NOTHING_TO_DO = contextlib.nullcontext()


def accumulate(state: RunState, model: nn.Module | None = None) -> contextlib.AbstractContextManager:
    """Context manager around a micro-step's forward and backward.

    On every micro-step but the window's last it turns off gradient synchronisation across ranks
    (the strategy's `no_sync`: DDP `no_sync`, FSDP `set_requires_gradient_sync(False)`) for
    `model`, or for every prepared model when None; gradients then accumulate locally and are
    synchronised once, on the last micro-step. A window also closes at the last batch of a
    prepared loader's epoch. On one process there is nothing to synchronise and this does nothing.
    """
    if state.world_size == 1 or state.sync_now:
        return _NOTHING_TO_DO
    return state.strategy.no_sync(state.models if model is None else (model,))


def backward(state: RunState, loss: torch.Tensor, *, num_items: Any = None) -> RunState:
    """Backpropagate `loss` (after the `on_backward` hooks, e.g. loss scaling); count the micro-step.

    `loss` is a scalar: a mean over the micro-batch, or — with `num_items` — a sum over the
    micro-batch's `num_items` items (an int or a tensor, e.g. the number of non-padding tokens;
    it may differ per rank and per micro-batch). Give `num_items` on every micro-step of a window
    or on none.
    """
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
    loss.backward()
    return state.evolve(
        micro_step=state.micro_step + 1,
        window_micro_steps=state.window_micro_steps + 1,
        window_items=items,
    )


def step(state: RunState, optimizer: Any = None, scheduler: Any = None) -> RunState:
    """At the accumulation window's end, take one optimizer step; elsewhere return `state`.

    At the end of a window, in this order: normalise the gradients by the window's size (see
    the module doc); `on_before_step` hooks (unscale and skip on overflow, clip); the optimizer
    step unless a hook set `skip_step`; `zero_grad(set_to_none=True)`; the scheduler step (only
    when the optimizer really stepped); `state.step += 1`; `on_step` hooks.

    `optimizer` and `scheduler` are one prepared object, a sequence of them, or None for every
    prepared one. Several optimizers (a GAN's) are stepped by one call.
    """
    if not state.optimizers:
        raise ValueError("step() needs a prepared optimizer: call tl.prepare(state, model, optimizer) first")
    in_window = state.window_micro_steps
    if in_window < state.config.accumulate and not (in_window and state.at_epoch_end):
        return state
    optimizers = _registered(optimizer, state.optimizers, "optimizer")
    schedulers = _registered(scheduler, state.schedulers, "scheduler")
    _normalise_gradients(state, optimizers)
    for hook in state.hooks.on_before_step:
        state = hook(state) or state
    skipped = state.skip_step
    if not skipped:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if skipped:
        return state.evolve(window_micro_steps=0, window_items=None, skip_step=False)
    for sched in schedulers:
        sched.step()
    state = state.evolve(step=state.step + 1, window_micro_steps=0, window_items=None)
    for hook in state.hooks.on_step:
        state = hook(state) or state
    return state


def _registered(selection: Any, registered: tuple, kind: str) -> tuple:
    if selection is None:
        return registered
    if len(registered) == 1 and selection is registered[0]:
        return registered  # the common case: the one prepared optimizer, checked without a scan
    chosen = tuple(selection) if isinstance(selection, (list, tuple)) else (selection,)
    for obj in chosen:
        if not any(obj is r for r in registered):
            raise ValueError(f"this {type(obj).__name__} was not prepared: pass the {kind} to tl.prepare first")
    return chosen


def _normalise_gradients(state: RunState, optimizers: tuple) -> None:
    items = state.window_items
    if items is None:
        if state.window_micro_steps == 1:
            return  # a window of one micro-batch: the gradients are already the mean
        factor: Any = 1.0 / state.window_micro_steps
    elif state.world_size > 1:
        device = collective_device(state)
        total = torch.as_tensor(items, dtype=torch.float64).to(device)
        dist.all_reduce(total)
        factor = (state.world_size / total).to(torch.float32)
    else:
        factor = 1.0 / items
    grads = [p.grad for opt in optimizers for group in opt.param_groups
             for p in group["params"] if p.grad is not None]
    if not grads:
        return
    if isinstance(factor, torch.Tensor):
        factor = factor.to(grads[0].device)
    state.strategy.scale_grads_(grads, factor)


def log(state: RunState, metrics: dict[str, Any] | None = None, **values: Any) -> RunState:
    """Buffer scalar metrics; every `log_every` optimizer steps, report their means.

    Values are scalar tensors (kept on the device: no host sync here) or numbers. When
    `log_every` steps have passed since the last report, the buffered values are averaged over
    the calls and across ranks (one collective) and the `on_log` hooks get plain floats on the
    main process. Every rank must log the same names. NaN and inf are reported as they are.
    """
    if metrics:
        values = {**metrics, **values}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"log: {name} must be a scalar (got a tensor of shape {tuple(value.shape)})")
            # Detached: a buffered value must not keep its autograd graph alive until the report.
            values[name] = value.detach()
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"log: {name} must be a number or a scalar tensor (got {type(value).__name__})")
    state = state.evolve(pending_logs=(values, state.pending_logs))
    # Report when the step count crosses a multiple of log_every: the same steps whether or not
    # the run was resumed from a checkpoint in between.
    every = state.config.log_every
    if state.step // every > state.logged_step // every:
        state = flush_logs(state)
    return state


def flush_logs(state: RunState) -> RunState:
    """Report the buffered metrics now (`log` calls this; so does `finish`)."""
    entries = []
    node = state.pending_logs
    while node is not None:
        values, node = node
        entries.append(values)
    state = state.evolve(pending_logs=None, logged_step=state.step)
    if not entries:
        return state
    entries.reverse()
    names = sorted({name for entry in entries for name in entry})
    device = collective_device(state)
    sums, counts = [], []
    for name in names:
        series = [entry[name] for entry in entries if name in entry]
        tensors = [v for v in series if isinstance(v, torch.Tensor)]
        plain = float(sum(v for v in series if not isinstance(v, torch.Tensor)))
        if tensors:  # one stack and one sum per name, whatever the number of values
            total = torch.stack(tensors).to(device, torch.float32).sum()
            sums.append(total + plain if plain else total)
        else:
            sums.append(torch.tensor(plain, device=device))
        counts.append(len(series))
    vector = torch.stack(sums)
    if state.world_size > 1:
        dist.all_reduce(vector)  # the sums of every rank: one collective per report
    if state.is_main and state.hooks.on_log:
        metrics = {name: total / (count * state.world_size)
                   for name, total, count in zip(names, vector.tolist(), counts)}
        for hook in state.hooks.on_log:
            hook(state, metrics)
    return state

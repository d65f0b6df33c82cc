"""The optimizers of a run: chosen for a `tl.step` call, stepped by trainloop only, and the
closure optimizers' step (`torch.optim.LBFGS`), and the parts of `tl.step` that act on the
optimizers (zeroing, normalising the window's gradients, the hooks' narrowing).

A prepared optimizer gets a step pre-hook (`guard_optimizer`) that refuses `optimizer.step()`
called by hand: it would train while `state.step` stands still, so checkpoints, logs,
schedulers and progress would never fire. `tl.step` sets its run's `lineage.stepping` around
its steps (a plain attribute: the hook reads it every step); other steps trainloop takes for
itself (DCP's, a closure optimizer's) run inside `stepping()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from trainloop.collectives import collective_device
from trainloop.state import RunState

# True while a trainloop function other than `tl.step`'s own loop steps the optimizers (DCP's
# state creation, a closure optimizer's step): a prepared optimizer's step pre-hook
# (`guard_optimizer`) refuses every other `optimizer.step()`. A context variable, so that two
# runs, threads or tasks side by side never see each other's. `tl.step` itself sets the run's
# `lineage.stepping` instead: a plain attribute is cheaper to set and to read every step.
STEPPING: contextvars.ContextVar[bool] = contextvars.ContextVar("trainloop_stepping", default=False)


@contextlib.contextmanager
def stepping() -> Iterator[None]:
    """Inside, a prepared optimizer's `step()` is trainloop's own: `tl.step`, and DCP, which
    initialises optimizer state by stepping with zero gradients and a zero learning rate."""
    token = STEPPING.set(True)
    try:
        yield
    finally:
        STEPPING.reset(token)


def refuse_untracked_gradients(state: RunState, optimizer: Any) -> None:
    """Raise if the optimizers of a step call with an empty window hold non-zero gradients."""
    optimizers = registered(optimizer, state.optimizers, "optimizer")
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                grad = p.grad
                # Zeros left by a zero_grad(set_to_none=False) are harmless; a sharded gradient
                # (not a plain tensor) is never left by trainloop's own zero_grad.
                if grad is not None and (type(grad) is not torch.Tensor or bool(grad.ne(0).any())):
                    raise RuntimeError(
                        f"tl.step found gradients on the parameters of {type(opt).__name__} but no "
                        "tl.backward since the last step: backpropagate with `state = "
                        "tl.backward(state, loss)`, not `loss.backward()` (trainloop would neither "
                        "count nor normalise them, and they would leak into the next step). To step "
                        "several optimizers after one backward, step them in one call: "
                        "tl.step(state, (optimizer_a, optimizer_b))"
                    )


def zero_grad(optimizer: Any) -> None:
    """`zero_grad(set_to_none=True)`, or plain `zero_grad()` where it takes no `set_to_none` (apex's)."""
    try:
        optimizer.zero_grad(set_to_none=True)
    except TypeError:
        if "set_to_none" in inspect.signature(optimizer.zero_grad).parameters:
            raise
        optimizer.zero_grad()


def guard_optimizer(optimizer: torch.optim.Optimizer, lineage: Any) -> None:
    """Make `optimizer.step()` outside trainloop raise, naming `tl.step` (`prepare` calls this).

    A prepared optimizer stepped by hand trains, but `state.step` never moves, so checkpoints,
    logs, schedulers and progress never fire. After `tl.finish` the optimizer is the user's again.
    """

    def refuse_step_by_hand(opt: Any, args: Any, kwargs: Any) -> None:
        # `lineage.stepping` first: inside `tl.step` (every step) one attribute read decides.
        if not lineage.stepping and not lineage.finished and not STEPPING.get():
            raise RuntimeError(
                f"this {type(opt).__name__} was prepared, and optimizer.step() was called on it "
                "directly: step it with `state = tl.step(state, optimizer)` (a step taken by hand "
                "trains, but state.step never moves, so checkpoints, logs, schedulers and "
                "progress never fire)"
            )

    optimizer.register_step_pre_hook(refuse_step_by_hand)


def step_schedulers(schedulers: tuple, stepped: tuple) -> None:
    for sched in schedulers:
        if sched.optimizer in stepped:  # never the scheduler of an optimizer that did not step
            sched.step()


def registered(selection: Any, registered: tuple, kind: str) -> tuple:
    if selection is None:
        return registered
    if len(registered) == 1 and selection is registered[0]:
        return registered  # the common case: the one prepared optimizer, checked without a scan
    chosen = tuple(selection) if isinstance(selection, (list, tuple)) else (selection,)
    for obj in chosen:
        if not any(obj is r for r in registered):
            raise ValueError(f"this {type(obj).__name__} was not prepared: pass the {kind} to tl.prepare first")
    return chosen


def chosen_schedulers(scheduler: Any, state: RunState, optimizers: tuple) -> tuple:
    chosen = registered(scheduler, state.schedulers, "scheduler")
    for sched in chosen:
        if sched.optimizer not in optimizers:
            raise ValueError(
                f"this {type(sched).__name__} schedules an optimizer that this tl.step call does not "
                "step: pass it to the tl.step call of its optimizer"
            )
    return chosen


def step_with_closure(state: RunState, optimizer: Any, scheduler: Any, closure: Callable) -> RunState:
    if state.window_micro_steps:
        raise ValueError(
            "tl.step(closure=) takes a whole step, and tl.backward was called since the last one: "
            "compute the loss inside the closure only (trainloop backpropagates it)"
        )
    if state.config.accumulate != 1:
        raise ValueError(
            f"tl.step(closure=) needs accumulate=1 (got {state.config.accumulate}): a closure "
            "optimizer evaluates the whole batch's loss itself, several times per step"
        )
    if state.hooks.on_before_step:
        names = ", ".join(type(hook.__self__).__name__ for hook in state.hooks.on_before_step)
        raise ValueError(
            f"tl.step(closure=) cannot run the on_before_step hooks of {names}: a closure optimizer "
            "computes its gradients inside its step. Clip inside the closure, and use a precision "
            "without loss scaling"
        )
    optimizers = registered(optimizer, state.optimizers, "optimizer")
    schedulers = state.schedulers if scheduler is None else chosen_schedulers(scheduler, state, optimizers)
    on_backward, world_size = state.hooks.on_backward, state.world_size

    def evaluate() -> torch.Tensor:
        for opt in optimizers:
            zero_grad(opt)
        loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("tl.step(closure=): the closure must return the scalar loss tensor, "
                             "with its graph (not detached, not under torch.no_grad())")
        for hook in on_backward:
            loss = hook(state, loss)
        loss.backward()
        if world_size == 1:
            return loss
        # The optimizer decides on the loss (line search, tolerances): every rank sees the mean.
        mean = loss.detach().to(collective_device(state), torch.float64, copy=True)
        dist.all_reduce(mean)
        return (mean / world_size).to(loss.device, loss.dtype)

    with stepping():
        for opt in optimizers:
            opt.step(evaluate)
    for opt in optimizers:
        zero_grad(opt)
    if schedulers:
        step_schedulers(schedulers, optimizers)
    state = state.advance("step", step=state.step + 1, micro_step=state.micro_step + 1,
                          window_micro_steps=0, window_items=None, stepping=optimizers)
    for hook in state.hooks.on_step:
        state = hook(state) or state
    return state.evolve(stepping=())


# -- the parts of `tl.step` (trainloop.steps) that act on the optimizers -------------------------


def raise_no_optimizer(state: RunState) -> None:
    """The error of a `tl.step` on a state with no prepared optimizer, saying which mistake it is."""
    if state.lineage.prepared_from:  # the state tl.prepare was given, not the one it returned
        raise ValueError(
            "step() was given the state that tl.prepare was called with, which holds no prepared "
            "optimizer: the state tl.prepare returned was dropped. Keep it, e.g. "
            "`state, model, optimizer = tl.prepare(state, model, optimizer)` (the state first, then "
            "the objects in the order given), and pass that state on"
        )
    raise ValueError("step() needs a prepared optimizer: call tl.prepare(state, model, optimizer) first")


def zero_grads(optimizers: tuple) -> None:
    """`zero_grad(set_to_none=True)` of each, called directly (no helper call per optimizer);
    an optimizer whose zero_grad takes no `set_to_none` (apex's) falls back to `zero_grad`."""
    try:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    except TypeError:
        for opt in optimizers:  # zero_grad is idempotent: the ones already zeroed stay zero
            zero_grad(opt)


def narrowed(stepping: tuple, optimizers: tuple) -> tuple:
    """The optimizers an `on_before_step` hook left in `state.stepping`: some of this call's."""
    if stepping is optimizers:
        return optimizers
    for opt in stepping:
        if not any(opt is o for o in optimizers):
            raise ValueError(
                f"an on_before_step hook put a {type(opt).__name__} into state.stepping that this "
                "tl.step call does not step: hooks may only remove optimizers from it"
            )
    return tuple(stepping)


def normalise_gradients(state: RunState, optimizers: tuple) -> None:
    """Scale the gradients of `optimizers` by the window's 1 / size (see `trainloop.steps`' module
    doc: exact accumulation). `step`
    skips the call for a window of one micro-batch without `num_items`: its gradients are
    already the mean."""
    items = state.window_items
    if items is None:
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

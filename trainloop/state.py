"""`RunState`: the one immutable record of a run.

It holds everything about the run that is not a tensor owned by torch: where this process sits
(`topology`), the settings (`config`), the callbacks, the objects `prepare` registered, and the
counters. It is never mutated: every trainloop function returns a new one. Two states can live
in one process side by side.

Be clear about what "immutable" covers: the record's fields cannot be reassigned, but the
models, optimizers and loaders it refers to are ordinary torch objects whose parameters,
buffers and positions do change as the run goes on. The record tracks *which* objects make up
the run and *where* the run is; torch owns the tensors.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import attrs
import torch

from trainloop.errors import StaleStateError  # defined with the other errors; re-exported here
from trainloop.hooks import Hooks
from trainloop.topology import Topology

if TYPE_CHECKING:
    from trainloop.checkpoint.staging import Writer
    from trainloop.config import Config
    from trainloop.data import PreparedLoader
    from trainloop.hooks import Callback
    from trainloop.precision import Precision
    from trainloop.strategies.base import Strategy


# What to write instead, by the function that made the newest state.
_KEEP_THE_RESULT = {
    "backward": "state = tl.backward(state, loss)",
    "step": "state = tl.step(state, optimizer)",
    "log": "state = tl.log(state, ...)",
    "prepare": "state, *objects = tl.prepare(state, ...)",
    "attach": "state = tl.attach(state, ...)",
    "load": "state = tl.load(state, path)",
}


class Lineage:
    """The one mutable object that the states of a run share: which of them is current.

    A `RunState` is immutable, so it cannot know that a later call superseded it; its run can.
    Each state carries the `generation` it was made in, and the lineage the newest generation
    and the function that made it. The functions that move the run on (`backward`, `step`,
    `log`, `prepare`, `attach`, `load`, `finish`) first check that their state is of the newest
    generation (two attribute reads), then return a state of a new one (`prepare` returns the
    first state of a lineage of its own: a state can be prepared from twice, into two runs, as
    after `init`; its result dropped, the next step finds no optimizer and says so): an older
    state raises
    `StaleStateError` instead of silently training from where it stood (a `tl.backward(state,
    loss)` whose result was dropped leaves the window count at 0, and `tl.step` would never
    step). `evolve` copies the generation: a copy of the current state is current too, until one
    of them is passed on. The read-only functions (`gather`, `reduce`, `broadcast`, `save`,
    `accumulate`, the properties) accept any state.

    `stepping` is True while `tl.step` steps the run's optimizers (their step pre-hook refuses
    any other `optimizer.step()`). It also holds the metric names the ranks last agreed on in a `log` report, so that a report
    with the same names checks them inside its one collective (see `trainloop.steps.flush_logs`),
    where the open micro-step stands (`grouping`, `counted`: see `trainloop.steps.backward`), and
    the resources that belong to the run rather than the process: its background checkpoint
    `writer` (made by its first background save, `trainloop.checkpoint.staging.writer_of`).

    `newest` is the newest state of the run (the last one `advance` made, or a copy of it):
    what `finish` ends the run from when it is given an older one (a call that raised
    mid-way superseded the state the user holds), and what is finished at exit when the script
    never called `finish` (`trainloop.lifecycle`, through `UNFINISHED`). `finish` drops it.
    """

    __slots__ = ("__weakref__", "counted", "data_checked", "finished", "generation", "grouping", "log_names",
                 "made_by", "newest", "prepared_from", "reported_step", "stepping", "writer")

    def __init__(self) -> None:
        self.generation = 0
        self.made_by = "init"
        self.finished = False
        self.log_names: tuple[str, ...] | None = None
        self.writer: Writer | None = None
        self.newest: RunState | None = None
        # `prepare` branched a run off a state of this lineage: stepping this one means the
        # state it returned was dropped (`tl.step` says so).
        self.prepared_from = False
        self.data_checked = False  # `step` looked once for a prepared loader (see steps.py)
        self.reported_step: int | None = None  # the step of the run's last report to on_log
        # A `tl.accumulate` call opened a micro-step (`grouping`) that a backward already counted
        # (`counted`): the backward calls until the next `tl.accumulate` or `tl.step` join it.
        self.grouping = False
        self.counted = False
        # True while `tl.step` steps this run's optimizers: their step pre-hook lets the step
        # through (`trainloop.optimizers.guard_optimizer`). A plain attribute, read by the hook
        # every step: one run's flag never lets another run's optimizer step by hand.
        self.stepping = False

    def __repr__(self) -> str:
        return f"Lineage(generation={self.generation}, made_by={self.made_by!r}, finished={self.finished})"


# The runs `prepare` started and `finish` has not ended, weakly (a run the program dropped is
# not kept alive): `trainloop.lifecycle` ends the ones still held when the interpreter exits.
UNFINISHED: weakref.WeakSet[Lineage] = weakref.WeakSet()


def raise_stale(state: RunState, caller: str) -> None:
    """Raise the StaleStateError for `state` given to `tl.<caller>`."""
    lineage = state.lineage
    if lineage.finished:
        raise StaleStateError(f"tl.{caller} was given a RunState of a run that tl.finish has ended")
    hint = _KEEP_THE_RESULT.get(lineage.made_by, f"state = tl.{lineage.made_by}(state, ...)")
    raise StaleStateError(
        f"this RunState is stale: tl.{caller} was given a state that a later call superseded "
        f"(the newest is from tl.{lineage.made_by}, at step {state.step}, micro-step {state.micro_step} "
        f"of the stale one). trainloop functions return the new state and never change the old "
        f"one: did you write `{hint}`?"
    )


# Logged values not yet reported: an immutable linked list of (values, previous) pairs, newest
# first, so that `log` extends it in O(1) without copying.
PendingLogs = tuple


# slots=False: the fields live in the instance's __dict__, so that a copy is one C-level
# `dict.copy()` (see `_copy_with`) instead of a Python call per field; it runs on every
# backward, step and log call, and that copy is most of their cost.
@attrs.frozen(repr=False, slots=False)
class RunState:
    """The state of a run. Build it with `tl.init`, then pass it through the trainloop functions.

    Fields:
        topology: rank, local rank, world size, node rank, device, backend.
        config: the settings (precision, accumulate, strategy, seed, log_every, ...).
        callbacks: the attached callbacks, in firing order.
        models, optimizers, schedulers, loaders: what `prepare` registered.
        step: optimizer steps done. micro_step: micro-steps done (window positions, not
            `backward` calls: see `trainloop.steps.backward`).
        window_micro_steps: micro-steps in the open accumulation window.
        window_items: the open window's summed `num_items` (None when not given).
        skip_step: set by an `on_before_step` hook to skip this optimizer step.
        stepping: inside `tl.step`'s hooks, the optimizers this call steps (`()` elsewhere). An
            `on_before_step` hook may narrow it to skip some of them (`LossScale` drops those
            whose gradients overflowed); `skip_step` skips them all.
        pending_logs, logged_step: `log`'s buffer and the step it last flushed at.
        generation, lineage: which state of the run is current (see `Lineage`).
        strategy: how models are spread over the processes (`trainloop.strategies`).
        precision: the precision policy of `config.precision` (`trainloop.precision.Precision`).

    `hooks` is derived from `callbacks`: `evolve(callbacks=...)` recomputes it.
    """

    topology: Topology
    config: Config
    callbacks: tuple[Callback, ...] = ()
    hooks: Hooks = attrs.field(factory=Hooks, eq=False)
    models: tuple[torch.nn.Module, ...] = ()
    optimizers: tuple[torch.optim.Optimizer, ...] = ()
    schedulers: tuple[Any, ...] = ()
    loaders: tuple[PreparedLoader, ...] = ()
    step: int = 0
    micro_step: int = 0
    window_micro_steps: int = 0
    window_items: int | float | torch.Tensor | None = None
    skip_step: bool = False
    pending_logs: PendingLogs | None = attrs.field(default=None, eq=False)
    logged_step: int = 0
    stepping: tuple[torch.optim.Optimizer, ...] = attrs.field(default=(), eq=False)
    generation: int = attrs.field(default=0, eq=False)
    lineage: Lineage = attrs.field(factory=Lineage, eq=False)
    strategy: Strategy = attrs.field(kw_only=True, eq=False)  # set by `init`: strategies.create
    precision: Precision = attrs.field(kw_only=True, eq=False)  # set by `init`: precision.policy

    # -- where this process sits ---------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def local_rank(self) -> int:
        return self.topology.local_rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def device(self) -> torch.device:
        return self.topology.device

    @property
    def is_main(self) -> bool:
        """True on the one process of the job that writes files and talks to trackers."""
        return self.topology.rank == 0

    @property
    def is_local_main(self) -> bool:
        """True on the first process of each machine (node-local downloads, caches)."""
        return self.topology.local_rank == 0

    # -- the accumulation window ---------------------------------------------------------------

    @property
    def at_epoch_end(self) -> bool:
        """A prepared loader has just yielded the last batch of its epoch."""
        return any(loader.at_last_batch for loader in self.loaders)

    @property
    def sync_now(self) -> bool:
        """The next `backward` closes the accumulation window (gradients are synchronised)."""
        return self.window_micro_steps + 1 >= self.config.accumulate or self.at_epoch_end

    # -- records -------------------------------------------------------------------------------

    def evolve(self, **changes: Any) -> RunState:
        """A copy of this state with `changes` applied (the state itself never changes).

        The same as `attrs.evolve` in a fraction of the time: it runs several times per training
        step. The copy is of the same generation (see `Lineage`); new `callbacks` bring their
        `hooks` with them.
        """
        new = _copy_with(self, changes)
        lineage = self.lineage
        if lineage.newest is self:
            lineage.newest = new
        return new

    def advance(self, made_by: str, **changes: Any) -> RunState:
        """`evolve(**changes)` as the run's new current state: every older one becomes stale.

        For the functions that move the run on (see `Lineage`); `made_by` names the function,
        for the error a stale state raises.
        """
        # `_copy_with` inlined: this runs on every backward, step and log call (three times per
        # training step), and a Python call is a good part of its cost.
        lineage = self.lineage
        generation = lineage.generation + 1
        fields = self.__dict__.copy()
        if changes:
            if not _FIELD_SET.issuperset(changes):
                _raise_unknown(changes)
            fields.update(changes)
            if "callbacks" in changes:
                fields["hooks"] = Hooks.of(fields["callbacks"])
        fields["generation"] = generation
        new = _new_object(RunState)
        _set_fields(new, fields)
        lineage.newest = new
        lineage.generation = generation
        lineage.made_by = made_by
        return new

    def branch(self, made_by: str, **changes: Any) -> RunState:
        """`evolve(**changes)` as the first state of a lineage of its own; this one stays current.

        For `prepare`: a state that objects were prepared from can be prepared from again, into
        a second, independent run (a test's or a notebook's common base state).
        """
        self.lineage.prepared_from = True
        lineage = Lineage()
        lineage.made_by = made_by
        new = lineage.newest = _copy_with(self, {"lineage": lineage, "generation": 0, **changes})
        UNFINISHED.add(lineage)  # finished (or warned about) at exit unless `finish` ends it
        return new

    def check_current(self, caller: str) -> None:
        """Raise StaleStateError if a later call superseded this state (`caller`: for the message)."""
        if self.generation != self.lineage.generation:
            raise_stale(self, caller)

    def to_dict(self) -> dict[str, Any]:
        """The counters, the topology and the settings as JSON-ready plain values."""
        settings = self.config.to_dict()
        del settings["device"]  # the requested device; the topology has the actual one
        topology = attrs.asdict(self.topology)
        topology["device"] = str(topology["device"])
        del topology["owns_process_group"]
        return {"step": self.step, "micro_step": self.micro_step, **topology, **settings}

    def __repr__(self) -> str:
        def names(objects: tuple) -> str:
            return "[" + ", ".join(type(o).__name__ for o in objects) + "]"

        topology = self.topology
        return (
            f"RunState(step={self.step}, micro_step={self.micro_step}, "
            f"rank={topology.rank}/{topology.world_size}, device='{topology.device}', "
            f"precision='{self.config.precision}', accumulate={self.config.accumulate}, "
            f"strategy='{self.config.strategy}', callbacks={names(self.callbacks)}, "
            f"models={names(self.models)}, optimizers={names(self.optimizers)}, "
            f"schedulers={names(self.schedulers)}, loaders={len(self.loaders)})"
        )


_FIELD_SET = frozenset(field.name for field in attrs.fields(RunState))
_new_object = object.__new__
# The setter of an instance's whole __dict__: how a frozen class gets its fields without going
# through its __setattr__ (which raises).
_set_fields = RunState.__dict__["__dict__"].__set__


def _copy_with(state: RunState, changes: dict[str, Any]) -> RunState:
    """A copy of `state` with `changes` applied: its field dict copied, then updated. Copying
    the whole dict copies every field, present and future (`test_evolve_copies_every_field`)."""
    fields = state.__dict__.copy()
    if changes:
        if not _FIELD_SET.issuperset(changes):
            _raise_unknown(changes)
        fields.update(changes)
        if "callbacks" in changes:
            fields["hooks"] = Hooks.of(fields["callbacks"])
    new = _new_object(RunState)
    _set_fields(new, fields)
    return new


def _raise_unknown(changes: dict[str, Any]) -> None:
    unknown = sorted(set(changes) - _FIELD_SET)
    raise TypeError(f"RunState has no field {unknown[0]!r}")

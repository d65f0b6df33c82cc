"""`Profile`: a `torch.profiler` trace of a few optimizer steps, for TensorBoard, on the main process."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from trainloop.callbacks.trackers import check_writable
from trainloop.hooks import Callback

if TYPE_CHECKING:
    from trainloop import RunState


class Profile(Callback):
    """Profile `active` optimizer steps after `wait` + `warmup` ones, and write the trace to `dir`.

    The profiler starts when `tl.prepare` has run (or at the first step, if the callback was
    attached later) and advances once per optimizer step: `wait` steps are skipped, `warmup`
    steps are profiled and thrown away (the profiler's own start-up cost), `active` steps are
    recorded; `repeat` cycles of that. Each cycle's trace is written by
    `torch.profiler.tensorboard_trace_handler` as `dir/<host>_<pid>.<time>.pt.trace.json`, which
    TensorBoard's profiler plugin (`torch-tb-profiler`), Perfetto and chrome://tracing open. The
    profiler stops after the last cycle: the rest of the run pays nothing.

    Only the main process profiles (one trace per job; the ranks of a data-parallel job run the
    same program). `profiler_kwargs` go to `torch.profiler.profile` (`activities`,
    `record_shapes`, `profile_memory`, `with_stack`, ...); by default every activity torch
    supports here is recorded (the CPU, and CUDA when there is a GPU).
    """

    def __init__(self, dir: str | os.PathLike = "runs/profile", *, wait: int = 1, warmup: int = 1,
                 active: int = 3, repeat: int = 1, **profiler_kwargs: Any):
        for name, value, minimum in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1),
                                     ("repeat", repeat, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"Profile: {name} must be an integer >= {minimum} (got {value!r})")
        self.dir = check_writable(dir, "Profile dir", directory=True)
        self.wait, self.warmup, self.active, self.repeat = wait, warmup, active, repeat
        self.profiler_kwargs = profiler_kwargs
        self._profiler = None
        self._steps_left: int | None = None  # None: not started yet; 0: done

    def on_prepare(self, state: RunState) -> None:
        self._start(state)

    def _start(self, state: RunState) -> None:
        if self._steps_left is not None or not state.is_main:
            return
        import torch.profiler

        self._steps_left = (self.wait + self.warmup + self.active) * self.repeat
        self._profiler = torch.profiler.profile(
            schedule=torch.profiler.schedule(wait=self.wait, warmup=self.warmup, active=self.active,
                                             repeat=self.repeat),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.dir)),
            **self.profiler_kwargs)
        self._profiler.start()

    def on_step(self, state: RunState) -> None:
        if self._steps_left is None:
            self._start(state)  # attached after prepare: profile from the next step on
            return
        if self._profiler is None:
            return
        self._profiler.step()
        self._steps_left -= 1
        if self._steps_left == 0:
            self._stop()

    def _stop(self) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.stop()

    def on_finish(self, state: RunState) -> None:
        if self._profiler is not None:  # the run ended first: what was recorded is written
            self._stop()

    def __repr__(self) -> str:
        return (f"Profile({str(self.dir)!r}, wait={self.wait}, warmup={self.warmup}, "
                f"active={self.active}, repeat={self.repeat})")

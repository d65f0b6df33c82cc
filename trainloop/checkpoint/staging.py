"""Background checkpoint saves: staging copies of the state, one writer thread, one save in flight.

A background save (`tl.save(..., background=True)`) blocks the loop only while `Staging` copies
the tensors off the live parameters and optimizer state: training mutates those in place while
the writer thread is still writing. The copies go into CPU buffers that are kept and reused by
the next save (pinned memory when the tensors are on an accelerator, so the copies run at the
link's full speed and do not wait for the device queue to drain twice). The cost: a CPU run holds
a second copy of its model and optimizer state in RAM for the rest of the run; an accelerator run
holds it in pinned host memory.

One writer thread per run and at most one save in flight: a new save, `load` and `finish`
wait for the one before (the staging buffers are the in-flight save's until it is done). The
writer belongs to the run (`writer_of(state)`, kept on the run's `Lineage`), not to the process:
two runs side by side in one process each have their own, and one run's `finish` never waits
for, reports or clears another run's save. A process killed mid-save leaves the previous
checkpoint committed (the write is all-or-nothing, see `trainloop.checkpoint.writing`).
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from trainloop.state import RunState


class Staging:
    """CPU buffers that hold a copy of the state's tensors, reused from save to save."""

    def __init__(self) -> None:
        self._buffers: dict[Hashable, torch.Tensor] = {}
        self._devices: set[torch.device] = set()

    def copy(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU copy of `tensor` in the buffer kept under `key` (made anew if its shape or dtype
        changed). Copies from an accelerator are asynchronous until `wait`."""
        tensor = tensor.detach()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            on_accelerator = tensor.device.type not in ("cpu", "meta")
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_accelerator)
            self._buffers[key] = buffer
        if tensor.device.type != "cpu":
            self._devices.add(tensor.device)
            buffer.copy_(tensor, non_blocking=True)
        else:
            _copy_on_cores(buffer, tensor)
        return buffer

    def tree(self, obj: Any, key: tuple) -> Any:
        """`obj` (nested dicts, lists, tuples) with every tensor replaced by its staged copy and
        every container new: nothing the run mutates later is shared with what is written."""
        if isinstance(obj, torch.Tensor):
            return self.copy(key, obj)
        if isinstance(obj, dict):  # OrderedDict (a module's state_dict) too: its order is kept
            return {k: self.tree(v, (*key, k)) for k, v in obj.items()}
        if type(obj) in (list, tuple):
            return type(obj)(self.tree(v, (*key, i)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)  # numbers and strings are returned as they are

    def wait(self) -> None:
        """Block until the asynchronous copies from accelerators have landed."""
        for device in self._devices:
            torch.get_device_module(device).synchronize(device)
        self._devices.clear()

    def release(self) -> None:
        self._buffers.clear()


_SPLIT_FROM = 4 << 20  # bytes from which a CPU copy is shared between cores


def _copy_on_cores(buffer: torch.Tensor, tensor: torch.Tensor) -> None:
    """`buffer.copy_(tensor)` on the CPU, a large one split across the cores that torch's own
    intra-op threads leave idle (a run limited to one thread per process): the loop is stalled
    while it stages, so idle cores shorten the stall, and the save's commit with it."""
    pieces = min(4, (os.cpu_count() or 1) // max(1, torch.get_num_threads()))
    size = tensor.numel() * tensor.element_size()
    if pieces < 2 or size < _SPLIT_FROM or not (tensor.is_contiguous() and buffer.is_contiguous()):
        buffer.copy_(tensor)
        return
    source, target = tensor.reshape(-1), buffer.view(-1)
    bounds = [source.numel() * i // pieces for i in range(pieces + 1)]
    parts = [(target[a:b], source[a:b]) for a, b in zip(bounds, bounds[1:])]
    copies = [_copiers().submit(t.copy_, s) for t, s in parts[1:]]  # copy_ releases the GIL
    parts[0][0].copy_(parts[0][1])
    for copy_done in copies:
        copy_done.result()


@functools.cache
def _copiers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=3, thread_name_prefix="trainloop-stage")


class SaveFuture(Future):
    """A background save's Future. It remembers whether its outcome was looked at (`result`,
    `exception`), so that a failure nobody retrieved is raised at the next save or `finish`
    instead of being lost, and one that was retrieved is not raised twice."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = False

    def result(self, timeout: float | None = None) -> Any:
        self.reported = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.reported = True
        return super().exception(timeout)

    def unreported_error(self) -> BaseException | None:
        """Wait; the save's error if it failed and no one has looked (marking it looked at)."""
        error = super().exception()
        if error is None or self.reported:
            return None
        self.reported = True
        return error


class Writer:
    """A run's checkpoint writer thread and its one save in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: SaveFuture | None = None
        self._pending_report = False
        self.staging = Staging()

    def submit(self, write: Callable[[], Any]) -> SaveFuture:
        """Run `write` on the writer thread; its Future. The previous save must be done."""
        future = SaveFuture()
        with self._lock:
            assert self._in_flight is None or self._in_flight.done(), "one save in flight at a time"
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainloop-checkpoint")
            self._in_flight = future
            self._pool.submit(_run_into, write, future)
        return future

    def done(self, outcome: Any = None, error: BaseException | None = None) -> SaveFuture:
        """A Future that is already settled (a save that ran synchronously, or has no part here)."""
        future = SaveFuture()
        if error is None:
            future.set_result(outcome)
        else:
            future.set_exception(error)
        return future

    def wait(self) -> BaseException | None:
        """Wait for the save in flight, if any; its error if it failed unreported (now reported)."""
        future = self._in_flight
        return None if future is None else future.unreported_error()

    def wait_quietly(self) -> None:
        """Wait for the save in flight, if any, leaving its outcome to be reported."""
        future = self._in_flight
        if future is not None:
            Future.exception(future)  # Future's own: waits without marking the outcome seen

    def began_background_save(self) -> None:
        """Every rank, at each background save: `finish` then settles its outcome on every rank."""
        self._pending_report = True

    def pending_report(self) -> bool:
        return self._pending_report

    def release(self) -> None:
        """After `finish`: nothing to report, the staging buffers' memory back, the thread ended."""
        self._pending_report = False
        self.staging.release()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _run_into(write: Callable[[], Any], future: SaveFuture) -> None:
    try:
        outcome = write()
    except BaseException as error:  # every failure belongs to the Future, none to the thread
        future.set_exception(error)
    else:
        future.set_result(outcome)



def writer_of(state: RunState) -> Writer:
    """The run's writer, made at its first use (a run that never saves has no thread)."""
    lineage = state.lineage
    if lineage.writer is None:
        lineage.writer = Writer()
    return lineage.writer

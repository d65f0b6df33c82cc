"""`find_batch_size`: the largest batch size, halving from a start, that does not run out of memory."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from trainloop.state import RunState

R = TypeVar("R")

# Out-of-memory errors that reach Python as a plain RuntimeError rather than torch.OutOfMemoryError
# (the same phrases Accelerate's find_executable_batch_size looks for).
_OUT_OF_MEMORY_PHRASES = (
    "out of memory",  # CUDA, HIP and XPU ("CUDA error: out of memory", "XPU out of memory")
    "MPS backend out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",  # what cuDNN says when a batch is too large for it
    "DefaultCPUAllocator: can't allocate memory",
)


def is_out_of_memory(error: BaseException) -> bool:
    """True for `torch.OutOfMemoryError` and the RuntimeErrors that mean the same on other devices."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(p in str(error) for p in _OUT_OF_MEMORY_PHRASES)


def find_batch_size(fn: Callable[[int], R], start: int, *,
                    state: RunState | None = None) -> tuple[int, R]:
    """Call `fn(batch_size)` from `start`, halving on out-of-memory; return `(batch_size, fn's result)`.

    `fn` runs the work that needs the memory (a few training steps, or the whole run). When it
    raises `torch.OutOfMemoryError` (or CUDA/HIP/XPU/MPS/cuDNN/CPU allocator errors saying the
    same), the error is dropped, the garbage it left is collected, the accelerator's cache is
    emptied and `fn` is called again with half the batch size. Any other error propagates at
    once. When batch size 1 still runs out of memory, `torch.OutOfMemoryError` is raised.

    Returns the batch size that worked together with `fn`'s result, so a probe can be followed by
    the real run: `batch_size, _ = tl.find_batch_size(try_one_step, 256)`. `fn` must not keep
    tensors from a failed try alive (in globals or closures), or the next try has less memory.

    Many ranks: pass `state`, and every rank moves to the next size when any rank ran out of
    memory (`tl.all` of the outcomes), so all of them return the same batch size. `fn` must then
    contain no collectives (probe on `tl.unwrap(model)`, with no DDP or FSDP communication): a
    rank that fails inside a collective leaves the others waiting in it until the timeout.
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ValueError(f"find_batch_size start must be an integer >= 1 (got {start!r})")
    batch_size = start
    while True:
        failure = None
        try:
            result = fn(batch_size)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            failure = f"{type(error).__name__}: {error}"  # only the text: the traceback holds tensors
        fits = failure is None
        if state is not None:
            from trainloop.collectives import all_ranks

            fits = all_ranks(state, fits)
        if fits:  # this rank's fn returned: result is its value
            return batch_size, result  # pyright: ignore[reportReturnType]
        result = None  # what this rank computed while another rank failed: dropped before the next try
        _release_memory()
        if batch_size == 1:
            raise torch.OutOfMemoryError(
                f"find_batch_size: batch size 1 still ran out of memory{_where(failure)}")
        batch_size //= 2


def _where(failure: str | None) -> str:
    return f" ({failure})" if failure else " on another rank"


def _release_memory() -> None:
    gc.collect()
    empty_cache = getattr(torch.accelerator, "empty_cache", None)  # not in every torch trainloop supports
    if empty_cache is not None and torch.accelerator.is_available():
        empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()

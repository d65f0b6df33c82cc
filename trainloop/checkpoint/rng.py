"""Every rank's RNG states (Python, NumPy, torch's CPU and accelerator generators), saved and restored."""

from __future__ import annotations

import contextlib
import random
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from trainloop.errors import PreviousSaveFailed

if TYPE_CHECKING:
    from trainloop.state import RunState


def _rng_state(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    # Python's state as a tensor: 625 ints through the unpickler one by one would be the slowest
    # part of loading a small checkpoint.
    record: dict[str, Any] = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
                              "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy

        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        record["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), position, has_gauss, cached]
    if device.type != "cpu":
        record["accelerator"] = torch.get_device_module(device).get_rng_state(device)
    return record


def _set_rng_state(record: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = record["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    torch.set_rng_state(record["torch"])
    if "numpy" in record:
        with contextlib.suppress(ImportError):
            import numpy

            kind, keys, position, has_gauss, cached = record["numpy"]
            numpy.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, cached))
    if "accelerator" in record and device.type != "cpu":
        torch.get_device_module(device).set_rng_state(record["accelerator"], device)


def _gather_rng_states(state: RunState) -> list[dict]:
    """Every rank's RNG states (for rank 0 to write), after waiting for this process's save in
    flight. Its outcome travels in the same gather: if any rank's previous background save
    failed unreported, every rank raises PreviousSaveFailed, and no one has saved anything."""
    previous = None if state.lineage.writer is None else state.lineage.writer.wait()
    mine = (_rng_state(state.device), None if previous is None else str(previous))
    if state.world_size == 1:
        everyone = [mine]
    else:
        everyone: list[Any] = [None] * state.world_size
        dist.all_gather_object(everyone, mine)  # between this job's own ranks only
    failures = [error if state.world_size == 1 else f"rank {rank}: {error}"
                for rank, (_, error) in enumerate(everyone) if error is not None]
    if failures:
        raise PreviousSaveFailed(f"the previous background save failed: {'; '.join(failures)}")
    return [rng for rng, _ in everyone]

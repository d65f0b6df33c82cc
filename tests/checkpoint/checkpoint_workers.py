"""Worker functions of the multi-process checkpoint tests (started by `trainloop.spawn.run`)."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Checkpoint
from trainloop.checkpoint import CheckpointError, finish_saves


def background_disk_full(directory: str) -> list[dict]:
    """Rank 0's disk fills up during the background save of step 4. Returns, for every rank, the
    steps that raised CheckpointError and the messages: the failure must surface on every rank
    at the next save step (6), not at step 5, and not at all where nothing failed."""
    state = tl.init(seed=0, callbacks=[Checkpoint(directory, every=2)])
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(regression_data(64), batch_size=2, shuffle=True)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, loader)
    batches = iter(loader)
    raised: dict[int, str] = {}
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    for step in range(1, 8):
        if step == 3:
            finish_saves(state)  # step 2's checkpoint is committed before the disk fills up
            if state.is_main:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (8192, limits[1]))  # 8 KiB left, rank 0 only
        try:
            state = tl.step(tl.backward(state, mse(model, *next(batches))), optimizer)
        except CheckpointError as error:
            raised[step] = str(error)
            break  # on_error="raise": the run stops here
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    everyone: list = [None] * state.world_size
    dist.all_gather_object(everyone, {"rank": state.rank, "raised": raised,
                                      "committed": sorted(p.name for p in Path(directory).iterdir()
                                                                  if not p.name.startswith("."))})
    return everyone

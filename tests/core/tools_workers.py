"""The worker of the small tools' multi-process test: one `spawn.run(tool_checks, n=2)` start-up.

Every rank performs every check and returns plain data; rank 0's result holds every rank's
(through `tl.broadcast`, so that `gather_object` is not the only witness of itself).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import JSONLines, Profile, Throughput


def _flags(state) -> dict:
    rank = state.rank
    return {
        "any_one_rank_true": tl.any(state, rank == 1),
        "all_one_rank_true": tl.all(state, rank == 1),
        "all_every_rank_true": tl.all(state, True),
        "any_no_rank_true": tl.any(state, False),
        "any_tensor": tl.any(state, torch.tensor([False, rank == 0])),
        "all_tensor": tl.all(state, torch.tensor([True, rank == 0])),
    }


def _pads(state) -> dict:
    rank = state.rank
    ragged = torch.full((2, 3 + rank), float(rank + 1))  # rank 0: 2x3, rank 1: 2x4
    padded = tl.pad(state, ragged, dim=1, value=-1)
    last_dim = tl.pad(state, ragged, dim=-1)
    rows = tl.pad(state, torch.arange(rank + 1), dim=0, value=7)  # rank 0: [0], rank 1: [0, 1]
    try:
        tl.pad(state, torch.zeros((2,) * (rank + 1)), dim=0)  # 1 dim on rank 0, 2 on rank 1
        mismatch = None
    except ValueError as error:
        mismatch = str(error)
    return {"padded": padded, "last_dim": last_dim, "rows": rows, "mismatch": mismatch,
            "gathered_after_pad": tl.gather(state, padded)}


def _batch_sizes(state) -> dict:
    tried = []

    def probe(batch_size: int) -> str:
        tried.append(batch_size)
        # Rank 1 has less memory: it fits 8, rank 0 fits 32. Both must agree on 8.
        if batch_size > (32 if state.rank == 0 else 8):
            raise torch.OutOfMemoryError(f"CUDA out of memory (pretend, batch {batch_size})")
        return f"rank {state.rank} ran {batch_size}"

    found = tl.find_batch_size(probe, 64, state=state)
    return {"found": found, "tried": tried}


def _throughput_and_profile(state, tmp_dir: str) -> dict:
    throughput = Throughput(peak_flops=1e12)
    metrics = os.path.join(tmp_dir, "metrics.jsonl")
    profile_dir = os.path.join(tmp_dir, "profile")
    state = tl.attach(state, throughput, JSONLines(metrics), Profile(profile_dir, wait=0, warmup=1, active=1))
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = DataLoader(regression_data(64), batch_size=4)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, loader)
    for x, y in loader:  # 8 batches per rank, windows of 2: 4 steps
        with tl.accumulate(state, model):
            loss = mse(model, x, y)
            state = tl.backward(state, loss)
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=loss)
    tl.barrier(state)  # rank 0 has written its trace before any rank lists the directory
    return state, {"flops_per_step": throughput.flops_per_step, "batch_size": throughput.batch_size,
                   "profile_files": sorted(os.listdir(profile_dir)) if os.path.isdir(profile_dir) else []}


def tool_checks(tmp_dir: str) -> dict:
    """any/all, gather_object, pad, find_batch_size, Throughput and Profile on 2 ranks."""
    state = tl.init(accumulate=2, log_every=2)
    results = {"flags": _flags(state), "pads": _pads(state), "batch_sizes": _batch_sizes(state)}
    results["objects"] = tl.gather_object(state, {"rank": state.rank, "text": "x" * (state.rank + 1)})
    state, measured = _throughput_and_profile(state, tmp_dir)
    results.update(measured)
    every_rank = [tl.broadcast(state, results, src=r) for r in range(state.world_size)]
    tl.finish(state)  # reports the metrics still buffered, closes the metrics file, leaves the group
    return {"world_size": state.world_size, "ranks": every_rank}

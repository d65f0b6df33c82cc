"""The worker of tests/multiprocess/test_checks.py: checks that pass and one that raises on one rank."""

from __future__ import annotations

import torch

import trainloop as tl
from tests.support.checks import WorkerResults


def one_check_raises_on_rank_1() -> WorkerResults:
    """Three checks on 2 ranks; the second raises on rank 1 only, after writing one key."""
    results = WorkerResults()
    state = tl.init(seed=0)
    with results.check("before"):
        results["before"] = tl.reduce(state, torch.tensor([float(state.rank)]), op="sum").item()
    with results.check("raises on rank 1"):
        results["written before the error"] = state.rank
        if state.rank == 1:
            raise RuntimeError("deliberate failure on rank 1")
        results["never written on rank 1"] = True
    with results.check("after"):  # the ranks still agree on their collectives
        results["after"] = tl.gather(state, torch.tensor([state.rank])).tolist()
    tl.finish(state)
    return results

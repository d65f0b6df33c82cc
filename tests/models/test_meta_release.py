"""Meta-init on FSDP2 ranks never holds a module's whole tensor and its shard at once (issue 20's
memory item), and still gives each rank exactly its rows of the whole-built model's values.

tests/benchmarks/test_benchmark_memory.py measures the memory; this checks the values, on
tensors large enough (>= 1 MiB) to take the mapped path, with rows that do not split evenly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.release_workers import batch, meta_init_checks, model
from trainloop import spawn


@pytest.fixture(scope="module")
def ranks():
    return spawn.run(meta_init_checks, n=2)


@pytest.mark.multiprocess
def test_large_meta_tensors_get_the_whole_built_values_and_train_like_them(ranks):
    torch.manual_seed(3)  # what materialize seeds every rank with (the run's seed)
    reference = model()
    for name, value in reference.named_parameters():
        assert torch.equal(ranks[0]["initial"][name], value), name
        assert torch.equal(ranks[1]["initial"][name], value), name
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    x, y = batch()
    F.mse_loss(reference(x), y).backward()  # the 2 ranks' half-batches, averaged: the whole batch
    optimizer.step()
    for name, value in reference.named_parameters():
        torch.testing.assert_close(ranks[0]["trained"][name], value, atol=1e-6, rtol=0, msg=name)
        assert not torch.equal(ranks[0]["trained"][name], ranks[0]["initial"][name]), name

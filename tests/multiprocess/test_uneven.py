"""Data across ranks on 2 real processes (gloo): gather(loader=), even_batches, batch samplers.

One `spawn.run` performs every check (tests/multiprocess/data_workers.py); the tests assert on what it
returned and compare the weights with plain one-process PyTorch loops (atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess.data_workers import data_checks
from tests.support.reference import TokenData, epoch_order, tiny_model, token_loss_sum
from tests.support.samplers import LengthBucketing, token_lengths
from trainloop import spawn

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def data():
    return spawn.run(data_checks, n=2)


def token_reference(dataset, steps: list[list[int]], lr: float = 0.05) -> dict[str, torch.Tensor]:
    """Plain PyTorch, one process: one SGD step per list of indices, token-weighted loss."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for indices in steps:
        x, y, mask = (torch.stack(column) for column in zip(*(dataset[i] for i in indices)))
        (token_loss_sum(model, x, y, mask) / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.state_dict()


def big_batches(n: int, big_batch: int, seed: int, epochs: int, pad_to: int | None = None) -> list[list[int]]:
    """The shuffled order of each epoch in big batches; `pad_to`: the last one wrapped around to it."""
    steps = []
    for epoch in range(epochs):
        order = epoch_order(n, seed, epoch, True).tolist()
        for start in range(0, n, big_batch):
            batch = order[start:start + big_batch]
            if pad_to is not None and len(batch) < big_batch:
                batch = batch + order[:pad_to - len(batch)]
            steps.append(batch)
    return steps


def assert_weights(weights: dict, expected: dict) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=0, msg=f"{name} differs")


# -- gather never drops anything; gather(loader=) drops exactly the sharding padding -----------------

def test_gather_without_loader_never_drops_a_row(data):
    # 9 samples, batch 4, 2 ranks: the last batch was [0.] (rank 1's row gone) before.
    assert data["gather_rank_ids_without_loader"] == [[0.0, 1.0], [0.0, 1.0]]


def test_gather_with_loader_per_batch_counts_every_sample_once_in_order(data):
    assert data["gather_per_batch_9"] == list(range(9))


@pytest.mark.parametrize("n", [9, 11, 99, 8, 1])
def test_gather_with_loader_after_the_loop_counts_every_sample_once(data, n):
    for epoch in range(2):
        gathered = data[f"gather_after_{n}_{epoch}"]
        assert len(gathered) == n and sorted(gathered) == list(range(n)), (epoch, gathered)


def test_gather_with_loader_mid_epoch_drops_nothing(data):
    assert data["gather_mid_epoch"] == [0, 1, 4, 5, 2, 3, 6, 7]


def test_gather_with_loader_refuses_rows_that_do_not_match_the_samples_on_every_rank(data):
    on_rank0, on_rank1 = data["gather_unmatched"]
    assert "do not match that loader's samples" in on_rank0 and "10 rows" in on_rank0
    assert "do not match that loader's samples" in on_rank1
    assert all("rank(s) [1]" in error for error in data["gather_unmatched_one_rank"])  # no hang
    assert sorted(data["gather_after_error_works"]) == list(range(9))


def test_gather_with_loader_drops_a_streams_padding_read_by_dataloader_workers(data):
    assert data["gather_stream_workers_per_batch"] == list(range(11))
    assert sorted(data["gather_stream_workers_after"]) == list(range(11))
    assert len(data["gather_stream_workers_after"]) == 11


# -- even_batches ------------------------------------------------------------------------------------

def test_uneven_batches_give_a_rank_an_empty_last_batch_and_no_padding(data):
    assert data["uneven_sizes"] == [[4, 1], [4, 0]]  # rank 1's last batch has 0 rows
    assert data["uneven_per_batch"] == list(range(9))
    assert sorted(data["uneven_after"]) == list(range(9)) and len(data["uneven_after"]) == 9
    assert data["uneven_stream"] == list(range(9))


def test_even_batches_false_with_num_items_equals_one_process_with_the_big_batch(data):
    weights, rows, steps = data["tokens_67_even_False"]  # 32 * 2 + 3 sequences
    assert rows == [[16, 16, 2, 16, 16, 2], [16, 16, 1, 16, 16, 1]] and steps == 6
    assert_weights(weights, token_reference(TokenData(67), big_batches(67, 32, seed=5, epochs=2)))


def test_even_batches_false_with_an_empty_batch_and_accumulation_equals_the_big_batch(data):
    weights, rows, steps = data["tokens_65_uneven_accumulate_2"]  # 32 * 2 + 1: rank 1 gets nothing
    assert rows == [[16, 16, 1, 16, 16, 1], [16, 16, 0, 16, 16, 0]] and steps == 4
    assert_weights(weights, token_reference(TokenData(65), big_batches(65, 64, seed=5, epochs=2)))


def test_even_batches_default_trains_on_the_wrapped_around_padding(data):
    weights, rows, _ = data["tokens_67_even_True"]
    assert rows == [[16, 16, 2, 16, 16, 2]] * 2
    # The last big batch is the 3 remaining sequences plus the epoch's first one, repeated.
    padded = token_reference(TokenData(67), big_batches(67, 32, seed=5, epochs=2, pad_to=4))
    assert_weights(weights, padded)
    exact = token_reference(TokenData(67), big_batches(67, 32, seed=5, epochs=2))
    assert any(not torch.allclose(weights[k], exact[k], atol=1e-6) for k in exact)


# -- batch samplers ----------------------------------------------------------------------------------

def sampler_batches(n: int, seed: int, epoch: int) -> list[list[int]]:
    """The documented draw: torch's RNG seeded seed + epoch, after set_epoch(epoch)."""
    sampler = LengthBucketing(token_lengths(n), 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + epoch)
        sampler.set_epoch(epoch)
        return list(sampler)


def test_a_length_bucketing_batch_sampler_is_dealt_batch_by_batch_across_ranks(data):
    assert data["bucketing_len"] == 6  # 11 batches of the sampler, 2 per round
    for epoch in range(2):
        drawn = sampler_batches(41, seed=4, epoch=epoch)
        rank0, rank1 = data[f"bucketing_batches_{epoch}"]
        assert rank0 == drawn[0::2]
        assert rank1 == drawn[1::2] + [drawn[0]]  # the short last round repeats the first batch
        gathered = data[f"bucketing_gathered_{epoch}"]
        assert len(gathered) == 41 and sorted(gathered) == list(range(41))  # each sample once
    assert data["bucketing_batches_0"] != data["bucketing_batches_1"]  # epochs differ
    assert data["bucketing_epochs_set"] == [0, 1]


def test_a_batch_sampler_resumes_mid_epoch_exactly_without_reading_the_skipped_batches(data):
    drawn = sampler_batches(41, seed=4, epoch=1)
    for rank, resume in enumerate(data["bucketing_resume"]):
        mine = drawn[rank::2] + ([drawn[0]] if rank == 1 else [])
        assert resume["seen"] + resume["rest"] == mine
        assert resume["position"]["epoch"] == 1 and resume["position"]["batches_seen"] == 6
        assert resume["reads"] == sorted(i for batch in resume["rest"] for i in batch)


def test_a_batch_sampler_drawing_different_batches_per_rank_is_refused(data):
    assert all("differs between ranks" in error for error in data["bucketing_unseeded"])


def test_a_distributed_sampler_is_refused_on_every_rank(data):
    assert all("DistributedSampler" in error and "differs between ranks" in error
               for error in data["distributed_sampler"])


def test_an_uneven_batch_sampler_with_num_items_equals_one_process_with_both_batches(data):
    weights, rows, steps = data["bucketing_tokens"]
    assert rows[1][5] == 0 and rows[1][11] == 0 and steps == 12  # rank 1's empty batches
    steps_taken = []
    for epoch in range(2):
        drawn = sampler_batches(41, seed=6, epoch=epoch)
        steps_taken += [sum(drawn[i:i + 2], []) for i in range(0, len(drawn), 2)]
    assert_weights(weights, token_reference(TokenData(41), steps_taken))

"""Prepared loaders: device placement, seeded shuffling, and resuming without reading skipped data."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, WeightedRandomSampler

import trainloop as tl
from reference import CountingDataset, epoch_order
from trainloop.data import PreparedLoader


def prepared(dataset, world_size=1, rank=0, seed=0, **loader_kwargs) -> PreparedLoader:
    return PreparedLoader(DataLoader(dataset, **loader_kwargs), device=torch.device("cpu"),
                          rank=rank, world_size=world_size, seed=seed)


def flat(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch]


def test_shuffle_is_seed_plus_epoch_and_differs_between_epochs():
    loader = prepared(CountingDataset(10), seed=7, batch_size=3, shuffle=True)
    first, second = flat(loader), flat(loader)
    assert first == epoch_order(10, 7, 0, True).tolist()
    assert second == epoch_order(10, 7, 1, True).tolist()
    assert loader.epoch == 2


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_restored_loader_yields_exactly_the_unseen_batches_without_reading_the_rest(shuffle, stop_after):
    uninterrupted = flat(prepared(CountingDataset(11), batch_size=2, shuffle=shuffle, seed=4))

    first = prepared(CountingDataset(11), batch_size=2, shuffle=shuffle, seed=4)
    seen = []
    for i, batch in enumerate(first):  # a batch handed out counts as seen
        seen.extend(int(x) for x in batch)
        if i == stop_after:
            break
    position = first.state_dict()

    dataset = CountingDataset(11)
    resumed = prepared(dataset, batch_size=2, shuffle=shuffle, seed=4)
    resumed.load_state_dict(position)
    rest = flat(resumed)
    assert seen + rest == uninterrupted
    assert sorted(dataset.reads) == sorted(rest)  # the skipped samples were never read


def test_checkpoint_at_an_epochs_last_batch_continues_with_the_next_epoch():
    loader = prepared(CountingDataset(6), batch_size=2, shuffle=True, seed=1)
    for _ in loader:
        position = loader.state_dict()
    assert position["epoch"] == 1 and position["samples_seen"] == 0
    resumed = prepared(CountingDataset(6), batch_size=2, shuffle=True, seed=1)
    resumed.load_state_dict(position)
    assert resumed.epoch == 1
    assert flat(resumed) == epoch_order(6, 1, 1, True).tolist()


def test_broken_off_pass_continues_where_it_stopped():
    loader = prepared(CountingDataset(8), batch_size=2)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert loader.epoch == 0 and not loader.at_last_batch
    assert flat(loader) == [4, 5, 6, 7]
    assert loader.epoch == 1


def test_at_last_batch_is_true_only_on_the_last_batch():
    loader = prepared(CountingDataset(5), batch_size=2)
    flags = [loader.at_last_batch for _ in loader]
    assert flags == [False, False, True] and not loader.at_last_batch


def test_drop_last_and_length():
    loader = prepared(CountingDataset(7), batch_size=2, drop_last=True)
    assert len(loader) == 3 and flat(loader) == [0, 1, 2, 3, 4, 5]
    assert len(prepared(CountingDataset(7), batch_size=2)) == 4


def test_custom_sampler_is_seeded_per_epoch_and_identical_across_runs():
    weights = torch.rand(20, generator=torch.Generator().manual_seed(0))

    def run():
        sampler = WeightedRandomSampler(weights, num_samples=12, replacement=True)
        loader = prepared(CountingDataset(20), batch_size=4, sampler=sampler, seed=3)
        return flat(loader), flat(loader)

    assert run() == run()
    first, second = run()
    assert first != second


def test_batches_are_pytrees_moved_to_the_device():
    data = [{"x": torch.ones(2), "y": (torch.zeros(1), 3)} for _ in range(4)]
    loader = PreparedLoader(DataLoader(data, batch_size=2), device=torch.device("meta"), rank=0,
                            world_size=1, seed=0)
    batch = next(iter(loader))
    assert batch["x"].device.type == "meta" and batch["y"][0].device.type == "meta"
    assert batch["y"][1].device.type == "meta" and batch["y"][1].shape == (2,)


class Stream(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


def test_iterable_dataset_marks_its_last_batch_and_resumes():
    loader = prepared(Stream(7), batch_size=2)
    flags, values = [], []
    for batch in loader:
        flags.append(loader.at_last_batch)
        values.extend(batch.tolist())
    assert values == list(range(7)) and flags == [False, False, False, True]
    first = prepared(Stream(7), batch_size=2)
    for i, _ in enumerate(first):
        if i == 1:
            break
    resumed = prepared(Stream(7), batch_size=2)
    resumed.load_state_dict(first.state_dict())
    assert flat(resumed) == [4, 5, 6]


def test_unsupported_loader_settings_are_named():
    batch_sampler = torch.utils.data.BatchSampler(range(4), batch_size=2, drop_last=False)

    class MyBatches(torch.utils.data.BatchSampler):
        pass

    custom = MyBatches(range(4), batch_size=2, drop_last=False)
    with pytest.raises(TypeError, match="batch_size="):
        prepared(CountingDataset(4), batch_sampler=custom)
    with pytest.raises(TypeError, match="batch_size="):
        prepared(CountingDataset(4), batch_size=None)
    assert flat(prepared(CountingDataset(4), batch_sampler=batch_sampler)) == [0, 1, 2, 3]


def test_prepare_wraps_a_loader_that_works_with_workers():
    _state, loader = tl.prepare(tl.init(), DataLoader(CountingDataset(9), batch_size=2, num_workers=2, shuffle=True))
    assert sorted(flat(loader)) == list(range(9))

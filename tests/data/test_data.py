"""Prepared loaders: device placement, seeded shuffling, and resuming without reading skipped data."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, WeightedRandomSampler

import trainloop as tl
from tests.support.reference import CountingDataset, TokenData, epoch_order, mse, tiny_model
from tests.support.samplers import LengthBucketing, token_lengths
from trainloop.data import PreparedLoader
from trainloop.data.stream import empty_like


def prepared(dataset, world_size=1, rank=0, seed=0, even_batches=True, **loader_kwargs) -> PreparedLoader:
    return PreparedLoader(DataLoader(dataset, **loader_kwargs), device=torch.device("cpu"),
                          rank=rank, world_size=world_size, seed=seed, even_batches=even_batches)


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
    with pytest.raises(TypeError, match=r"batch_size=None\) turns batching off"):
        prepared(CountingDataset(4), batch_size=None)
    with pytest.raises(ValueError, match="in_order=True"):
        prepared(CountingDataset(4), batch_size=2, num_workers=1, in_order=False)
    batch_sampler = torch.utils.data.BatchSampler(range(4), batch_size=2, drop_last=False)
    assert flat(prepared(CountingDataset(4), batch_sampler=batch_sampler)) == [0, 1, 2, 3]


@pytest.mark.slow  # DataLoader worker processes
def test_prepare_wraps_a_loader_that_works_with_workers():
    _state, loader = tl.prepare(tl.init(), DataLoader(CountingDataset(9), batch_size=2, num_workers=2, shuffle=True))
    assert sorted(flat(loader)) == list(range(9))


# -- the last global batch: even_batches ----------------------------------------------------------
# Ranks simulated in one process (rank=r, world_size=2): the dealing is arithmetic on every rank.

def ranks(dataset_size, world_size=2, **kwargs) -> list[list[list[int]]]:
    """Each simulated rank's batches of one epoch."""
    return [[b.tolist() for b in prepared(CountingDataset(dataset_size), world_size, rank, **kwargs)]
            for rank in range(world_size)]


def test_even_batches_pads_the_last_ranks_chunks_by_wrapping_around():
    assert ranks(9, batch_size=4) == [[[0, 1, 2, 3], [8]], [[4, 5, 6, 7], [0]]]
    assert ranks(7, world_size=4, batch_size=1)[3] == [[3], [0]]  # ranks 3 gets a repeat
    loader = prepared(CountingDataset(9), 2, 1, batch_size=4)
    paddings = [loader.padding for _ in loader]
    assert paddings == [0, 1]  # rank 1's last row repeats sample 0
    assert loader.padding_rows(1) == 1 and loader.padding_rows(5) == 1  # the batch, or the epoch
    assert loader.padding_rows(3) is None  # rows that are neither


def test_uneven_batches_split_the_last_global_batch_the_first_ranks_taking_more():
    assert ranks(11, world_size=3, batch_size=2, even_batches=False) == [
        [[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10]]]
    assert ranks(9, batch_size=4, even_batches=False) == [[[0, 1, 2, 3], [8]], [[4, 5, 6, 7], []]]
    loader = prepared(CountingDataset(9), 2, 1, batch_size=4, even_batches=False)
    assert [loader.padding for _ in loader] == [0, 0] and loader.padding_rows(4) == 0


def test_an_empty_batch_keeps_the_structure_and_trailing_shapes_of_a_real_one():
    data = [{"x": torch.ones(3, 2), "y": (torch.tensor(i), f"s{i}")} for i in range(9)]
    loader = PreparedLoader(DataLoader(data, batch_size=4), device=torch.device("cpu"), rank=1,
                            world_size=2, seed=0, even_batches=False)
    *_, last = loader
    assert last["x"].shape == (0, 3, 2) and last["y"][0].shape == (0,) and len(last["y"][1]) == 0
    assert loader.at_last_batch is False and loader.epoch == 1
    with pytest.raises(TypeError, match="cannot empty a object"):
        empty_like(object())


def test_an_empty_batch_trains_nothing_but_takes_the_step():
    model = tiny_model()
    x, y = torch.zeros(0, 6), torch.zeros(0, 3)
    loss = ((model(x) - y) ** 2).sum()
    loss.backward()
    assert loss.item() == 0 and all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert torch.isnan(mse(model, x, y))  # a mean loss over no rows is NaN: use num_items


def test_len_counts_the_last_partial_batch_either_way():
    for even in (True, False):
        assert len(prepared(CountingDataset(9), 2, 1, batch_size=4, even_batches=even)) == 2


# -- gather(loader=) on one process --------------------------------------------------------------

def test_gather_on_one_process_returns_the_tree_and_checks_the_rows_against_the_loader():
    state, loader = tl.prepare(tl.init(), DataLoader(CountingDataset(5), batch_size=2))
    batches = list(loader)
    assert tl.gather(state, batches[-1], loader=loader) is batches[-1]
    assert tl.gather(state, torch.cat(batches), loader=loader).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="do not match that loader's samples"):
        tl.gather(state, torch.zeros(3), loader=loader)
    with pytest.raises(TypeError, match="the loader prepare returned"):
        tl.gather(state, batches[-1], loader=DataLoader(CountingDataset(5)))


# -- a user's batch sampler ------------------------------------------------------------------------

def bucketing(n=41, batch_size=4):
    return LengthBucketing(token_lengths(n), batch_size)


def drawn(sampler, seed, epoch):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + epoch)
        sampler.set_epoch(epoch)
        return list(sampler)


def test_a_batch_sampler_is_dealt_round_by_round_and_seeded_per_epoch():
    expected = [drawn(bucketing(), 3, epoch) for epoch in range(2)]
    sampler = bucketing()
    one = prepared(CountingDataset(41), seed=3, batch_sampler=sampler)
    assert [[b.tolist() for b in one] for _ in range(2)] == expected
    assert sampler.epochs_set == [0, 1] and expected[0] != expected[1]
    for even in (True, False):
        two = [prepared(CountingDataset(41), 2, rank, seed=3, even_batches=even, batch_sampler=bucketing())
               for rank in range(2)]
        rank0, rank1 = ([b.tolist() for b in loader] for loader in two)
        assert rank0 == expected[0][0::2]
        assert rank1 == expected[0][1::2] + ([expected[0][0]] if even else [[]])
        assert [loader.padding for loader in two] == [0, 4 if even else 0]


def test_a_batch_sampler_does_not_disturb_the_global_rng_and_may_use_pythons_random():
    import random

    class Shuffled:
        def __iter__(self):
            batches = [list(range(i, i + 3)) for i in range(0, 12, 3)]
            random.shuffle(batches)
            return iter(batches)

        def __len__(self):
            return 4

    torch.manual_seed(0)
    expected = torch.rand(1)
    per_rank = []
    for rank in range(2):
        random.seed(100 + rank)  # the ranks' own Python RNGs differ (seed + rank)
        torch.manual_seed(0)
        per_rank.append(flat(prepared(CountingDataset(12), 2, rank, seed=1, batch_sampler=Shuffled())))
        assert torch.equal(torch.rand(1), expected)
    assert sorted(per_rank[0] + per_rank[1]) == list(range(12))


def test_sampler_batch_sampler_with_batch_size_none_reads_lists_of_indices():
    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.data = torch.arange(10) * 10
            self.calls = []

        def __len__(self):
            return 10

        def __getitem__(self, indices):  # one call per batch
            self.calls.append(list(indices))
            return self.data[indices]

    sampler = torch.utils.data.BatchSampler(range(9), batch_size=3, drop_last=False)
    rank1 = Rows()
    loader = PreparedLoader(DataLoader(rank1, sampler=sampler, batch_size=None), device=torch.device("cpu"),
                            rank=1, world_size=2, seed=0)
    assert [b.tolist() for b in loader] == [[30, 40, 50], [0, 10, 20]]  # the last round repeats batch 0
    assert rank1.calls == [[3, 4, 5], [0, 1, 2]]
    uneven = PreparedLoader(DataLoader(Rows(), sampler=sampler, batch_size=None), device=torch.device("cpu"),
                            rank=1, world_size=2, seed=0, even_batches=False)
    assert [b.tolist() for b in uneven] == [[30, 40, 50], []]


def test_a_custom_batch_sampler_subclass_is_sharded_not_refused():
    class MyBatches(torch.utils.data.BatchSampler):
        pass

    custom = MyBatches(range(4), batch_size=2, drop_last=False)
    assert [b.tolist() for b in prepared(CountingDataset(4), 2, 1, batch_sampler=custom)] == [[2, 3]]


@pytest.mark.parametrize("stop_after", [0, 2, 4])
def test_a_batch_sampler_resumes_mid_epoch_and_at_another_world_size(stop_after):
    uninterrupted = drawn(bucketing(), 2, 0)
    first = [prepared(CountingDataset(41), 2, rank, seed=2, batch_sampler=bucketing()) for rank in range(2)]
    seen = []
    for batches in zip(*first):
        seen += [b.tolist() for b in batches]
        if len(seen) // 2 > stop_after:
            break
    position = first[0].state_dict()
    assert position == first[1].state_dict() and position["batches_seen"] == len(seen)
    dataset = CountingDataset(41)
    resumed = prepared(dataset, seed=2, batch_sampler=bucketing())  # one process now
    resumed.load_state_dict(position)
    rest = [b.tolist() for b in resumed]
    assert seen + rest == uninterrupted
    assert sorted(dataset.reads) == sorted(i for b in rest for i in b)  # skipped batches never read
    with pytest.raises(ValueError, match="counts a batch sampler's batches"):
        prepared(CountingDataset(41), batch_size=4).load_state_dict(position)


def test_checkpoint_resumes_a_batch_sampler_mid_epoch(tmp_path):
    def run(dataset, stop=None, resume_from=None):
        model = tiny_model()
        state = tl.init(seed=1)
        loader = DataLoader(dataset, batch_sampler=bucketing())
        state, model, optimizer, loader = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
        if resume_from is not None:
            state = tl.load(state, resume_from)
        seen = []
        for epoch in range(loader.epoch, 2):
            for x, y, _mask in loader:
                seen.append(x.shape[0])
                state = tl.step(tl.backward(state, mse(model, x[:, 0], y[:, 0])), optimizer)
                if stop is not None and state.step == stop:
                    return tl.save(state, tmp_path / "ckpt"), seen
        return {k: v.clone() for k, v in model.state_dict().items()}, seen

    uninterrupted, all_sizes = run(TokenData(41))
    path, before = run(TokenData(41), stop=14)  # epoch 1, batch 3
    data = TokenData(41)
    resumed, after = run(data, resume_from=path)
    assert before + after == all_sizes
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, atol=0, rtol=0)


@pytest.mark.slow  # DataLoader worker processes
@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_streams_last_batch_is_padded_or_split_and_its_padding_known_with_workers(num_workers):
    def rank_batches(rank, even):
        loader = prepared(Stream(9), 2, rank, even_batches=even, batch_size=4, num_workers=num_workers)
        return [(b.tolist(), loader.padding) for b in loader]

    assert rank_batches(1, True) == [([4, 5, 6, 7], 0), ([8], 1)]  # wrapped within the last group
    assert rank_batches(0, True) == [([0, 1, 2, 3], 0), ([8], 0)]
    assert rank_batches(1, False) == [([4, 5, 6, 7], 0), ([], 0)]


def test_even_batches_is_a_setting_validated_by_name_and_passed_to_the_loaders():
    with pytest.raises(ValueError, match="even_batches must be True or False"):
        tl.init(even_batches="no")
    state, loader = tl.prepare(tl.init(even_batches=False), DataLoader(CountingDataset(3), batch_size=2))
    assert state.config.even_batches is False and loader.even_batches is False

"""Data across ranks, inside real worker processes: gather(loader=), uneven batches, batch samplers.

`data_checks` is started once by `trainloop.spawn.run(data_checks, n=2)` (tests/multiprocess/test_uneven.py)
and performs every check; it returns plain data and the tests assert on it. `LengthBucketing`
is the real length-bucketing batch sampler the tests shard.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.checks import WorkerResults
from tests.support.reference import CountingDataset, TokenData, tiny_model, token_loss_sum
from tests.support.samplers import LengthBucketing, token_lengths


class UnseededBatches(LengthBucketing):
    """A batch sampler with an RNG of its own, seeded differently on every rank: a user bug."""

    def __init__(self, lengths, batch_size, rank):
        super().__init__(lengths, batch_size)
        self.generator = torch.Generator().manual_seed(1000 + rank)

    def __iter__(self):
        batches = super()._batches()
        return iter([batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()])


def _train_tokens(state, loader, epochs: int, lr: float = 0.05):
    model = tiny_model()
    state, model, optimizer, loader = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=lr), loader)
    batch_rows = []
    for _ in range(loader.epoch, epochs):
        for x, y, mask in loader:
            batch_rows.append(len(x))
            with tl.accumulate(state, model):
                state = tl.backward(state, token_loss_sum(model, x, y, mask), num_items=mask.sum())
            state = tl.step(state, optimizer)
    weights = {k: v.detach().clone() for k, v in tl.unwrap(model).state_dict().items()}
    # Every rank's rows per batch: gathering them also proves every rank took as many batches.
    return weights, tl.gather(state, torch.tensor([batch_rows])).tolist(), state.step


def _error(call) -> str | None:
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def _on_every_rank(state, call) -> list[str | None]:
    """The ValueError `call` raised on each rank (None where it raised nothing)."""
    error = _error(call)
    return [tl.broadcast(state, error, src=r) for r in range(state.world_size)]


def _gather_checks(results: dict) -> None:
    state = tl.init(seed=9)
    rank = state.rank

    # 9 samples, batch 4, 2 ranks: the last global batch holds 1 sample; rank 1's row is padding.
    state, nine = tl.prepare(state, DataLoader(CountingDataset(9), batch_size=4))
    per_batch, rank_ids = [], []
    for batch in nine:
        per_batch += tl.gather(state, batch, loader=nine).tolist()
        rank_ids.append(tl.gather(state, torch.tensor([float(rank)])).tolist())  # no loader: nothing dropped
    results["gather_rank_ids_without_loader"] = rank_ids
    results["gather_per_batch_9"] = per_batch

    # The README pattern: collect over the pass, gather once after it.
    for n, shuffle in ((9, False), (11, True), (99, True), (8, False), (1, False)):
        state, loader = tl.prepare(state, DataLoader(CountingDataset(n), batch_size=4, shuffle=shuffle))
        for epoch in range(2):
            collected = torch.cat([batch for batch in loader])
            results[f"gather_after_{n}_{epoch}"] = tl.gather(state, collected, loader=loader).tolist()

    # Mid-epoch: nothing is padding yet; a broken-off pass, gathered, drops nothing.
    state, long = tl.prepare(state, DataLoader(CountingDataset(9), batch_size=2))
    seen = []
    for i, batch in enumerate(long):
        seen.append(batch)
        if i == 1:
            break
    results["gather_mid_epoch"] = tl.gather(state, torch.cat(seen), loader=long).tolist()

    # Rows that are not one per sample of the last batch or of the epoch: refused on every rank.
    collected = torch.cat([batch for batch in nine])
    results["gather_unmatched"] = _on_every_rank(state, lambda: tl.gather(state, collected.repeat(2), loader=nine))
    results["gather_unmatched_one_rank"] = _on_every_rank(
        state, lambda: tl.gather(state, collected if rank == 0 else collected[:2], loader=nine))
    results["gather_after_error_works"] = tl.gather(state, collected, loader=nine).tolist()

    # An IterableDataset read through DataLoader workers: the padding is known in the main process.
    state, stream = tl.prepare(state, DataLoader(_Stream(11), batch_size=2, num_workers=1))
    per_batch, collected = [], []
    for batch in stream:
        per_batch += tl.gather(state, batch, loader=stream).tolist()
        collected.append(batch)
    results["gather_stream_workers_per_batch"] = per_batch
    results["gather_stream_workers_after"] = tl.gather(state, torch.cat(collected), loader=stream).tolist()

    # even_batches=False: no padding at all; a rank may get an empty last batch.
    uneven = tl.init(seed=9, even_batches=False)
    uneven, loader = tl.prepare(uneven, DataLoader(CountingDataset(9), batch_size=4))
    per_batch, sizes, collected = [], [], []
    for batch in loader:
        sizes.append(len(batch))
        collected.append(batch)
        per_batch += tl.gather(uneven, batch, loader=loader).tolist()
    results["uneven_sizes"] = tl.gather(uneven, torch.tensor([sizes])).tolist()
    results["uneven_per_batch"] = per_batch
    results["uneven_after"] = tl.gather(uneven, torch.cat(collected), loader=loader).tolist()
    uneven, stream = tl.prepare(uneven, DataLoader(_Stream(9), batch_size=4, num_workers=1))
    results["uneven_stream"] = [i for batch in stream for i in tl.gather(uneven, batch, loader=stream).tolist()]


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


def _batch_sampler_checks(results: dict) -> None:
    state = tl.init(seed=4)
    lengths = token_lengths(41)  # 11 batches of the sampler: the last round is short

    # Every sample once per epoch across ranks (gather(loader=) drops the wrap-around batch).
    sampler = LengthBucketing(lengths, batch_size=4)
    state, loader = tl.prepare(state, DataLoader(CountingDataset(41), batch_sampler=sampler))
    results["bucketing_len"] = len(loader)
    for epoch in range(2):
        batches = [batch.tolist() for batch in loader]
        results[f"bucketing_batches_{epoch}"] = [tl.broadcast(state, batches, src=r) for r in (0, 1)]
        collected = torch.tensor([i for batch in batches for i in batch])
        results[f"bucketing_gathered_{epoch}"] = tl.gather(state, collected, loader=loader).tolist()
    results["bucketing_epochs_set"] = sampler.epochs_set

    # Resume mid-epoch: the rest of epoch 1 exactly, without reading the skipped batches.
    state, first = tl.prepare(state, DataLoader(CountingDataset(41), batch_sampler=LengthBucketing(lengths, 4)))
    list(first)
    seen = []
    for i, batch in enumerate(first):
        seen.append(batch.tolist())
        if i == 2:
            break
    position = first.state_dict()
    dataset = CountingDataset(41)
    state, resumed = tl.prepare(state, DataLoader(dataset, batch_sampler=LengthBucketing(lengths, 4)))
    resumed.load_state_dict(position)
    rest = [batch.tolist() for batch in resumed]
    results["bucketing_resume"] = [tl.broadcast(state, {"seen": seen, "rest": rest, "position": position,
                                                        "reads": sorted(dataset.reads)}, src=r) for r in (0, 1)]

    # A sampler whose ranks draw different batches is refused on every rank.
    state, bad = tl.prepare(state, DataLoader(CountingDataset(41),
                                              batch_sampler=UnseededBatches(lengths, 4, state.rank)))
    results["bucketing_unseeded"] = _on_every_rank(state, lambda: next(iter(bad)))
    # A DistributedSampler shards by itself: every rank's order differs, refused as well.
    dataset = CountingDataset(10)
    state, double = tl.prepare(state, DataLoader(dataset, batch_size=2,
                                                 sampler=torch.utils.data.DistributedSampler(dataset)))
    results["distributed_sampler"] = _on_every_rank(state, lambda: next(iter(double)))


def data_checks() -> WorkerResults:
    """Every check; each reported alone (tests/support/checks.py): one that raises fails its tests only."""
    results = WorkerResults()
    with results.check("gather"):
        _gather_checks(results)
    with results.check("batch samplers"):
        _batch_sampler_checks(results)

    # Training on uneven data: 32 * 2 + 3 and 32 * 2 + 1 sequences, 16 per rank and batch.
    for even in (True, False):
        with results.check(f"uneven tokens, even_batches={even}"):
            state = tl.init(seed=5, even_batches=even)
            results[f"tokens_67_even_{even}"] = _train_tokens(
                state, DataLoader(TokenData(67), batch_size=16, shuffle=True), epochs=2)
    with results.check("uneven tokens, accumulate 2"):
        state = tl.init(seed=5, accumulate=2, even_batches=False)
        results["tokens_65_uneven_accumulate_2"] = _train_tokens(
            state, DataLoader(TokenData(65), batch_size=16, shuffle=True), epochs=2)

    # A length-bucketing batch sampler, uneven: the short last round leaves rank 1 an empty batch.
    with results.check("length bucketing"):
        state = tl.init(seed=6, even_batches=False)
        results["bucketing_tokens"] = _train_tokens(
            state, DataLoader(TokenData(41), batch_sampler=LengthBucketing(token_lengths(41), 4)), epochs=2)
        tl.finish(state)
    return results

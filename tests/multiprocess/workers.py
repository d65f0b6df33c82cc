"""Functions that run inside the worker processes of the multi-process tests.

Each is started once by `trainloop.spawn.run(fn, n=2)` and performs many checks, so that the
suite pays for few process start-ups. They return plain data; the tests assert on it.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.reference import CountingDataset, TokenData, mse, regression_data, tiny_model, token_loss_sum
from tests.support.tracking import check_two_rank_tracking
from trainloop.callbacks import Callback


def _train(state, model, optimizer, loader, epochs, *, tokens=False):
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, loader)
    for _ in range(loader.epoch, epochs):
        for batch in loader:
            with tl.accumulate(state, model):
                if tokens:
                    x, y, mask = batch
                    state = tl.backward(state, token_loss_sum(model, x, y, mask), num_items=mask.sum())
                else:
                    state = tl.backward(state, mse(model, *batch))
            state = tl.step(state, optimizer)
    return state, model


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tl.unwrap(model).state_dict().items()}


def _gathered_indices(state, n: int, batch_size: int, shuffle: bool) -> list[int]:
    state, loader = tl.prepare(state, DataLoader(CountingDataset(n), batch_size=batch_size, shuffle=shuffle))
    seen: list[int] = []
    for batch in loader:
        seen.extend(tl.gather(state, batch, loader=loader).tolist())
    return seen


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


class _Recorder(Callback):
    def __init__(self):
        self.reports = []

    def on_log(self, state, metrics):
        self.reports.append((state.step, metrics))


def ddp_checks(tmp_dir: str) -> dict:
    """Everything about DDP training, the collectives and tracking, on 2 ranks (gloo, CPU)."""
    results: dict = {}
    state = tl.init(accumulate=2, seed=3)
    results["world_size"], results["backend"] = state.world_size, state.topology.backend

    # 40 samples, 4 per rank and batch, 2 ranks, windows of 2: windows 2, 2 and a short 1.
    model = tiny_model()
    state, model = _train(state, model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                          DataLoader(regression_data(40), batch_size=4, shuffle=True), epochs=2)
    results["ddp_weights"], results["ddp_steps"] = _weights(model), state.step

    # Ragged token counts per micro-batch and per rank; 30 sequences: windows 2, 2, 1.
    tokens = tiny_model()
    _state_t, tokens = _train(tl.init(accumulate=2, seed=5), tokens,
                             torch.optim.SGD(tokens.parameters(), lr=0.05),
                             DataLoader(TokenData(30), batch_size=3, shuffle=True), epochs=2, tokens=True)
    results["token_weights"] = _weights(tokens)

    # Per-batch gathering covers every sample once, in order when not shuffled.
    plain = tl.init(seed=9)
    for n in (11, 99, 8):
        results[f"gather_{n}"] = _gathered_indices(plain, n, 4, shuffle=False)
    # An IterableDataset: every rank reads the stream and keeps its chunk of each global batch.
    plain, stream = tl.prepare(plain, DataLoader(_Stream(11), batch_size=2))
    results["gather_stream_11"] = [i for batch in stream for i in tl.gather(plain, batch, loader=stream).tolist()]
    shuffled = _gathered_indices(plain, 99, 4, shuffle=True)
    results["gather_shuffled"] = shuffled
    results["gather_shuffled_same_on_every_rank"] = shuffled == tl.broadcast(plain, shuffled, src=1)

    # Sizes that differ per rank; nested trees.
    ragged = {"a": torch.arange(plain.rank + 1), "b": [torch.full((plain.rank + 2, 2), plain.rank)]}
    results["gather_ragged"] = tl.gather(plain, ragged)

    # The other collectives.
    rank = plain.rank
    results["reduce"] = {op: tl.reduce(plain, {"t": torch.tensor([rank + 1.0, 10.0 * rank]), "n": rank + 1}, op=op)
                         for op in ("sum", "mean", "max", "min")}
    results["broadcast_tensor"] = tl.broadcast(plain, torch.full((3,), float(rank)), src=1)
    results["broadcast_object"] = tl.broadcast(plain, {"from": rank, "items": [rank] * 2}, src=0)
    results["split"] = tl.gather(plain, tl.split(plain, torch.arange(7)))
    results["split_list"] = tl.split(plain, list("abcde"))
    order = []
    with tl.main_first(plain):
        order.append(("inside", rank))
        tl_value = torch.tensor([float(rank)])
    results["main_first_done"] = tl.gather(plain, tl_value).tolist()

    # A mismatched gather raises on every rank instead of hanging.
    try:
        tl.gather(plain, torch.zeros(2, 3 + rank))
        results["mismatch"] = None
    except ValueError as error:
        results["mismatch"] = str(error)
    results["mismatch_on_every_rank"] = tl.gather(plain, torch.tensor([results["mismatch"] is not None])).tolist()

    # log: one collective per flush, the cross-rank mean on the main process.
    recorder = _Recorder()
    logging = tl.init(log_every=1, callbacks=[recorder])
    model = tiny_model()
    logging, model, opt = tl.prepare(logging, model, torch.optim.SGD(model.parameters(), lr=0.0))
    x, y = regression_data(4).tensors
    logging = tl.step(tl.backward(logging, mse(model, x, y)), opt)
    logging = tl.log(logging, rank_value=torch.tensor(float(rank) * 2), constant=3.0)
    results["log_reports"] = recorder.reports

    # Trackers: one run, written by rank 0 only, with the cross-rank means.
    results["tracking"] = check_two_rank_tracking(tmp_dir)

    tl.finish(state)
    return results

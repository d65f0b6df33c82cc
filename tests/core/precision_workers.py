"""Precision checks that run inside 2 worker processes (gloo, CPU), and the data they share with
the tests' single-process references.

`two_rank_checks` is started once by `trainloop.spawn.run(fn, n=2)` and returns plain data from
every rank (gathered to rank 0); tests/core/test_precision.py asserts on it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import trainloop as tl
from tests.support.reference import mse, tiny_model
from trainloop.callbacks import ClipGradNorm, LossScale

SCALER = {"init_scale": 2.0**10, "growth_interval": 2}  # small: the growth shows in a short run
MICRO_BATCHES, BATCH_SIZE, ACCUMULATE = 8, 8, 2
OVERFLOW_AT = 2  # micro-batch 2 opens window 1; its inf input overflows the whole window
CLIP = 0.5


def micro_batches(count: int = MICRO_BATCHES, batch_size: int = BATCH_SIZE,
                  overflow_at: int | None = OVERFLOW_AT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded (x, y) micro-batches; the last row of micro-batch `overflow_at` holds an inf input.

    On 2 ranks, rank r takes rows r::2 of each micro-batch, so the inf row goes to rank 1 only.
    """
    generator = torch.Generator().manual_seed(7)
    batches = [(torch.randn(batch_size, 6, generator=generator), torch.randn(batch_size, 3, generator=generator))
               for _ in range(count)]
    if overflow_at is not None:
        batches[overflow_at][0][-1, 0] = float("inf")
    return batches


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of the fp16 checks: SGD's update, unlike Adam's, shows any error in the
    gradients' scale (a missed unscale, a wrong 1/k)."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _from_every_rank(value):
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def _ddp_fp16_run() -> dict:
    """fp16 + DDP + accumulation + clipping, with an overflow on rank 1 only."""
    scaler, clip = LossScale(**SCALER), ClipGradNorm(CLIP)
    state = tl.init(precision="fp16", accumulate=ACCUMULATE, seed=0, callbacks=[scaler, clip])
    model = tiny_model()
    optimizer = sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    state, model, optimizer, scheduler = tl.prepare(state, model, optimizer, scheduler)
    scales, norms, skipped = [], [], []
    for x, y in micro_batches():
        with tl.accumulate(state, model):
            state = tl.backward(state, mse(model, x[state.rank::2], y[state.rank::2]))
        if state.window_micro_steps == ACCUMULATE:  # this step closes the window
            before = scaler.skipped_steps
            state = tl.step(state, optimizer)
            scales.append(scaler.scale)
            norms.append(float(clip.last_norm))
            skipped.append(scaler.skipped_steps > before)
    weights = {k: v.detach().clone() for k, v in tl.unwrap(model).state_dict().items()}
    return {"scales": scales, "norms": norms, "skipped": skipped, "step": state.step,
            "scheduler_steps": scheduler.last_epoch, "weights": weights}


def _fsdp2_run() -> dict:
    """LossScale and ClipGradNorm on DTensor (FSDP2) gradients; an inf in one rank's shard only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = tiny_model()
    for layer in (model[0], model[3], model):
        fully_shard(layer, mesh=mesh)
    scaler, clip = LossScale(**SCALER), ClipGradNorm(CLIP)
    state = tl.init(seed=0, callbacks=[scaler, clip])
    # The model is sharded by hand: only the optimizer (over the DTensor parameters) is prepared.
    state, optimizer = tl.prepare(state, torch.optim.SGD(model.parameters(), lr=0.1))
    norms, skipped = [], []
    for index, (x, y) in enumerate(micro_batches(count=4, overflow_at=None)):
        state = tl.backward(state, mse(model, x[state.rank::2], y[state.rank::2]))
        if index == 1 and state.rank == 1:
            # An overflow in rank 1's shard alone (as when the reduce-scatter sums an inf into
            # one shard): rank 0's shards are finite, and only the all-reduce can tell it.
            model[0].weight.grad.to_local()[0, 0] = float("inf")
        before = scaler.skipped_steps
        state = tl.step(state, optimizer)
        norms.append(float(clip.last_norm))
        skipped.append(scaler.skipped_steps > before)
    weights = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    return {"norms": norms, "skipped": skipped, "step": state.step, "scale": scaler.scale,
            "weights": weights}


def two_rank_checks() -> dict:
    """Every 2-rank precision check; each entry is a list with one result per rank."""
    return {"ddp_fp16": _from_every_rank(_ddp_fp16_run()), "fsdp2": _from_every_rank(_fsdp2_run())}

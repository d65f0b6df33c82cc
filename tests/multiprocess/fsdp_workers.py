"""What runs inside the worker processes of the FSDP tests (tests/multiprocess/test_fsdp.py).

`fsdp_checks` is started once on 2 ranks by `trainloop.spawn.run` and performs every check that
needs a live FSDP job; it returns plain data (rank 0's) that the tests assert on.
`resumable_training` is the run that tests/support/scripts/fsdp_resumable.py checkpoints, kills and
resumes at other world sizes; `fsdp_checks` runs it uninterrupted for comparison.
"""

from __future__ import annotations

import os
import resource
import signal
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.checks import WorkerResults
from tests.support.models import BlockModel, full_weights, probe_input
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Checkpoint, ClipGradNorm, LossScale
from trainloop.checkpoint import CheckpointError

GLOBAL_MICRO_BATCHES = 4  # per optimizer step, over all ranks: the same update at any world size
BATCH_SIZE = 4


def train(state, model, optimizer, loader, epochs: int, on_step=None):
    """The loop as users write it; `on_step(state)` after each optimizer step. Returns the state."""
    for _ in range(loader.epoch, epochs):
        for x, y in loader:
            with tl.accumulate(state, model):
                state = tl.backward(state, mse(model, x, y))
            before = state.step
            state = tl.step(state, optimizer)
            if on_step is not None and state.step != before:
                on_step(state)
    return state


def resumable_training(checkpoints: str | None, epochs: int = 3, on_step=None):
    """AdamW, StepLR, shuffling, accumulation with a short last window, under FSDP.

    The global batch (16 samples) is the same at any world size, so runs that resume on another
    world size must end at the same weights. `on_step(state)` is called after each optimizer
    step. Returns (state, model).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    state = tl.init(strategy="fsdp", seed=11, accumulate=GLOBAL_MICRO_BATCHES // world_size,
                    callbacks=[Checkpoint(checkpoints, every=2)] if checkpoints else [])
    model = BlockModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    loader = DataLoader(regression_data(40), batch_size=BATCH_SIZE, shuffle=True)
    state, model, optimizer, loader, scheduler = tl.prepare(state, model, optimizer, loader, scheduler)
    return train(state, model, optimizer, loader, epochs, on_step), model


def _equivalence_runs(results: dict) -> None:
    """FSDP (also without resharding, with CPU offload) and DDP with accumulation; FSDP with clipping."""
    runs = {"fsdp": {"strategy": "fsdp"}, "ddp": {"strategy": "ddp"},
            "fsdp_options": {"strategy": "fsdp", "fsdp_reshard_after_forward": False, "fsdp_cpu_offload": True}}
    for name, settings in runs.items():
        state = tl.init(accumulate=2, seed=3, **settings)
        model = BlockModel()
        state, model, optimizer, loader = tl.prepare(
            state, model, torch.optim.AdamW(model.parameters(), lr=1e-2),
            DataLoader(regression_data(40), batch_size=4, shuffle=True))
        state = train(state, model, optimizer, loader, epochs=2)
        results[f"{name}_weights"], results[f"{name}_steps"] = full_weights(model), state.step

    clip = ClipGradNorm(max_norm=0.05)
    norms: list[float] = []
    state = tl.init(strategy="fsdp", accumulate=2, seed=3, callbacks=[clip])
    model = BlockModel()
    state, model, optimizer, loader = tl.prepare(
        state, model, torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(regression_data(40), batch_size=4, shuffle=True))
    train(state, model, optimizer, loader, epochs=1, on_step=lambda _: norms.append(float(clip.last_norm)))
    results["clip_weights"], results["clip_norms"] = full_weights(model), norms


def _gradient_sync_checks(results: dict) -> None:
    """Off the window's last micro-step FSDP keeps gradients unreduced; on it, reduce-scatters."""
    state = tl.init(strategy="fsdp", accumulate=2, seed=3)
    model = BlockModel()
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = regression_data(8).tensors
    seen = []
    for micro_batch in (slice(0, 4), slice(4, 8)):
        with tl.accumulate(state, model):
            state = tl.backward(state, mse(model, x[micro_batch], y[micro_batch]))
        seen.append([p.grad is not None for p in model.parameters()])
    results["grads_after_micro_steps"] = seen
    results["grad_types"] = sorted({type(p.grad).__name__ for p in model.parameters()})
    tl.step(state, optimizer)


def _loss_scale_checks(results: dict) -> None:
    """An inf in rank 1's shard alone makes every rank skip the step and back off."""
    scaler = LossScale(init_scale=1024.0)
    state = tl.init(strategy="fsdp", seed=3, callbacks=[scaler])
    model = BlockModel()
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = regression_data(8).tensors
    before = full_weights(model)
    state = tl.backward(state, mse(model, x, y))
    if state.rank == 1:
        model.head.weight.grad.to_local()[0, 0] = float("inf")  # rank 1's shard only
    state = tl.step(state, optimizer)
    results["overflow_skipped"] = (scaler.skipped_steps, state.step, scaler.scale)
    results["overflow_weights_unchanged"] = all(
        torch.equal(before[k], v) for k, v in full_weights(model).items())
    state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
    results["clean_step"] = (scaler.skipped_steps, state.step)


def _block_selection_checks(results: dict) -> None:
    from torch.distributed.fsdp import FSDPModule

    def sharded(state, model) -> list[str]:
        state, model = tl.prepare(state, model)
        return [name or "<root>" for name, m in tl.unwrap(model).named_modules() if isinstance(m, FSDPModule)]

    results["default_blocks"] = sharded(tl.init(strategy="fsdp"), BlockModel())
    results["named_blocks"] = sharded(tl.init(strategy="fsdp", blocks="Block,Linear"), BlockModel(depth=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results["root_only"] = sharded(tl.init(strategy="fsdp"), tiny_model())
    results["root_only_warnings"] = [str(w.message) for w in caught]
    try:
        tl.prepare(tl.init(strategy="fsdp", fsdp_blocks="Layer"), BlockModel())
    except ValueError as error:
        results["unknown_block_error"] = str(error)


def _optimizer_checks(results: dict) -> None:
    from torch.distributed.tensor import DTensor

    model = BlockModel()
    optimizer = torch.optim.AdamW([{"params": [model.embed.weight], "lr": 0.5},
                                   {"params": [p for n, p in model.named_parameters() if n != "embed.weight"]}],
                                  lr=1e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    _, prepared_model, prepared, prepared_scheduler = tl.prepare(
        tl.init(strategy="fsdp"), model, optimizer, scheduler)
    sharded = list(tl.unwrap(prepared_model).parameters())
    held = [p for group in prepared.param_groups for p in group["params"]]
    results["optimizer_same_object"] = prepared is optimizer and prepared_scheduler is scheduler
    results["optimizer_holds_the_shards"] = (
        all(isinstance(p, DTensor) for p in held) and {id(p) for p in held} == {id(p) for p in sharded}
        and prepared.param_groups[0]["params"][0] is tl.unwrap(prepared_model).embed.weight)
    results["optimizer_groups"] = [(g["lr"], g["weight_decay"], len(g["params"])) for g in prepared.param_groups]

    stepped = BlockModel()
    stepped_optimizer = torch.optim.SGD(stepped.parameters(), lr=0.1, momentum=0.9)
    mse(stepped, *regression_data(4).tensors).backward()
    stepped_optimizer.step()
    stray = BlockModel()
    temperature = nn.Parameter(torch.ones(()))
    for name, objects in (("stepped", (stepped, stepped_optimizer)),
                          ("stray", (stray, torch.optim.SGD([*stray.parameters(), temperature], lr=0.1)))):
        try:
            tl.prepare(tl.init(strategy="fsdp"), *objects)
        except ValueError as error:
            results[f"{name}_optimizer_error"] = str(error)


def _mixed_precision_checks(results: dict) -> None:
    state = tl.init(strategy="fsdp", precision="bf16")
    model = BlockModel()
    state, model = tl.prepare(state, model)
    results["bf16_param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})  # the shards
    output = model(probe_input())
    results["bf16_output"] = (str(output.dtype), output.detach())
    results["fp32_output"] = BlockModel()(probe_input()).detach()
    x, y = regression_data(8).tensors
    for precision in ("fp16", "bf16-true"):
        state = tl.init(strategy="fsdp", precision=precision)
        model = BlockModel()
        state, model, optimizer = tl.prepare(state, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        losses = []
        for _ in range(3):
            loss = mse(model, x, y)
            state = tl.step(tl.backward(state, loss), optimizer)
            losses.append(float(loss))
        results[f"{precision}_training"] = (losses, state.step, str(optimizer.param_groups[0]["params"][0].dtype))


def _early_save_checks(results: dict, directory: Path) -> None:
    """A save before the first step leaves the optimizer untouched: training goes on the same."""
    x, y = regression_data(8).tensors
    weights = []
    for save in (True, False):
        state = tl.init(strategy="fsdp")
        model = BlockModel()
        state, model, optimizer = tl.prepare(state, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        if save:
            tl.save(state, directory / "before-first-step")
            results["optimizer_state_after_early_save"] = len(optimizer.state)
        state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
        weights.append(full_weights(model))
    results["early_save_trains_the_same"] = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    state = tl.init(strategy="fsdp")
    model = BlockModel(seed=5)
    state, model, optimizer = tl.prepare(state, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    tl.load(state, directory / "before-first-step")
    results["optimizer_state_after_early_load"] = len(optimizer.state)
    results["early_load_weights"] = full_weights(model)


def _other_runs_load_the_sharded_checkpoint(results: dict, checkpoint: Path) -> None:
    """A DDP run reads a sharded checkpoint too: every rank loads whole tensors through DCP."""
    state = tl.init(strategy="ddp")
    model = BlockModel(seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    loader = DataLoader(regression_data(40), batch_size=BATCH_SIZE, shuffle=True)
    state, model, optimizer, loader, scheduler = tl.prepare(state, model, optimizer, loader, scheduler)
    state = tl.load(state, checkpoint)
    results["ddp_loaded_weights"], results["ddp_loaded_step"] = full_weights(model), state.step


def _disk_full_checks(results: dict, state, directory: Path) -> None:
    """A rank that cannot write its shards fails the save on every rank; nothing is committed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if state.rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, hard))  # like a disk with 512 bytes left
    try:
        tl.save(state, directory / "full-disk")
    except CheckpointError as error:
        results["disk_full_error"] = str(error)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    results["disk_full_left"] = sorted(p.name for p in directory.iterdir() if "full-disk" in p.name)
    tl.save(state, directory / "after-full-disk")
    results["save_after_disk_full"] = sorted(p.name for p in (directory / "after-full-disk").iterdir())


def fsdp_checks(directory: str) -> WorkerResults:
    """Every check that needs a live 2-rank FSDP job; writes a checkpoint and an export.

    Each check is reported alone (tests/support/checks.py): one that raises fails its tests only.
    """
    results = WorkerResults()
    job = tl.init(strategy="fsdp")  # joins the process group; finish leaves it
    results["world_size"], results["backend"] = job.world_size, job.topology.backend
    for check in (_equivalence_runs, _gradient_sync_checks, _loss_scale_checks, _block_selection_checks,
                  _optimizer_checks, _mixed_precision_checks):
        with results.check(check.__name__):
            check(results)
    with results.check("early saves"):
        _early_save_checks(results, Path(directory))

    with results.check("the sharded checkpoint"):
        state, model = resumable_training(None)
        results["uninterrupted_weights"], results["uninterrupted_steps"] = full_weights(model), state.step
        results["sharded_output"] = model(probe_input()).detach()
        tl.save(state, Path(directory) / "sharded")
        tl.export(state, Path(directory) / "model.safetensors")
        results["checkpoint_files"] = sorted(p.name for p in (Path(directory) / "sharded").iterdir())
    with results.check("other runs load the sharded checkpoint"):
        _other_runs_load_the_sharded_checkpoint(results, Path(directory) / "sharded")
    with results.check("disk full"):
        _disk_full_checks(results, state, Path(directory))
    tl.finish(job)
    return results

"""What runs inside the 2-rank FSDP job of tests/checkpoint/test_checkpoint_async_sharded.py.

`async_sharded_checks` is started once by `trainloop.spawn.run` and performs every check of
background (async) sharded saves that needs a live job; rank 0's results come back as plain data.
DCP's writes are slowed where a check needs the save to be still in flight: `slowed_writes`
makes `FileSystemWriter.write_data` (on DCP's thread) sleep before it writes, and
`failing_writes` makes one rank's raise, as a full disk would.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.utils.data import DataLoader, TensorDataset

import trainloop as tl
from tests.multiprocess.fsdp_workers import BATCH_SIZE, GLOBAL_MICRO_BATCHES, resumable_training, train
from tests.support.checks import WorkerResults
from tests.support.models import BlockModel, full_weights
from tests.support.reference import regression_data
from trainloop.checkpoint import CheckpointError
from trainloop.errors import PreviousSaveFailed

SAVE_STEP = 3  # the step whose background save training runs past
DELAY = 2.0  # seconds every rank's DCP write sleeps first, where slowed


def install_test_writes(rank: int) -> None:
    """DCP's writes into a checkpoint named `slow-*` sleep DELAY seconds first (every rank); into
    one named `fail-*`, rank 1's raise a full disk. Chosen by the save's directory, not while a
    call lasts: DCP writes on its own thread, after `tl.save` returned."""
    write_data = FileSystemWriter.write_data

    def write(self, plan, planner):
        name = Path(self.path).name  # the save's own partial directory: .<name>.<host>-<pid>-<n>.partial
        if name.startswith(".slow-"):
            time.sleep(DELAY)
        if name.startswith(".fail-") and rank == 1:
            raise OSError(28, "No space left on device (simulated)")
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = write


def _save_and_go_on(directory: Path) -> dict:
    """resumable_training, with a background save at SAVE_STEP whose write training runs past."""
    seen: dict = {}

    def on_step(state):
        if state.step == SAVE_STEP:
            began = time.perf_counter()
            future = tl.save(state, directory / "slow-background", background=True)
            seen["background_seconds"] = time.perf_counter() - began
            seen["done_on_return"] = future.done()
            seen["future"] = future
        elif state.step == SAVE_STEP + 2:
            # Two optimizer steps have changed every weight in place while the save was writing.
            seen["done_after_two_steps"] = seen["future"].done()
            seen["result"] = str(seen["future"].result())
            if state.is_main:  # rank 0's Future is the commit; another rank's, its shards written
                seen["latest"] = (directory / "latest").read_text().strip()

    state, model = resumable_training(None, on_step=on_step)
    seen["weights"] = full_weights(model)
    del seen["future"]
    tl.finish(state)
    return seen


def _synchronous_save_seconds(directory: Path) -> float:
    state = tl.init(strategy="fsdp", seed=11)
    model, optimizer = _model_and_optimizer()
    state, model, optimizer = tl.prepare(state, model, optimizer)
    began = time.perf_counter()
    tl.save(state, directory / "slow-synchronous")
    seconds = time.perf_counter() - began
    tl.finish(state)
    return seconds


def _model_and_optimizer():
    model = BlockModel()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _resumed_from(checkpoint: Path) -> tuple[int, dict]:
    """resumable_training restarted from `checkpoint` (loaded before its first step)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    state = tl.init(strategy="fsdp", seed=11, accumulate=GLOBAL_MICRO_BATCHES // world_size)
    model = BlockModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    loader = DataLoader(regression_data(40), batch_size=BATCH_SIZE, shuffle=True)
    state, model, optimizer, loader, scheduler = tl.prepare(state, model, optimizer, loader, scheduler)
    state = tl.load(state, checkpoint)
    state = train(state, model, optimizer, loader, 3)
    weights = full_weights(model)
    tl.finish(state)
    return state.step, weights


def _failures(results: WorkerResults, directory: Path) -> None:
    """A rank's DCP write fails: that save's Future raises on every rank; unretrieved, the next
    save raises PreviousSaveFailed on every rank, and `finish` raises too; nothing is committed."""
    state = tl.init(strategy="fsdp", seed=11)
    model, optimizer = _model_and_optimizer()
    state, model, optimizer = tl.prepare(state, model, optimizer)
    future = tl.save(state, directory / "fail-retrieved", background=True)
    try:
        future.result()
        results["retrieved_error"] = None
    except CheckpointError as error:
        results["retrieved_error"] = str(error)
    tl.save(state, directory / "after-retrieved", background=True).result()  # raised once, not again
    tl.save(state, directory / "fail-unretrieved", background=True)
    try:
        tl.save(state, directory / "next", background=True)
        results["next_save_error"] = None
    except PreviousSaveFailed as error:
        results["next_save_error"] = str(error)
    tl.save(state, directory / "fail-at-finish", background=True)
    try:
        tl.finish(state)
        results["finish_error"] = None
    except CheckpointError as error:
        results["finish_error"] = str(error)
    results["entries"] = sorted(p.name for p in directory.iterdir())


def async_sharded_checks(directory: str) -> WorkerResults:
    """Every check of the job; rank 0's results (each rank's failures are in them)."""
    root = Path(directory)
    results = WorkerResults()
    install_test_writes(int(os.environ["RANK"]))
    with results.check("uninterrupted"):
        state, model = resumable_training(None)
        results["uninterrupted_steps"] = state.step
        results["uninterrupted_weights"] = full_weights(model)
        tl.finish(state)
    with results.check("a background save that training runs past"):
        (root / "async").mkdir(exist_ok=True)
        seen = _save_and_go_on(root / "async")
        results.update({f"async_{key}": value for key, value in seen.items()})
    with results.check("a synchronous save with the same slowed writes"):
        (root / "sync").mkdir(exist_ok=True)
        results["sync_seconds"] = _synchronous_save_seconds(root / "sync")
    with results.check("resumed from the background save"):
        step, weights = _resumed_from(root / "async" / "slow-background")
        results["resumed_steps"], results["resumed_weights"] = step, weights
    with results.check("tensor parallel"):
        (root / "tp").mkdir(exist_ok=True)
        results["tp_uninterrupted"] = _tp_run(root / "tp", None, None)["weights"]
        seen = _tp_run(root / "tp", 3, None)
        results["tp_done_on_return"], results["tp_result"] = seen["done_on_return"], seen["result"]
        results["tp_async_weights"] = seen["weights"]
        results["tp_resumed"] = _tp_run(root / "tp", None, root / "tp" / "slow-tp")["weights"]
    with results.check("failures"):
        (root / "failures").mkdir(exist_ok=True)
        _failures(results, root / "failures")
    return results


TP_PLAN = {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


def _tp_run(directory: Path, save_at: int | None, load: Path | None, steps: int = 6) -> dict:
    """tp=2 (a 1-rank dp mesh under FSDP): AdamW on a residual stack; a background save at
    `save_at` that training runs past, or a start from `load`. Returns the full weights."""
    from tests.strategies.tensor_parallel_workers import Stack

    state = tl.init(strategy="fsdp", tp=2, tp_plan=TP_PLAN, seed=5)
    model = Stack()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(48, 8, generator=generator), torch.randn(48, 6, generator=generator))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, loader)
    if load is not None:
        state = tl.load(state, load)
    seen: dict = {}
    batches = iter(loader)
    while state.step < steps:
        x, y = next(batches)
        state = tl.step(tl.backward(state, ((model(x) - y) ** 2).mean()), optimizer)
        if state.step == save_at:
            future = tl.save(state, directory / "slow-tp", background=True)
            seen["done_on_return"] = future.done()
            seen["future"] = future
    if "future" in seen:
        seen["result"] = str(seen.pop("future").result())
    seen["weights"] = full_weights(model)
    tl.finish(state)
    return seen

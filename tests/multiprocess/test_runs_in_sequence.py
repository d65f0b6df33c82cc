"""Runs that follow one another in the same processes: `init ... finish`, then `init` again.

A sweep, a notebook cell run twice, training then a fresh evaluation run: each joins a new
process group in workers that already joined one. The ranks reach the next `init` at different
moments, which is when a new group used to meet over the previous group's store keys and hang.
One `spawn.run` trains several runs in a row with every shipped callback attached;
a second `spawn.run` from this same Python process trains again with other settings.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.reference import big_batch_reference, mse, regression_data, tiny_model
from trainloop import spawn
from trainloop.callbacks import Checkpoint, JSONLines, MLflow, Progress, TensorBoard, WandB

pytestmark = pytest.mark.multiprocess

LEARNING_RATES = (1e-2, 2e-2, 3e-2)
LATE_BY_S = 1.5  # how long the late rank of each run arrives after the other


def runs_in_sequence(tmp_dir: str, learning_rates: tuple[float, ...], every_callback: bool) -> list[dict] | None:
    """One run per learning rate, one after the other in these processes; rank 0 returns what each left."""
    seen = []
    for index, lr in enumerate(learning_rates):
        run_dir = Path(tmp_dir) / f"run{index}"
        if int(os.environ["RANK"]) == index % 2:
            time.sleep(LATE_BY_S)  # the ranks arrive at init at different moments, rank 0 or 1 last
        callbacks = [Checkpoint(run_dir / "checkpoints"), JSONLines(run_dir / "metrics.jsonl")]
        if every_callback:
            callbacks += [TensorBoard(run_dir / "tb"), MLflow(experiment="sweep", dir=run_dir / "ml"),
                          WandB(project="sweep", mode="offline", dir=str(run_dir)), Progress()]
        # A run that met over the previous group's keys hung here or in its first collective
        # until this timeout, and the job failed.
        state = tl.init(seed=3, log_every=2, timeout=60, callbacks=callbacks)
        model = tiny_model()
        state, model, optimizer, loader = tl.prepare(
            state, model, torch.optim.AdamW(model.parameters(), lr=lr),
            DataLoader(regression_data(40), batch_size=4, shuffle=True))
        for _epoch in range(2):
            for x, y in loader:
                with tl.accumulate(state, model):
                    loss = mse(model, x, y)
                    state = tl.backward(state, loss)
                state = tl.step(state, optimizer)
                state = tl.log(state, loss=loss)
        tl.finish(state)
        seen.append({"weights": {k: v.detach().clone() for k, v in tl.unwrap(model).state_dict().items()},
                     "steps": state.step, "world_size": state.world_size,
                     "accumulate": state.config.accumulate})
    if int(os.environ["RANK"]) != 0:
        return None
    return seen


def reference_weights(lr: float, accumulate: int) -> dict:
    model = tiny_model()
    big_batch_reference(model, torch.optim.AdamW(model.parameters(), lr=lr), regression_data(40),
                        big_batch=8 * accumulate, epochs=2, seed=3, shuffle=True)
    return model.state_dict()


def assert_trained_like_one_process(run: dict, lr: float) -> None:
    for name, value in reference_weights(lr, run["accumulate"]).items():
        torch.testing.assert_close(run["weights"][name], value, atol=1e-6, rtol=0, msg=f"lr={lr}: {name}")


def test_runs_in_sequence_in_the_same_processes_and_spawn_run_twice(tmp_path):
    from tests.support.tracking import mlflow_run_ids, read_jsonlines, read_mlflow, read_tensorboard, read_wandb

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    first = spawn.run(runs_in_sequence, str(tmp_path / "first"), LEARNING_RATES, True, n=2)
    # The same Python process launches again, with other settings: nothing of the first job leaks.
    second = spawn.run(runs_in_sequence, str(tmp_path / "second"), LEARNING_RATES[:2], False,
                       n=2, accumulate=2)
    assert not any(name.startswith("TRAINLOOP_") for name in os.environ)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # torch's handlers are undone

    assert [run["world_size"] for run in first + second] == [2] * 5
    assert [run["accumulate"] for run in first + second] == [1, 1, 1, 2, 2]
    for run, lr in zip(first + second, LEARNING_RATES + LEARNING_RATES[:2]):
        assert_trained_like_one_process(run, lr)

    for index, run in enumerate(first):
        run_dir = tmp_path / "first" / f"run{index}"
        reported = {line["step"]: line["loss"] for line in read_jsonlines(run_dir / "metrics.jsonl")}
        assert run["steps"] == 10 and sorted(reported) == [2, 4, 6, 8, 10]
        assert dict(read_tensorboard(run_dir / "tb")) == pytest.approx(reported)
        [mlflow_run] = mlflow_run_ids(run_dir / "ml", "sweep")
        assert dict(read_mlflow(run_dir / "ml", mlflow_run)) == pytest.approx(reported)
        [wandb_run] = read_wandb(run_dir)
        assert dict(wandb_run["history"]) == pytest.approx(reported)
        assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-00000010"]
    for index in range(2):
        run_dir = tmp_path / "second" / f"run{index}"
        assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-00000006"]

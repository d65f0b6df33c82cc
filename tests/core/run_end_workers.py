"""Worker functions of the multi-process end-of-run tests (started by `trainloop.spawn.run`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Callback, Checkpoint


class FailsAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, state):
        if state.step == self.step:
            raise RuntimeError(f"callback failed at step {state.step}")


def finish_in_finally(directory: str, results: str) -> None:
    """Every rank: a callback raises at step 3, and the user's `finally: tl.finish(state)` runs
    with the exception in flight. It must return (no collective another rank may never join),
    keep the exception, and complete the background save of step 2. Each rank writes what it
    saw to `results/rank-N.json` (the process group is gone after finish: no gather)."""
    state = tl.init(seed=0, callbacks=[Checkpoint(directory, every=2), FailsAt(3)])
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, DataLoader(regression_data(32), batch_size=2))
    batches = iter(loader)
    caught = None
    with warnings.catch_warnings(record=True) as given:
        warnings.simplefilter("always")
        try:
            try:
                for _ in range(5):
                    state = tl.step(tl.backward(state, mse(model, *next(batches))), optimizer)
            finally:
                tl.finish(state)
        except RuntimeError as error:
            caught = str(error)
    seen = {"caught": caught, "finished": state.lineage.finished,
            "warnings": [str(w.message) for w in given if issubclass(w.category, tl.RunEndWarning)]}
    (Path(results) / f"rank-{state.rank}.json").write_text(json.dumps(seen))

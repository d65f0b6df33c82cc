"""A newcomer's usual mistakes are named, not passed over; what they look at is up to date.

Issue 19's items 7 (a multi-process run stepping without a prepared loader), 9 (the state
`tl.prepare` returned, dropped), 13 (`python -m trainloop env` lists every core dependency; the
progress display's last line holds the last report).
"""

from __future__ import annotations

import configparser
import io
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trainloop as tl
from tests.support.paths import REPO
from trainloop import spawn
from trainloop.callbacks import Progress

# -- item 7: every rank training on all the data -------------------------------------------------


def _steps_and_warnings(prepare_loader: bool) -> list[str]:
    """Two epochs on a 2-rank job; the warnings each rank saw."""
    data = TensorDataset(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(16, 1))
    loader = DataLoader(data, batch_size=4)
    state = tl.init(seed=0)
    model = torch.nn.Linear(3, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objects = (model, torch.optim.SGD(model.parameters(), lr=0.1)) + ((loader,) if prepare_loader else ())
        state, model, optimizer, *prepared = tl.prepare(state, *objects)
        for _epoch in range(2):
            for x, y in (prepared[0] if prepare_loader else loader):
                state = tl.backward(state, torch.nn.functional.mse_loss(model(x), y))
                state = tl.step(state, optimizer)
    tl.finish(state)
    return [str(w.message) for w in caught]


def _report_at_a_step_and_hparams(directory: str) -> None:
    """`log(step=)` averages across ranks at once; `log_hparams` is recorded by the main process."""
    from trainloop.callbacks import JSONLines

    state = tl.init(log_every=100, callbacks=[JSONLines(os.path.join(directory, "m.jsonl"))])
    model = torch.nn.Linear(1, 1)
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    tl.log_hparams(state, {"rank_that_called": state.rank})  # every rank calls; rank 0's is kept
    state = tl.backward(state, model(torch.ones(1, 1)).sum())
    state = tl.step(state, optimizer)
    state = tl.log(state, step=1, accuracy=torch.tensor(float(state.rank)))  # ranks 0 and 1: mean 0.5
    tl.finish(state)


def unprepared_loader_checks(directory: str) -> dict[str, list[str]]:
    """spawn.run worker: the warnings of a run without a prepared loader, then of one with; then
    a report at a step and hyper-parameters on two ranks (one start-up for all)."""
    seen = {"without": _steps_and_warnings(False), "with": _steps_and_warnings(True)}
    _report_at_a_step_and_hparams(directory)
    return seen


@pytest.mark.multiprocess
def test_on_two_ranks_no_prepared_loader_warns_once_and_log_step_and_hparams_are_one_job(tmp_path):
    seen = spawn.run(unprepared_loader_checks, str(tmp_path), n=2)  # rank 0's warnings
    about_data = [m for m in seen["without"] if "DataLoader" in m]
    assert len(about_data) == 1, seen["without"]  # once, not once per step
    assert "every rank" in about_data[0] and "tl.prepare" in about_data[0]
    assert not [m for m in seen["with"] if "DataLoader" in m], seen["with"]
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "accuracy": 0.5}]
    assert json.loads((tmp_path / "m.hparams.json").read_text()) == {"rank_that_called": 0}


def test_one_process_without_a_prepared_loader_does_not_warn():
    data = TensorDataset(torch.randn(8, 3), torch.zeros(8, 1))
    state = tl.init()
    model = torch.nn.Linear(3, 1)
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in DataLoader(data, batch_size=4):
            state = tl.backward(state, torch.nn.functional.mse_loss(model(x), y))
            state = tl.step(state, optimizer)
    tl.finish(state)


# -- item 9: the state prepare returned, dropped ---------------------------------------------------


def test_stepping_the_state_given_to_prepare_names_the_dropped_result():
    state = tl.init()
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _prepared_state, model, optimizer = tl.prepare(state, model, optimizer)  # the user keeps `state`
    state = tl.backward(state, model(torch.ones(1, 3)).sum())
    with pytest.raises(ValueError, match=r"the state tl\.prepare returned was dropped.*"
                                         r"state, model, optimizer = tl\.prepare\(state, model, optimizer\)"):
        tl.step(state, optimizer)


def test_stepping_without_ever_preparing_still_says_to_prepare():
    state = tl.init()
    model = torch.nn.Linear(3, 1)
    state = tl.backward(state, model(torch.ones(1, 3)).sum())
    with pytest.raises(ValueError, match=r"needs a prepared optimizer: call tl\.prepare"):
        tl.step(state, torch.optim.SGD(model.parameters(), lr=0.1))


# -- item 13: env lists every core dependency; progress shows the last report --------------------


@pytest.mark.slow  # a child process
def test_env_lists_every_core_dependency_of_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    requirements = [line.strip() for line in parser["options"]["install_requires"].splitlines()
                    if line.strip() and not line.strip().startswith("#")]
    names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requirements if "python_version" not in r]
    assert {"torch", "attrs", "tqdm", "safetensors", "xxhash", "blake3"} <= set(names)
    report = subprocess.run([sys.executable, "-m", "trainloop", "env"], capture_output=True, text=True,
                            check=True).stdout
    for name in names:
        assert re.search(rf"^  {name} \d", report, re.MULTILINE), f"env does not show {name}'s version"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train_logging_the_step(progress: Progress, steps: int, log_every: int) -> None:
    state = tl.init(log_every=log_every, callbacks=[progress])
    model = torch.nn.Linear(1, 1)
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    for _ in range(steps):
        state = tl.backward(state, model(torch.ones(1, 1)).pow(2).mean())
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=float(state.step))
    tl.finish(state)


@pytest.mark.parametrize("file", [io.StringIO, _Terminal], ids=["log-file", "terminal"])
def test_the_progress_display_ends_on_the_last_report(file):
    out = file()
    # A line at every step: the last step's line is written before that step's report arrives.
    _train_logging_the_step(Progress(total=4, interval=1e-9, file=out), steps=4, log_every=2)
    last = re.split(r"[\r\n]+", out.getvalue().strip())[-1]
    assert "loss=3.5" in last, out.getvalue()  # the report at step 4: the mean of 3 and 4

"""Progress shows steps, rate, ETA and the last loss: a bar in a terminal, sparse lines in a log."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import termios
import time

import attrs
import pytest
import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Progress


def train(progress: Progress, *, steps: int, log_every: int = 100, start_step: int = 0,
          rank: int = 0) -> float:
    """The real loop on a one-weight model, logging `loss = step`; returns the seconds it took."""
    state = tl.init(log_every=log_every, callbacks=[progress])
    if rank:
        state = state.evolve(topology=attrs.evolve(state.topology, rank=rank))
    model = torch.nn.Linear(1, 1)
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    state = state.evolve(step=start_step, logged_step=start_step)  # what a checkpoint restores
    x = torch.ones(1, 1)
    started = time.monotonic()
    for _ in range(steps):
        state = tl.backward(state, model(x).pow(2).mean())
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=float(state.step))
    tl.finish(state)
    return time.monotonic() - started


@pytest.mark.slow  # 10,000 steps
def test_in_a_log_file_a_long_run_prints_a_few_plain_lines_with_the_last_loss(capsys):
    train(Progress(total=10_000), steps=10_000)
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 3  # the first step, perhaps one after 10 s, the end
    assert not any("\r" in line for line in lines)
    assert lines[0].startswith("step 1/10000 [")
    last_loss = sum(range(9901, 10_001)) / 100  # the last report: the mean over its 100 steps
    assert re.fullmatch(rf"step 10000/10000 \[.+<00:00, .+step/s, loss={last_loss:.4g}\]", lines[-1])


def test_plain_lines_come_at_most_once_per_interval(capsys):
    interval = 0.05
    seconds = train(Progress(total=3000, interval=interval), steps=3000)
    lines = capsys.readouterr().err.splitlines()
    assert 3 <= len(lines) <= 2 + seconds / interval
    counts = [int(re.match(r"step (\d+)/3000", line).group(1)) for line in lines]
    assert counts == sorted(counts) and counts[-1] == 3000


def test_total_from_epochs_counts_the_short_window_at_each_epoch_end(capsys):
    data = regression_data(24)  # 6 batches of 4; accumulate 4: windows of 4 and 2, so 2 steps an epoch
    state = tl.init(accumulate=4, callbacks=[Progress(epochs=3)])
    model = tiny_model()
    state, model, optimizer, loader = tl.prepare(
        state, model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=4))
    for _epoch in range(3):
        for x, y in loader:
            state = tl.backward(state, mse(model, x, y))
            state = tl.step(state, optimizer)
    tl.finish(state)
    assert state.step == 6
    assert capsys.readouterr().err.splitlines()[-1].startswith("step 6/6 [")


def test_a_resumed_run_counts_on_from_the_restored_step(capsys):
    train(Progress(total=110, show=("loss",)), steps=10, log_every=5, start_step=100)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("step 101/110 [")
    assert lines[-1].startswith("step 110/110 [") and lines[-1].endswith("loss=108]")


def test_in_a_terminal_it_draws_a_tqdm_bar():
    controller, terminal_fd = os.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    with os.fdopen(terminal_fd, "w") as terminal:
        assert terminal.isatty()
        train(Progress(total=20, file=terminal), steps=20, log_every=5)
    drawn = b""
    while select.select([controller], [], [], 0.5)[0]:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal side is closed and everything was read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(controller)
    text = drawn.decode()
    assert "\r" in text and "20/20" in text and "step/s" in text and "loss=18" in text


def test_other_ranks_print_nothing(capsys):
    train(Progress(total=50), steps=50, rank=1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("arguments, message", [
    ({"total": 0}, "total must be an integer >= 1"),
    ({"total": 10, "epochs": 2}, "total= or epochs=, not both"),
    ({"interval": 0}, "interval must be > 0"),
])
def test_bad_settings_are_refused_naming_them(arguments, message):
    with pytest.raises(ValueError, match=message):
        Progress(**arguments)

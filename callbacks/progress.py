"""`Progress`: a progress display of optimizer steps on the main process.

In a terminal it is a tqdm bar (step/total, steps per second, ETA, the last logged loss). Where
stderr is not a terminal (CI, a job's log file) a bar would write thousands of carriage-return
updates into the log, so it prints one plain line at most every `interval` seconds instead,
formatted by tqdm the same way:

    step 1200/10000 [00:12<01:30, 97.56step/s, loss=0.4113]
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from trainloop.hooks import Callback

if TYPE_CHECKING:
    from trainloop import RunState


class Progress(Callback):
    """Show optimizer steps as they happen, on the main process only.

    Args:
        total: the number of optimizer steps of the run, when known.
        epochs: instead of `total`: the run's epochs; the total is then worked out in
            `on_prepare` from the first prepared loader: `ceil(len(loader) / accumulate)` steps
            per epoch (an accumulation window also closes at an epoch's end), times `epochs`.
            Without either the display shows the count and the rate, no ETA.
        interval: seconds between plain lines when stderr is not a terminal.
        show: names of logged metrics shown beside the count, as last reported by `tl.log`.
        file: where to write (default: `sys.stderr` when the display opens).

    A resumed run counts on from the restored `state.step`; the rate is over this process's
    steps. `tl.finish` closes the bar, or prints a last plain line.
    """

    def __init__(self, total: int | None = None, *, epochs: int | None = None, interval: float = 10.0,
                 show: Sequence[str] = ("loss",), file: TextIO | None = None):
        if total is not None and epochs is not None:
            raise ValueError("Progress takes total= or epochs=, not both")
        for name, value in (("total", total), ("epochs", epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Progress: {name} must be an integer >= 1 (got {value!r})")
        if not interval > 0:
            raise ValueError(f"Progress: interval must be > 0 seconds (got {interval!r})")
        self.total, self.epochs, self.interval = total, epochs, float(interval)
        self.show, self.file = tuple(show), file
        self._display: _Bar | _PlainLines | None = None
        self._shown: dict[str, float] = {}

    def on_prepare(self, state: RunState) -> None:
        if self.epochs is not None and state.loaders:
            steps_per_epoch = math.ceil(len(state.loaders[0]) / state.config.accumulate)
            self.total = steps_per_epoch * self.epochs

    def on_step(self, state: RunState) -> None:
        if not state.is_main:
            return
        if self._display is None:
            file = self.file if self.file is not None else sys.stderr
            # The clock starts at this process's first step, which a resumed run takes past 0:
            # the rate counts the steps after it.
            if _is_terminal(file):
                self._display = _Bar(self.total, state.step, file)
            else:
                self._display = _PlainLines(self.total, state.step, file, self.interval)
            self._display.set_postfix(_postfix(self._shown))
        self._display.update(state.step)

    def on_log(self, state: RunState, metrics: dict[str, float]) -> None:
        shown = {name: metrics[name] for name in self.show if name in metrics}
        if shown:
            self._shown.update(shown)
            if self._display is not None:
                self._display.set_postfix(_postfix(self._shown))

    def on_finish(self, state: RunState) -> None:
        if self._display is not None:
            self._display.close()
            self._display = None

    def __repr__(self) -> str:
        return f"Progress(total={self.total}, epochs={self.epochs}, interval={self.interval})"


def _is_terminal(file: Any) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


def _postfix(values: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in values.items())


class _Bar:
    """A tqdm bar; tqdm itself limits redraws (mininterval 0.1 s)."""

    def __init__(self, total: int | None, first_step: int, file: TextIO):
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=first_step, file=file, unit="step", dynamic_ncols=True)

    def set_postfix(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)

    def update(self, step: int) -> None:
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()


class _PlainLines:
    """One line at the first step, then at most one per `interval` seconds, and one at the end."""

    def __init__(self, total: int | None, first_step: int, file: TextIO, interval: float):
        self.total, self.first_step, self.file, self.interval = total, first_step, file, interval
        self._postfix = ""
        self.step = first_step
        self._started = time.monotonic()
        self._next_line = self._started
        self._printed: tuple[int, str] | None = None  # the step and metrics of the last line

    def set_postfix(self, text: str) -> None:
        self._postfix = text

    def update(self, step: int) -> None:
        self.step = step
        now = time.monotonic()
        if now >= self._next_line:
            self._write(now)
            self._next_line = now + self.interval

    def close(self) -> None:
        # The last line is written again when the step or the metrics changed since: a step's
        # line comes from `on_step`, before that step's report (`tl.log`, `tl.finish`) arrives.
        if self._printed != (self.step, self._postfix):
            self._write(time.monotonic())

    def _write(self, now: float) -> None:
        from tqdm import tqdm

        # Without a total there is no ETA; tqdm would print a meaningless "<00:00".
        bar_format = ("step {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
                      if self.total is not None else "step {n_fmt} [{elapsed}, {rate_fmt}{postfix}]")
        line = tqdm.format_meter(self.step, self.total, now - self._started, initial=self.first_step,
                                 unit="step", bar_format=bar_format, postfix=self._postfix or None)
        print(line, file=self.file, flush=True)
        self._printed = (self.step, self._postfix)

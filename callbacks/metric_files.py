"""The trackers that write plain files and need no library: `JSONLines` and `CSV`."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from trainloop.callbacks.tracker_base import Tracker, check_writable


class JSONLines(Tracker):
    """A dependency-free metrics file: one JSON object per report, `{"step": 10, "loss": 0.52}`.

    The file holds metrics only (no config line), so every line has the same shape and tools
    like `pandas.read_json(path, lines=True)` read it as a table. A new run starts the file
    afresh; a resumed run keeps the lines before its first report and drops later ones (a
    crashed run's reports after the checkpoint, which the resumed run makes again).
    Non-finite values are written as the strings "NaN", "Infinity", "-Infinity" (JSON has no
    NaN), which `float()` reads back. Each line is flushed as it is written. `tl.log_hparams`
    writes `<name>.hparams.json` beside the file (`metrics.hparams.json` for `metrics.jsonl`).
    """

    def __init__(self, path: str | os.PathLike = "metrics.jsonl"):
        self.path = check_writable(path, "JSONLines path", directory=False)
        self._file = None

    def start(self, config: dict[str, Any], resume_step: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The file stays open from the first report to `close`, so no `with` block.
        if resume_step is None:
            _new_hparams_file(self.path)
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
            return
        if self.path.exists():
            self._keep_lines_before(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def _keep_lines_before(self, step: int) -> None:
        with open(self.path, encoding="utf-8") as lines:
            steps = [(line.rstrip("\n"), _step_of(line)) for line in lines]
        kept = [line + "\n" for line, at in steps if at is not None and at < step]
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text("".join(kept), encoding="utf-8")
        os.replace(partial, self.path)  # a crash mid-rewrite leaves the old file whole

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "step" in metrics:
            raise ValueError("JSONLines: a metric named 'step' clashes with the step column; rename it")
        record: dict[str, float | str] = {"step": step}
        for name, value in metrics.items():  # a loop, not a comprehension and a call per value:
            record[name] = value if math.isfinite(value) else _json_number(value)  # every report
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def record_hparams(self, hparams: dict[str, Any]) -> None:
        _write_hparams(self.path, hparams)

    def close(self) -> None:
        self._file.close()
        self._file = None

    def __repr__(self) -> str:
        return f"JSONLines({str(self.path)!r})"


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank line or one a crash cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return None


def _json_number(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


class CSV(Tracker):
    """A dependency-free metrics table: a header `step,<names>`, then one row per report.

    The columns are the names reported so far, in the order they first came; a report with a
    new name rewrites the file once with the wider header (earlier rows get an empty cell).
    Non-finite values are written as `nan`, `inf`, `-inf`, which `float()` reads back. A new run
    starts the file afresh; a resumed run keeps the rows before its first report and drops later
    ones, as `JSONLines` does. Each row is flushed as it is written. `tl.log_hparams` writes
    `<name>.hparams.json` beside the file.
    """

    def __init__(self, path: str | os.PathLike = "metrics.csv"):
        self.path = check_writable(path, "CSV path", directory=False)
        self.columns: list[str] = ["step"]
        self._file = None
        self._rows = None

    def start(self, config: dict[str, Any], resume_step: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, str]] = []
        if resume_step is None:
            _new_hparams_file(self.path)
        elif self.path.exists():
            columns, rows = self._read()
            self.columns = columns or self.columns
            kept = [row for row in rows if _int_or_none(row.get("step")) is not None
                    and int(row["step"]) < resume_step]
        self._rewrite(kept)

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with open(self.path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """The file anew with `self.columns` and `rows`, replaced whole, then open for appending."""
        if self._file is not None:
            self._file.close()
        partial = self.path.with_name(self.path.name + ".tmp")
        with open(partial, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(partial, self.path)  # a crash mid-rewrite leaves the old file whole
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (open until close)
        self._rows = csv.DictWriter(self._file, self.columns, restval="")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if "step" in metrics:
            raise ValueError("CSV: a metric named 'step' clashes with the step column; rename it")
        new = [name for name in metrics if name not in self.columns]
        if new:
            self._file.close()
            self._file = None
            _, rows = self._read()
            self.columns += new
            self._rewrite(rows)
        self._rows.writerow({"step": step, **{name: repr(float(value)) for name, value in metrics.items()}})
        self._file.flush()

    def record_hparams(self, hparams: dict[str, Any]) -> None:
        _write_hparams(self.path, hparams)

    def close(self) -> None:
        self._file.close()
        self._file = self._rows = None

    def __repr__(self) -> str:
        return f"CSV({str(self.path)!r})"


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None  # a row a crash cut short


def hparams_path(metrics_path: Path) -> Path:
    """Where a metrics file's hyper-parameters go: `metrics.hparams.json` beside `metrics.csv`."""
    return metrics_path.with_name(metrics_path.stem + ".hparams.json")


def _new_hparams_file(metrics_path: Path) -> None:
    """A new run's metrics file starts afresh, and so does its hyper-parameters file."""
    hparams_path(metrics_path).unlink(missing_ok=True)


def _write_hparams(metrics_path: Path, hparams: dict[str, Any]) -> None:
    """Every hyper-parameter given so far, as one JSON object, replaced whole."""
    path = hparams_path(metrics_path)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(hparams, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)

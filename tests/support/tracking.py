"""Reading back what the trackers recorded, each with its library's own reader, and a two-rank
tracked run that multi-process workers call (tests/multiprocess/workers.py)."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import torch

import trainloop as tl
from trainloop.callbacks import JSONLines, MLflow, TensorBoard, WandB


def value_at(step: int, rank: int = 0) -> float:
    """What the loop logs as `loss` at `step`: exact in float32, so means compare exactly."""
    return float(step + rank)


def expected_reports(first: int, last: int, log_every: int, world_size: int = 1) -> dict[int, float]:
    """The step -> mean `tl.log` reports for steps first..last: means over calls and ranks."""
    reports = {}
    for start in range(first, last + 1, log_every):
        chunk = range(start, min(start + log_every, last + 1))
        values = [value_at(step, rank) for step in chunk for rank in range(world_size)]
        reports[chunk[-1]] = sum(values) / len(values)
    return reports


def read_tensorboard(logdir: Path, tag: str = "loss") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def read_mlflow(store: Path, run_id: str, name: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow_client(store).get_metric_history(run_id, name))


def read_jsonlines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wandb_records(path: Path):
    """The records of a W&B `.wandb` transaction log (a LevelDB-style log of protobufs).

    wandb no longer ships a Python reader for offline runs; the format is small: a 7-byte
    header (":W&B", magic, version), then 32 KiB blocks of chunks, each with a 7-byte header
    (CRC, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail under 7 bytes is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending = 32 * 1024, 7, b""
    while position + 7 <= len(data):
        left_in_block = block - position % block
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left_in_block < 7 or (kind == 0 and length == 0):
            position += left_in_block
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(path: Path, timeout: float = 10.0) -> list:
    """The records of a finished run's log. wandb's service process may still be writing the
    file when `run.finish()` returns, so wait (briefly) for the closing "exit" record."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def read_wandb(wandb_dir: Path) -> list[dict]:
    """Every offline run under `wandb_dir`, oldest first: its id, config and history."""
    runs = []
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"id": None, "started": None, "config": {}, "history": []}
        for record in finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["started"] = record.run.start_time.ToNanoseconds()
                run["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "history":
                # wandb writes an item's name as `key` or as a one-part `nested_key`.
                row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                run["history"].append((record.history.step.num, float(row["loss"])))
        runs.append(run)
    return sorted(runs, key=lambda run: run["started"])


def mlflow_run_ids(store: Path, experiment: str) -> list[str]:
    client = mlflow_client(store)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else [run.info.run_id for run in client.search_runs([found.experiment_id])]


def check_two_rank_tracking(tmp_dir: str | os.PathLike, state: tl.RunState | None = None) -> dict | None:
    """Track a short run on every rank of a job; on rank 0, return what the trackers recorded.

    Run it inside each worker of a multi-process job (all ranks, same `tmp_dir`). `state` is the
    worker's run (`tl.init()` when None). Rank r logs `loss = step + r` for 6 steps with
    `log_every=2` into TensorBoard, JSONLines, MLflow and W&B (offline) under `tmp_dir`.

    Returns None on other ranks. On rank 0 a dict, each value read back with the library's own
    reader: `expected` (step -> the mean over calls and ranks), `tensorboard`, `jsonlines`,
    `mlflow`, `wandb` (each step -> value), and `runs`: how many event files / metrics files /
    MLflow runs / W&B runs exist (1 each when only rank 0 wrote). The caller asserts on it; listing
    `tmp_dir` again after every worker has finished also catches a late write from another rank.
    """
    tmp_dir = Path(tmp_dir)
    state = tl.init(log_every=2) if state is None else state
    trackers = [TensorBoard(tmp_dir / "tb"), JSONLines(tmp_dir / "metrics.jsonl"), MLflow(experiment="two-ranks", dir=tmp_dir / "ml"),
                WandB(project="two-ranks", mode="offline", dir=str(tmp_dir))]
    state = tl.attach(state, *trackers)
    model = torch.nn.Linear(2, 1)
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.0))
    x = torch.ones(4, 2)
    for _ in range(6):
        state = tl.backward(state, model(x).pow(2).mean())
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=torch.tensor(value_at(state.step, state.rank)))
    world_size, log_every, is_main = state.world_size, state.config.log_every, state.is_main
    tl.finish(state)
    if not is_main:
        return None
    [wandb_run] = read_wandb(tmp_dir)
    mlflow_runs = mlflow_run_ids(tmp_dir / "ml", "two-ranks")
    return {
        "expected": expected_reports(1, 6, log_every, world_size),
        "tensorboard": dict(read_tensorboard(tmp_dir / "tb")),
        "jsonlines": {line["step"]: line["loss"] for line in read_jsonlines(tmp_dir / "metrics.jsonl")},
        "mlflow": dict(read_mlflow(tmp_dir / "ml", mlflow_runs[0])),
        "wandb": dict(wandb_run["history"]),
        "runs": {"tensorboard": len(list((tmp_dir / "tb").glob("events.out.tfevents.*"))),
                 "jsonlines": len(list(tmp_dir.glob("*.jsonl"))),
                 "mlflow": len(mlflow_runs),
                 "wandb": len(list(tmp_dir.glob("wandb/offline-run-*")))},
    }

"""One job per checkpoint directory: a lock file that names the job holding it.

Two jobs checkpointing into one directory would prune, point `latest` at and resume from each
other's checkpoints. The `Checkpoint` callback therefore takes `<dir>/.lock` when its run is
prepared and gives it back at `tl.finish`; another job is refused with a CheckpointError naming
the holder's host and pid. The lock is made complete or not at all (written under a name of its
own, then hard-linked to `.lock`, which fails if one exists): it is never seen half-written.

A lock outlives a job that was killed. It is taken over when it is provably stale: its process
is gone from this host (or the pid now belongs to a later process), or it was left by an earlier
attempt of this very elastic job (`TORCHELASTIC_RUN_ID`, a restart after a failure). A lock from
another host whose job is gone cannot be proved stale from here: the error says to delete it.
Runs in one process share the lock (they are one job); it is removed when the last releases it.

Rank 0 alone takes the lock: it writes every checkpoint file but the FSDP shards, which the
other ranks write into rank 0's temporary directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

from trainloop.errors import CheckpointError

LOCK = ".lock"

_held: dict[Path, int] = {}  # the directories this process holds, and how many runs hold each


def acquire(directory: Path) -> None:
    """Take `directory`'s lock for this job (made if missing); CheckpointError if another holds it."""
    directory = Path(directory).absolute()
    if _held.get(directory):
        _held[directory] += 1
        return
    lock, mine = directory / LOCK, _holder()
    for _attempt in range(3):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            created = _create(lock, mine)
        except (PermissionError, OSError) as error:
            if isinstance(error, PermissionError) or error.errno == errno.EROFS:
                return  # a directory this job cannot write: it cannot mix files there either
            raise CheckpointError(f"could not lock checkpoint directory {directory}: {error}") from None
        if created:
            _held[directory] = 1
            return
        other = _read(lock)
        if other is None:
            continue  # removed meanwhile (or unreadable): try again
        if not _stale(other, mine):
            raise CheckpointError(
                f"checkpoint directory {directory} is in use by another job: host {other.get('host')}, "
                f"pid {other.get('pid')} (its lock is {lock}). One job writes a checkpoint directory at "
                "a time: give this run another directory, or wait for that job to finish; if that job is "
                f"gone (it ran on another machine), delete {lock}"
            )
        _take_over(lock, other)
    raise CheckpointError(f"could not take the lock {lock}: other jobs keep taking it; run one job per directory")


def release(directory: Path) -> None:
    """Give back this run's share of `directory`'s lock; the file goes with the last share."""
    directory = Path(directory).absolute()
    count = _held.get(directory, 0)
    if count > 1:
        _held[directory] = count - 1
        return
    _held.pop(directory, None)
    lock = directory / LOCK
    if count and _read(lock) == _holder():
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _holder() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid),
            "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}


def _create(lock: Path, record: dict[str, Any]) -> bool:
    """Make `lock` holding `record`, atomically; False if a lock is there already."""
    draft = lock.with_name(f"{LOCK}.{record['host']}-{record['pid']}.draft")
    draft.write_text(json.dumps(record))
    try:
        os.link(draft, lock)
        return True
    except FileExistsError:
        return False
    finally:
        draft.unlink()


def _read(lock: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"host": "unknown (the lock file is damaged)", "pid": "unknown"}
    return record if isinstance(record, dict) else {"host": "unknown (the lock file is damaged)", "pid": "unknown"}


def _stale(other: dict[str, Any], mine: dict[str, Any]) -> bool:
    if other.get("run_id") is not None and other.get("run_id") == mine["run_id"]:
        return True  # an earlier attempt of this elastic job, which failed and was restarted
    if other.get("host") != mine["host"] or not isinstance(other.get("pid"), int):
        return False
    if other["pid"] == mine["pid"]:
        return True  # this process (another run of it), or a later process given the same pid
    try:
        os.kill(other["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = _start_time(other["pid"])
    return started is not None and other.get("started") is not None and started != other["started"]


def _take_over(lock: Path, stale: dict[str, Any]) -> None:
    """Remove the stale lock, unless another job took it over first (then leave theirs)."""
    aside = lock.with_name(f"{LOCK}.stale-{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    if _read(aside) != stale:  # another job's fresh lock: put it back (ours is tried again)
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
    aside.unlink()


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None

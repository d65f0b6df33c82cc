"""One job on torch's elastic agent, as this machine's launcher sees it: the `LaunchConfig`, the
scope the job runs in (its environment, signal handlers and temporary folder), and what the
launcher reports when the job ends (which rank failed first, a rendezvous that failed, scripts
that never joined the job). Imports torch only inside its functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from trainloop.config import env_name
from trainloop.worker import JOB_DIR_VARIABLE, NEVER_JOINED_PREFIX

_JOB_DIR_PREFIX = "trainloop-spawn-"
_LOCK_NAME = ".lock"  # held (flock) by the launcher for as long as its job runs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_config(nproc: int, *, nnodes: int = 1, node_rank: int | None = None,
                  master: str | None = None, max_restarts: int = 0, join_timeout: int = 600,
                  log_dir: str | None = None):
    """The `LaunchConfig` for a job, every field chosen on purpose.

    `join_timeout`: seconds the machines wait for one another in the rendezvous, at the start
    and after each restart (a machine that died makes the others wait this long before they
    give up). Static rendezvous (fixed node ranks) reads it as `timeout`, c10d as `join_timeout`.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    if nproc < 1 or nnodes < 1 or max_restarts < 0:
        raise ValueError(f"need nproc >= 1, nnodes >= 1, max_restarts >= 0 (got {nproc}, {nnodes}, {max_restarts})")
    if nnodes == 1:
        # One machine: meet on loopback at a port picked now; nothing listens beyond 127.0.0.1.
        backend, endpoint, run_id, configs = "c10d", f"127.0.0.1:{free_port()}", uuid.uuid4().hex, {}
    elif master is None:
        raise ValueError("--nnodes > 1 needs --master HOST:PORT (the address of node 0)")
    elif node_rank is not None:
        # Fixed node ranks: node 0 serves the store at --master (torchrun's --node-rank mode).
        backend, endpoint, run_id, configs = "static", master, "trainloop", {"rank": node_rank}
    else:
        backend, endpoint, run_id, configs = "c10d", master, "trainloop-" + master, {}
    return LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=run_id,
        role="trainloop",
        rdzv_endpoint=endpoint,
        rdzv_backend=backend,
        rdzv_configs={**configs, "timeout": join_timeout, "join_timeout": join_timeout},
        max_restarts=max_restarts,
        monitor_interval=0.1,  # notice a dead worker within a tenth of a second
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        shutdown_timeout=30,  # SIGTERM, then SIGKILL after this grace period
    )


# What torch's launcher installs handlers for (TORCHELASTIC_SIGNALS_TO_HANDLE's default).
_SIGNALS_TORCH_HANDLES = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
                               if hasattr(signal, name))


@contextlib.contextmanager
def launcher_scope(settings: Mapping[str, Any], nproc: int) -> Iterator[str]:
    """Settings as TRAINLOOP_* variables and OMP_NUM_THREADS for the workers; all undone after.

    Yields the job's own temporary directory (torch's logs and error files, the workers'
    notes), removed when the job ends however it ends. torch's launcher also writes to
    os.environ and installs signal handlers: both are restored, so `run()` can be called many
    times from one Python process (tests, notebooks).
    """
    saved_env = dict(os.environ)
    saved_handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS_TORCH_HANDLES}
    remove_abandoned_job_dirs()
    with _job_dir() as job_dir:
        try:
            for name, value in settings.items():
                # A mapping (tp_plan) travels as JSON, which the setting's parser reads back.
                os.environ[env_name(name)] = json.dumps(value) if isinstance(value, dict) else str(value)
            if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
                os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
            os.environ[JOB_DIR_VARIABLE] = job_dir
            yield job_dir
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            for sig, handler in saved_handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)


@contextlib.contextmanager
def _job_dir() -> Iterator[str]:
    """A temporary directory for one job, locked while the job runs and removed after it.

    A launcher killed by SIGKILL cannot remove its directory, but the kernel drops its lock:
    the next launch on the machine removes it then (`remove_abandoned_job_dirs`).
    """
    path = tempfile.mkdtemp(prefix=_JOB_DIR_PREFIX)
    lock = _hold_lock(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _hold_lock(job_dir: str) -> int | None:
    """Lock `job_dir/.lock` for this process's lifetime; its descriptor (None without flock)."""
    try:
        import fcntl
    except ModuleNotFoundError:  # not POSIX: abandoned directories stay, as they always did
        return None
    # Locked under another name first: a sweeper that finds `.lock` must find it held already.
    unlocked = os.path.join(job_dir, _LOCK_NAME + ".new")
    descriptor = os.open(unlocked, os.O_CREAT | os.O_WRONLY, 0o600)  # not inherited by workers
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    os.rename(unlocked, os.path.join(job_dir, _LOCK_NAME))
    return descriptor


def remove_abandoned_job_dirs(parent: str | None = None) -> None:
    """Remove the job directories in `parent` (the temporary directory) whose launcher died.

    A directory counts as abandoned only when its lock file exists and nobody holds it: the
    directories of running jobs, other users' and other programs' are left alone.
    """
    try:
        import fcntl
    except ModuleNotFoundError:
        return
    parent = parent or tempfile.gettempdir()
    try:
        names = [name for name in os.listdir(parent) if name.startswith(_JOB_DIR_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(parent, name)
        try:
            descriptor = os.open(os.path.join(path, _LOCK_NAME), os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # its launcher is running
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(descriptor)


def never_joined(job_dir: str) -> list[int]:
    """The ranks whose script ended well, in the job's last attempt, without joining the job."""
    found: dict[int, list[int]] = {}
    for name in os.listdir(job_dir):
        if name.startswith(NEVER_JOINED_PREFIX):
            attempt, rank = name[len(NEVER_JOINED_PREFIX):].split("-")
            found.setdefault(int(attempt), []).append(int(rank))
    return sorted(found[max(found)]) if found else []


def never_joined_warning(ranks: list[int], world_size: int) -> str:
    """The launcher's one line about workers that ran the script alone (no `tl.init`)."""
    listed = ", ".join(str(rank) for rank in ranks)
    return (f"trainloop.spawn: warning: rank(s) {listed} of {world_size} ended without calling "
            f"tl.init, so each ran the script on its own (on all the data) instead of as one "
            f"job: call `state = tl.init()` in the script before training (a script that joins "
            f"a process group of its own and leaves it again may ignore this)")


def culprit(failures: Mapping[int, Any]) -> tuple[int, Any]:
    """The failure that caused the others: not a worker the launcher itself stopped (SIGTERM)."""
    stopped = -signal.SIGTERM.value
    ranked = sorted(failures.items(), key=lambda item: (item[1].exitcode == stopped, item[1].timestamp, item[0]))
    return ranked[0]


def connects_as_client(config: Any) -> bool:
    """Whether this machine's launcher joins the job's store as a client, rather than serving it.

    Node 0 serves it with fixed node ranks; without them torch serves it on the machine whose
    name or address --master gives.
    """
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname

    if config.max_nodes == 1:
        return False
    if config.rdzv_backend == "static":
        return config.rdzv_configs["rank"] != 0
    return not _matches_machine_hostname(config.rdzv_endpoint.rpartition(":")[0])


def wait_until_reachable(endpoint: str, timeout_s: float) -> None:
    """Return once something accepts connections at `endpoint` (HOST:PORT); ConnectionError
    after `timeout_s` seconds without.

    Checked in Python before torch's store client tries: that client logs every failed try
    with some forty lines of C++ stack frames, while here the launcher says it once.
    """
    import time

    host, _, port = endpoint.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"nothing accepted a connection at {endpoint} in {timeout_s:g} s "
                                      f"({error.strerror or error})") from None
        time.sleep(0.5)


def rendezvous_failure(error: BaseException, nnodes: int, endpoint: str, join_timeout: int) -> str:
    """The message for a rendezvous that failed: what happened, judged by torch's error type.

    A connection error means the rendezvous store (served by the machine at --master, or by
    node 0) is gone or cannot be reached; a timeout means a machine is missing.
    """
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError

    reason = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
    if isinstance(error, (RendezvousConnectionError, DistNetworkError, ConnectionError)):
        what = (f"lost, or could not make, the connection to the rendezvous at {endpoint}: the "
                f"machine that serves it (the one at --master) died or cannot be reached")
    else:
        what = (f"the {nnodes} machines did not all meet at {endpoint} within --join-timeout "
                f"{join_timeout} s: a machine is missing (not started, or died and did not come "
                f"back for a restart)")
    return (f"trainloop.spawn: {what} ({type(error).__name__}: {reason}). Start every machine with "
            f"the same --nnodes and --master and check that the address is reachable from each; "
            f"see docs/multinode.md.")

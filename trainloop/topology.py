"""Where this process sits in the job: rank, world size, node, device, and the process group.

The launcher tells each process its place through environment variables. We read torch's own
names (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`,
`MASTER_PORT`: set by torchrun and by `trainloop.spawn`) and fall back to SLURM's when a script
is started by `srun` directly.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
import sys
import time
from collections.abc import Mapping

import attrs
import torch
import torch.distributed as dist


@attrs.frozen
class Topology:
    """The process's place in the job. `owns_process_group`: `init` joined it, `finish` leaves it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_process_group: bool = False


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `node[03-05,9],gpu1` -> `node03`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torch's launcher variables, translated from SLURM's when only SLURM's are set.

    Returns a dict with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK and, when
    known, MASTER_ADDR and MASTER_PORT. An empty dict means a plain single process.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT")
        found = {k: environ[k] for k in keys if k in environ}
        found.setdefault("LOCAL_RANK", "0")
        found.setdefault("LOCAL_WORLD_SIZE", found["WORLD_SIZE"] if found["LOCAL_RANK"] == found["RANK"] else "1")
        found.setdefault("GROUP_RANK", environ.get("NODE_RANK", "0"))
        return found
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        ntasks = int(environ["SLURM_NTASKS"])
        nnodes = int(environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", "1")))
        found = {
            "RANK": environ["SLURM_PROCID"],
            "WORLD_SIZE": str(ntasks),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(ntasks // max(nnodes, 1)),
            "GROUP_RANK": environ.get("SLURM_NODEID", "0"),
            "MASTER_ADDR": environ.get("MASTER_ADDR")
            or first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # A port that differs between concurrent jobs on one cluster, the same on every task.
            "MASTER_PORT": environ.get("MASTER_PORT")
            or str(15000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000),
        }
        return found
    return {}


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    """`requested` if given (checked: `check_device`); else this process's accelerator (by
    local rank), else the CPU."""
    if requested is not None:
        device = check_device(requested)
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, local_rank % _device_count(device.type))
        return device
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, local_rank % _device_count(accelerator.type))


def check_device(requested: str) -> torch.device:
    """`requested` as a device of this machine; ValueError naming what it has instead.

    `"cuda"` and `"cuda:3"` get the same check (torch itself only fails later, with an
    AssertionError, for an index): the type must be available here, and an index below the
    count. The launcher calls this before any worker starts, each worker in `init`.
    """
    device = torch.device(requested)
    if device.type == "cpu":
        return device
    count = _device_count(device.type, requested)
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {requested!r} was requested but this machine has {count} {device.type} "
                         f"device(s), {device.type}:0 to {device.type}:{count - 1}: use one of these, or "
                         f"{device.type!r} (one per local rank)")
    return device


def _device_count(device_type: str, requested: str | None = None) -> int:
    module = getattr(torch, device_type, None)
    count = module.device_count() if module is not None and hasattr(module, "device_count") else 0
    if count < 1:
        raise ValueError(f"device {requested or device_type!r} was requested but torch finds no "
                         f"{device_type} device on this machine (torch {torch.__version__}): leave "
                         f"device unset (the accelerator if there is one, else the CPU) or use 'cpu'")
    return count


def join(requested_device: str | None, timeout_s: float, environ: Mapping[str, str] = os.environ) -> Topology:
    """Read the topology from the environment; join the process group when there are many ranks.

    A process group that is already initialised (the user's own, or a test's) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        _current["joined"] = True
        env = launcher_env(environ)
        local_rank = int(env.get("LOCAL_RANK", rank))
        device = pick_device(requested_device, local_rank)
        return Topology(rank, local_rank, world_size, int(env.get("LOCAL_WORLD_SIZE", world_size)),
                        int(env.get("GROUP_RANK", 0)), device, dist.get_backend(), False)

    env = launcher_env(environ)
    world_size = int(env.get("WORLD_SIZE", 1))
    rank, local_rank = int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    device = pick_device(requested_device, local_rank)
    topology = Topology(rank, local_rank, world_size, int(env.get("LOCAL_WORLD_SIZE", 1)),
                        int(env.get("GROUP_RANK", 0)), device)
    if world_size == 1:
        return topology
    if device.type != "cpu" and hasattr(torch, device.type):
        getattr(torch, device.type).set_device(device)
    backend = dist.get_default_backend_for_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _rendezvous_store(env, environ, rank, world_size, timeout)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if device.type != "cpu" else None,
    )
    _current.update(store=store, rank=rank, world_size=world_size, joined=True,
                    under_launcher="TORCHELASTIC_RUN_ID" in environ)
    if not _current.get("hooked"):
        # Once per process, however many runs follow one another in it.
        # A worker that dies of an exception would otherwise abort (SIGABRT) in gloo's threads at
        # interpreter exit, hiding its real exit code; leaving the group first exits cleanly.
        atexit.register(leave_process_group)
        sys.excepthook = _explain_distributed_failures(sys.excepthook)
        _current["hooked"] = True
    return attrs.evolve(topology, backend=backend, owns_process_group=True)


# The process group this process joined last: what the excepthook needs to explain a failure;
# "joined" stays once this process has been in a job's process group (see `has_joined`).
_current: dict = {}


def has_joined() -> bool:
    """Whether `join` ever put (or found) this process in a process group of many ranks."""
    return bool(_current.get("joined"))


def _explain_distributed_failures(excepthook):
    """An excepthook that makes a failure across ranks point at its cause.

    - A collective that timed out: the ranks that also timed out say so in the store; the ranks
      that never do are the hung ones, and the message names them (torch would only report
      that this rank, the victim, waited too long).
    - A collective that failed because a peer died: under the launcher, wait before exiting
      (`stand_aside_if_a_peer_failed`), so that the launcher reports the rank that died first.
    """
    def hook(kind, error, traceback):
        joined = dict(_current)
        if "store" not in joined:
            pass  # no process group joined by trainloop, or already left
        elif "timed out" in str(error).lower():
            print(_hung_ranks(joined["store"], joined["rank"], joined["world_size"]), file=sys.stderr, flush=True)
        elif joined["under_launcher"]:
            stand_aside_if_a_peer_failed(error, joined["rank"])
        excepthook(kind, error, traceback)

    return hook


def stand_aside_if_a_peer_failed(error: BaseException, rank: int | str) -> None:
    """Under a launcher: when `error` is a collective that failed because a peer died, wait.

    The rank that died first is the cause; this one is its victim. If the victim exits at once,
    the launcher may see it first and report it (torch's failure times are whole seconds, and a
    function worker's job reports only the first exit it sees), so it waits here, letting the
    launcher see the real failure and stop this worker, whose misleading traceback then never
    shows. Returns at once for any other error.
    """
    message = str(error)
    if not (isinstance(error, dist.DistBackendError) or "by peer" in message):
        return
    if "by peer" in message:
        print(f"trainloop: rank {rank} lost its connection to another rank: that rank's process "
              "died, or its machine did (on many machines, look at the other machines' output "
              "first). This rank stops too.", file=sys.stderr, flush=True)
    time.sleep(_PEER_FAILURE_GRACE_S)


def _hung_ranks(store: dist.Store, rank: int, world_size: int) -> str:
    store.set(f"trainloop/timed_out/{rank}", "1")
    others = [r for r in range(world_size) if r != rank]
    deadline = time.monotonic() + _ROLL_CALL_S
    while True:
        silent = [r for r in others if not store.check([f"trainloop/timed_out/{r}"])]
        if not silent or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not silent:
        return f"trainloop: a collective timed out on rank {rank}, and on every other rank too"
    return (f"trainloop: a collective timed out on rank {rank}; rank(s) {silent} never reached it "
            "and did not time out themselves: they are hung (or stuck outside collectives)")


_ROLL_CALL_S = 3.0  # how long the ranks that timed out wait to hear from each other
_PEER_FAILURE_GRACE_S = 5.0


def leave_process_group() -> None:
    """Destroy the default process group if one is joined (idempotent)."""
    _current.pop("store", None)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        # gloo's worker threads release a finished collective's tensors a moment after the
        # caller sees it complete, and releasing a tensor made in Python takes the GIL. If the
        # interpreter is already shutting down by then, the thread is torn down mid-release and
        # the process aborts (SIGABRT) although all its work succeeded. A DDP model keeps the
        # process group (and so its threads) alive past destroy_process_group, so give the
        # threads a moment to finish while Python is still whole.
        time.sleep(_RELEASE_GRACE_S)


_RELEASE_GRACE_S = 0.2


def _rendezvous_store(env: Mapping[str, str], environ: Mapping[str, str], rank: int,
                      world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store the ranks meet in, under a key prefix no earlier group of theirs used.

    Under torch's elastic agent (`trainloop.spawn`, torchrun) the agent already serves a store at
    MASTER_ADDR:MASTER_PORT; otherwise rank 0 serves it. Either way the store outlives a process
    group, and a new group must never read an old one's keys: gloo would connect to the
    addresses a destroyed group listened on and time out (seen when the ranks reach a second
    `init` at different moments). So every join gets a prefix of its own, made of:

    - the restart attempt: a restarted attempt's fresh workers meet in the agent's store, which
      still holds the previous attempt's keys (pytorch#135712);
    - the number of groups this process has joined: runs that follow one another in the same
      processes (`init ... finish`, then `init` again) use one prefix each. Every rank counts
      its own joins, so the count agrees as long as every rank runs the same sequence of runs.

    The store itself is made once per process and reused: rank 0's server keeps its port.
    """
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise RuntimeError(
            "WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: start the script with "
            "`python -m trainloop.spawn -n N script.py` (or torchrun, or srun)"
        )
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    under_agent = environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    key = (host, port, under_agent, rank, world_size)
    store = _stores.get(key)
    if store is None:
        store = dist.TCPStore(host, port, world_size, is_master=not under_agent and rank == 0,
                              timeout=timeout)
        _stores[key] = store
    else:
        store.set_timeout(timeout)
    _joins[key] = _joins.get(key, 0) + 1
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"trainloop/attempt_{attempt}/join_{_joins[key]}", store)


# Per process: the stores it met its peers in, and how many groups it joined through each.
_stores: dict[tuple, dist.TCPStore] = {}
_joins: dict[tuple, int] = {}

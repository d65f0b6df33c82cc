"""Start a job of many processes on PyTorch's own elastic launcher (what `torchrun` runs).

    python -m trainloop.spawn -n 8 train.py --lr 3e-4
    python -m trainloop.spawn -n 8 --nnodes 2 --node-rank 0 --master 10.0.0.1:29500 train.py
    python -m trainloop.spawn -n 2 --precision bf16 --accumulate 4 train.py
    python -m trainloop.spawn -n 8 --max-restarts 3 train.py
    python -m trainloop.spawn --config run.toml train.py
    python -m trainloop.spawn -n 2 -m package.module --flag

    trainloop.spawn.run(fn, *args, n=2)      # from Python: returns rank 0's result

This module only translates trainloop's flags into a `LaunchConfig` and hands it to
`torch.distributed.launcher.api.elastic_launch`; process management, restarts, signal handling
and error files are torch's. What it adds on top:

- every `LaunchConfig` field set explicitly (its defaults differ from torchrun's: etcd
  rendezvous, three restarts);
- one machine: a c10d rendezvous on 127.0.0.1 with a port the OS picks;
- run settings (`--precision bf16`) travel as `TRAINLOOP_*` variables and are validated before
  any worker starts (a bad setting would otherwise use up the restarts);
- `OMP_NUM_THREADS` shared out among the workers of a machine (torch's launcher API leaves it
  unset: N workers of N threads each oversubscribe the cores);
- workers that die with the launcher, even when it is SIGKILLed (Linux: trainloop.worker);
- SLURM: under `srun`, the node count, node rank and master host come from SLURM's variables;
- a failure report that names the rank that failed first; its traceback is the one the
  worker printed itself, just above.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from trainloop.config import ALIASES, SETTINGS, canonical, config_from, env_name, parse_setting, settings_from_env
from trainloop.topology import first_slurm_host
from trainloop.worker import InWorker

_LAUNCH_FLAGS = ("nproc", "nnodes", "node_rank", "master", "max_restarts", "join_timeout")
_FLAGS_WITHOUT_VALUE = ("-m", "-h", "--help")


class _Parser(argparse.ArgumentParser):
    """argparse with each error on one line: the problem, then where the flags are listed."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m trainloop.spawn",
        description="Run a training script on many processes (and machines) with torch's elastic "
                    "launcher. spawn reads its own flags up to the script's name; everything after "
                    "it goes to the script untouched.",
        # Each flag's help says its default itself (many defaults depend on SLURM or the machine).
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--n` is the script's flag, never a prefix of --nproc or --nnodes
    )
    launch = parser.add_argument_group("processes")
    launch.add_argument("-n", "--nproc", default=None, metavar="N",
                        help="processes on this machine (default: one per accelerator, else 1)")
    launch.add_argument("--nnodes", default=None, metavar="N",
                        help="machines in the job (default: 1, or SLURM_NNODES under srun)")
    launch.add_argument("--node-rank", default=None, metavar="RANK",
                        help="this machine's rank (default: SLURM_NODEID under srun; "
                             "when omitted on many machines, ranks are assigned on arrival)")
    launch.add_argument("--master", default=None, metavar="HOST:PORT",
                        help="where the machines meet (needed with --nnodes > 1; default under "
                             "srun: the first host of SLURM_JOB_NODELIST)")
    launch.add_argument("--max-restarts", default=None, metavar="N",
                        help="restart all workers up to this many times after a failure (default: 0)")
    launch.add_argument("--join-timeout", default=None, metavar="SECONDS",
                        help="with --nnodes > 1: how long the machines wait for each other to "
                             "arrive, at the start and after each restart (default: 600)")
    launch.add_argument("--config", default=None, metavar="FILE.toml",
                        help="read these flags from a TOML file (keys: nproc, nnodes, precision, ...); "
                             "flags given on the command line win")
    settings = parser.add_argument_group("run settings (arrive in tl.init as TRAINLOOP_* variables)")
    for field in SETTINGS:
        settings.add_argument(
            "--" + field.name.replace("_", "-"), dest=field.name, default=None, metavar="VALUE",
            help=_with_default(field.help, field.default),
        )
    for old, name in ALIASES.items():  # accepted with the same meaning, not listed
        settings.add_argument("--" + old.replace("_", "-"), dest=name, default=None, help=argparse.SUPPRESS)
    parser.add_argument("-m", dest="module", action="store_true",
                        help="run the target as a module (python -m target), not a script")
    parser.add_argument("target", help="the training script (or module with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """spawn's flags up to the target, the target, and the script's arguments untouched after it.

    argparse alone would read a script's `--precision bf16` (or `--n 40`, as an abbreviation)
    as spawn's own: the command line is cut at the first word that is neither a spawn flag nor
    a flag's value (or just after `--`), as python itself does with its script's arguments.
    """
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            index += 1
            break
        if not word.startswith("-") or word == "-":
            break
        with_value_attached = "=" in word or (not word.startswith("--") and len(word) > 2)
        index += 1 if word in _FLAGS_WITHOUT_VALUE or with_value_attached else 2
    options = parser.parse_args(list(argv[:index + 1]))
    options.args = list(argv[index + 1:])
    return options


def _read_toml(path: str) -> dict[str, Any]:
    """The flags in a TOML file. ValueError, naming the file, when it cannot be read or used."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # pyright: ignore[reportMissingImports]  (only on Python 3.10)
        except ModuleNotFoundError:
            raise ValueError("--config needs Python 3.11+ or `pip install tomli`") from None
    try:
        with open(path, "rb") as file:
            values = tomllib.load(file)
    except OSError as error:
        raise ValueError(f"--config {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"--config {path} is not valid TOML: {error}") from None
    known = set(_LAUNCH_FLAGS) | {field.name for field in SETTINGS}
    normalised = {canonical(key.replace("-", "_")): value for key, value in values.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    return normalised


def _whole_number(flag: str, value: Any, minimum: int) -> int:
    """`value` (a flag's text or a TOML value) as an int >= minimum; ValueError naming the flag."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{flag} must be an integer >= {minimum} (got {value!r})")
    return value


def launch_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """nproc, nnodes, node_rank, master, max_restarts and join_timeout, checked; ValueError names the flag."""
    nproc = values.get("nproc")
    checked: dict[str, Any] = {
        "nproc": _default_nproc() if nproc is None else _whole_number("--nproc", nproc, 1),
        "nnodes": _whole_number("--nnodes", values.get("nnodes", 1), 1),
        "max_restarts": _whole_number("--max-restarts", values.get("max_restarts", 0), 0),
        "join_timeout": _whole_number("--join-timeout", values.get("join_timeout", 600), 1),
        "node_rank": None,
        "master": values.get("master"),
    }
    if values.get("node_rank") is not None:
        checked["node_rank"] = _whole_number("--node-rank", values["node_rank"], 0)
        if checked["node_rank"] >= checked["nnodes"]:
            raise ValueError(f"--node-rank must be below --nnodes {checked['nnodes']} "
                             f"(got {checked['node_rank']})")
    master = checked["master"]
    if master is not None:
        host, _, port = str(master).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--master must be HOST:PORT, e.g. 10.0.0.1:29500 (got {master!r})")
    return checked


def _slurm_defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """Node count, node rank and master host when spawn itself was started by srun."""
    if "SLURM_JOB_ID" not in environ or "SLURM_NODEID" not in environ:
        return {}
    nnodes = int(environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", "1")))
    if nnodes == 1:
        return {}
    host = first_slurm_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    port = environ.get("MASTER_PORT") or str(15000 + int(environ["SLURM_JOB_ID"]) % 20000)
    return {"nnodes": nnodes, "node_rank": int(environ["SLURM_NODEID"]), "master": f"{host}:{port}"}


def _default_nproc() -> int:
    import torch

    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return torch.accelerator.device_count() if accelerator is not None else 1


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
def _launcher_scope(settings: Mapping[str, Any], nproc: int) -> Iterator[str]:
    """Settings as TRAINLOOP_* variables and OMP_NUM_THREADS for the workers; all undone after.

    torch's launcher also writes to os.environ and installs signal handlers, and leaves its log
    directory behind: restore the first two and remove the last, so `run()` can be called many
    times from one Python process (tests, notebooks).
    """
    saved_env = dict(os.environ)
    saved_handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS_TORCH_HANDLES}
    log_dir = tempfile.mkdtemp(prefix="trainloop-spawn-")
    try:
        for name, value in settings.items():
            # A mapping (tp_plan) travels as JSON, which the setting's parser reads back.
            os.environ[env_name(name)] = json.dumps(value) if isinstance(value, dict) else str(value)
        if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        yield log_dir
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in saved_handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        shutil.rmtree(log_dir, ignore_errors=True)


def _validated_settings(settings: Mapping[str, Any],
                        environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Parse and check the run settings here, before any worker starts; return those given.

    The `TRAINLOOP_*` variables already in the environment reach every worker too, unless a
    setting given here replaces them: they are checked with the rest, and an error names the
    variable. (A bad one found in the workers would fail every restart attempt the same way.)
    """
    given = {canonical(name): parse_setting(name, value) if isinstance(value, str) else value
             for name, value in settings.items() if value is not None}
    inherited = {name: value for name, value in settings_from_env(environ).items() if name not in given}
    config_from(given, inherited)  # raises ValueError naming the setting or the variable
    return given


def run(fn: Callable[..., Any], *args: Any, n: int = 2, max_restarts: int = 0,
        **settings: Any) -> Any:
    """Run `fn(*args)` on `n` local processes; return rank 0's result.

    `fn` must be importable by name (a module-level function): the workers are fresh Python
    processes. Run settings (`precision="bf16"`, `accumulate=4`, ...) reach `tl.init` in every
    worker. A failing worker stops the job and raises torch's `ChildFailedError`, whose message
    holds the worker's traceback.
    """
    from torch.distributed.launcher.api import elastic_launch

    _check_importable(fn)
    parsed = _validated_settings(settings)
    with _launcher_scope(parsed, n) as log_dir:
        config = launch_config(n, max_restarts=max_restarts, log_dir=log_dir)
        results = elastic_launch(config, InWorker(fn, os.getpid()))(*args)
    return results[0]


def _with_default(help_text: str, default: Any) -> str:
    """A setting's help with its default, unless the help already says it in words."""
    return help_text if "(default:" in help_text else f"{help_text} (default: {default})"


def _check_importable(fn: Callable[..., Any]) -> None:
    """Refuse, before any worker starts, a function the fresh worker processes cannot import."""
    qualname = getattr(fn, "__qualname__", "")
    main = sys.modules.get("__main__")
    if "<" in qualname:  # a lambda or a function defined inside another function
        where = f"{qualname} is a lambda or a nested function"
    elif getattr(fn, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        where = f"{qualname} is defined in a notebook cell or `python -c`"
    else:
        return
    raise TypeError(
        f"spawn.run needs a function the worker processes can import by name, but {where}: the "
        "workers are fresh Python processes (not forks). Put it in a module (a .py file beside the "
        "notebook) and import it from there."
    )


def rendezvous_failure(error: BaseException, nnodes: int, endpoint: str, join_timeout: int) -> str:
    """The message for a rendezvous that failed: what happened, judged by torch's error type.

    A connection error means the rendezvous store (served by the machine at --master, or by
    node 0) is gone or cannot be reached; a timeout means a machine is missing.
    """
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError

    reason = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
    if isinstance(error, (RendezvousConnectionError, DistNetworkError)):
        what = (f"lost, or could not make, the connection to the rendezvous at {endpoint}: the "
                f"machine that serves it (the one at --master) died or cannot be reached")
    else:
        what = (f"the {nnodes} machines did not all meet at {endpoint} within --join-timeout "
                f"{join_timeout} s: a machine is missing (not started, or died and did not come "
                f"back for a restart)")
    return (f"trainloop.spawn: {what} ({type(error).__name__}: {reason}). Start every machine with "
            f"the same --nnodes and --master and check that the address is reachable from each; "
            f"see docs/multinode.md.")


def _culprit(failures: Mapping[int, Any]) -> tuple[int, Any]:
    """The failure that caused the others: not a worker the launcher itself stopped (SIGTERM)."""
    stopped = -signal.SIGTERM.value
    ranked = sorted(failures.items(), key=lambda item: (item[1].exitcode == stopped, item[1].timestamp, item[0]))
    return ranked[0]


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m trainloop.spawn` command line. Returns the exit code."""
    parser = build_parser()
    options = parse_command_line(parser, sys.argv[1:] if argv is None else argv)
    try:
        values = _read_toml(options.config) if options.config else {}
        values.update(_slurm_defaults(os.environ))
        values.update({k: v for k, v in vars(options).items()
                       if v is not None and k in (*_LAUNCH_FLAGS, *(f.name for f in SETTINGS))})
        settings = _validated_settings({f.name: values.get(f.name) for f in SETTINGS})
        launch = launch_values(values)
    except ValueError as error:
        parser.error(str(error))
    if not options.module and not os.path.isfile(options.target):
        parser.error(f"no such script: {options.target} (use -m to run a module)")

    from torch.distributed import DistNetworkError, DistStoreError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    # Each worker first arranges to die with this process (trainloop.worker), then runs the target.
    command = ["-u", "-m", "trainloop.worker", str(os.getpid()),
               *(["-m"] if options.module else []), options.target, *options.args]
    with _launcher_scope(settings, launch["nproc"]) as log_dir:
        try:
            config = launch_config(**launch, log_dir=log_dir)
        except ValueError as error:
            parser.error(str(error))
        try:
            elastic_launch(config, sys.executable)(*command)
        except ChildFailedError as error:
            rank, failure = _culprit(error.failures)
            where = " on this machine" if config.max_nodes > 1 else ""
            print(f"trainloop.spawn: rank {rank} (pid {failure.pid}) failed first{where}, exit code "
                  f"{failure.exitcode}; its traceback is above. The job was stopped.", file=sys.stderr)
            return failure.exitcode if failure.exitcode > 0 else 1
        except (RendezvousError, DistStoreError, DistNetworkError) as error:
            print(rendezvous_failure(error, config.max_nodes, config.rdzv_endpoint,
                                     launch["join_timeout"]), file=sys.stderr)
            return 1
        except SignalException as stop:
            # Ctrl-C or SIGTERM: torch's agent has already stopped every worker.
            print(f"trainloop.spawn: stopped by {stop.sigval.name}; every worker was stopped.", file=sys.stderr)
            return 128 + stop.sigval.value
    return 0


if __name__ == "__main__":
    sys.exit(main())

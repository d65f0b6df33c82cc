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
import ast
import inspect
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trainloop.config import SETTINGS, config_from, env_name, parse_setting, settings_from_env
from trainloop.launcher import (
    connects_as_client,
    culprit,
    free_port,
    launch_config,
    launcher_scope,
    never_joined,
    never_joined_warning,
    rendezvous_failure,
    wait_until_reachable,
)
from trainloop.topology import first_slurm_host
from trainloop.worker import InWorker

__all__ = ["free_port", "launch_config", "main", "rendezvous_failure", "run"]

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
            help=_with_default(field.metadata["help"], field.default),
        )
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
            import tomli as tomllib
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
    normalised = {key.replace("-", "_"): value for key, value in values.items()}
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


def _validated_settings(settings: Mapping[str, Any], world: tuple[int, int] = (1, 1),
                        environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Parse and check the run settings here, before any worker starts; return those given.

    The `TRAINLOOP_*` variables already in the environment reach every worker too, unless a
    setting given here replaces them: they are checked with the rest, and an error names the
    variable. (A bad one found in the workers would fail every restart attempt the same way.)
    `world` is (processes per machine, machines): the mesh settings are checked against it.
    """
    given = {name: parse_setting(name, value) if isinstance(value, str) else value
             for name, value in settings.items() if value is not None}
    inherited = {name: value for name, value in settings_from_env(environ).items() if name not in given}
    config = config_from(given, inherited)  # raises ValueError naming the setting or the variable
    if config.device is not None:
        # This machine's devices: every worker here would find the same (each launcher of a
        # job of many machines checks its own).
        from trainloop.topology import check_device

        try:
            check_device(config.device)
        except ValueError as error:
            raise ValueError(f"{env_name('device')}: {error}" if "device" in inherited else str(error)) from None
    _check_mesh(config, set(given) | set(inherited), *world)
    return given


def _check_mesh(config: Any, given: set[str], nproc: int, nnodes: int) -> None:
    """The mesh settings given here against the job's world size (`-n` x `--nnodes`).

    A setting given here (a flag, a `TRAINLOOP_*` variable) wins over the script's `init(...)`
    argument, but one not given here may still come from the script: so only what no such
    argument could repair is refused (sizes whose product cannot fit the world size, a mesh with
    a strategy other than fsdp when both are given here).
    """
    from trainloop.strategies.base import refuse_mesh

    world = nproc * nnodes
    fixed = {name: getattr(config, name) for name in ("dp_replicate", "dp_shard", "tp")
             if name in given and getattr(config, name) != -1}
    if "strategy" in given and config.strategy != "fsdp" and (fixed.get("tp", 1) != 1 or fixed.get("dp_replicate", 1) != 1):
        refuse_mesh(config, config.strategy)
    product = math.prod(fixed.values())
    sizes = " x ".join(f"{name}={size}" for name, size in fixed.items())
    where = f"the world size {world} (-n {nproc} x --nnodes {nnodes})"
    if len(fixed) == 3 and product != world:
        raise ValueError(f"{sizes} = {product}, not {where}: the three must multiply to the world size "
                         f"(dp_shard=-1 takes what dp_replicate and tp leave)")
    if world % product:
        raise ValueError(f"{sizes} = {product} does not divide {where}, so no mesh has that many ranks: "
                         f"choose sizes whose product divides {world}, or another -n")


def run(fn: Callable[..., Any], *args: Any, n: int = 2, max_restarts: int = 0,
        settings: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` on `n` local processes; return rank 0's result.

    Args:
        fn: a module-level function (the workers are fresh Python processes that import it
            by name); call `run` under `if __name__ == "__main__":` in a script.
        n: the number of processes. `max_restarts`: restart them all after a failure, up to
            this many times.
        settings: run settings that reach `tl.init` in every worker, as spawn's flags do
            (`settings={"precision": "bf16", "accumulate": 4}`).
        **kwargs: keyword arguments of `fn`. For compatibility, a keyword that `fn` does not
            take but that names a run setting (`accumulate=4`) is read as that setting.

    Everything is checked here, before any worker starts: `fn` (callable, importable), the
    arguments against its signature, the settings. A failing worker stops the job and raises
    torch's `ChildFailedError`, which names the rank that failed first and holds its traceback.

    Example:
        if __name__ == "__main__":
            loss = spawn.run(train, "data/", n=2, lr=3e-4, settings={"precision": "bf16"})
    """
    from torch.distributed.launcher.api import elastic_launch

    _check_runnable(fn)
    fn_kwargs, legacy_settings = _split_keywords(fn, args, kwargs)
    parsed = _validated_settings({**legacy_settings, **(settings or {})}, (n, 1))
    with launcher_scope(parsed, n) as log_dir:
        config = launch_config(n, max_restarts=max_restarts, log_dir=log_dir)
        results = elastic_launch(config, InWorker(fn, os.getpid(), fn_kwargs))(*args)
    return results[0]


def _split_keywords(fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    """`fn`'s keyword arguments and the run settings given as keywords (the older spelling).

    Raises TypeError, naming `fn`'s signature, when the arguments do not fit it: found here
    rather than in every worker.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins): fn gets them all
        return dict(kwargs), {}
    names = {field.name for field in SETTINGS}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    settings = {key: value for key, value in kwargs.items()
                if key in names and not takes_any and key not in signature.parameters}
    fn_kwargs = {key: value for key, value in kwargs.items() if key not in settings}
    try:
        signature.bind(*args, **fn_kwargs)
    except TypeError as error:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(f"spawn.run: the arguments do not fit {name}{signature}: {error} (run settings "
                        f"go in settings={{...}})") from None
    return fn_kwargs, settings


def _check_runnable(fn: Any) -> None:
    """Refuse, before any worker starts, what the workers could not run."""
    if not callable(fn):
        hint = " (to run a script: python -m trainloop.spawn -n 2 script.py)" if isinstance(fn, str) else ""
        raise TypeError(f"spawn.run needs a function to run in every worker, e.g. spawn.run(train, n=2); "
                        f"got {fn!r} ({type(fn).__name__}){hint}")
    _check_main_guard()
    _check_importable(fn)


_MISSING_GUARD = (
    "spawn.run was called at the top level of {where}, outside `if __name__ == \"__main__\":`; "
    "every worker imports that file again (to find fn), so put the call, or the call of the "
    "function that makes it, under `if __name__ == \"__main__\":`"
)


def _check_main_guard() -> None:
    """Refuse a spawn.run called from the main script's top level without the `__main__` guard.

    The workers import the main script (as `__mp_main__`) to find `fn`; an unguarded call
    would run again in each of them, and multiprocessing stops that with a long bootstrapping
    error. The outermost frame of the main script shows which of its lines is running.
    """
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main_file:
        return  # a notebook, `python -c` or a REPL: nothing the workers import again
    frame = sys._getframe(1)
    outermost = None
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_code.co_filename == main_file:
            outermost = frame
        frame = frame.f_back
    if outermost is None:
        return
    try:
        with open(main_file, encoding="utf-8") as source:
            tree = ast.parse(source.read())
    except (OSError, SyntaxError, ValueError):
        return
    line = outermost.f_lineno
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and node.lineno <= line <= (node.end_lineno or node.lineno) and any(
                isinstance(name, ast.Name) and name.id == "__name__" for name in ast.walk(node.test)):
            return
    raise RuntimeError(_MISSING_GUARD.format(where=main_file))


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


def main(argv: Sequence[str] | None = None) -> int:
    """The `python -m trainloop.spawn` command line. Returns the exit code."""
    parser = build_parser()
    options = parse_command_line(parser, sys.argv[1:] if argv is None else argv)
    try:
        values = _read_toml(options.config) if options.config else {}
        values.update(_slurm_defaults(os.environ))
        values.update({k: v for k, v in vars(options).items()
                       if v is not None and k in (*_LAUNCH_FLAGS, *(f.name for f in SETTINGS))})
        launch = launch_values(values)
        settings = _validated_settings({f.name: values.get(f.name) for f in SETTINGS},
                                       (launch["nproc"], launch["nnodes"]))
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
    with launcher_scope(settings, launch["nproc"]) as log_dir:
        try:
            config = launch_config(**launch, log_dir=log_dir)
        except ValueError as error:
            parser.error(str(error))
        try:
            if connects_as_client(config):
                wait_until_reachable(config.rdzv_endpoint, launch["join_timeout"])
            elastic_launch(config, sys.executable)(*command)
        except ChildFailedError as error:
            rank, failure = culprit(error.failures)
            where = " on this machine" if config.max_nodes > 1 else ""
            print(f"trainloop.spawn: rank {rank} (pid {failure.pid}) failed first{where}, exit code "
                  f"{failure.exitcode}; its traceback is above. The job was stopped.", file=sys.stderr)
            return failure.exitcode if failure.exitcode > 0 else 1
        except (RendezvousError, DistStoreError, DistNetworkError, ConnectionError) as error:
            print(rendezvous_failure(error, config.max_nodes, config.rdzv_endpoint,
                                     launch["join_timeout"]), file=sys.stderr)
            return 1
        except SignalException as stop:
            # Ctrl-C or SIGTERM: torch's agent has already stopped every worker.
            print(f"trainloop.spawn: stopped by {stop.sigval.name}; every worker was stopped.", file=sys.stderr)
            return 128 + stop.sigval.value
        alone = never_joined(log_dir)
        if alone:
            print(never_joined_warning(alone, config.nproc_per_node * config.max_nodes), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `python -m trainloop.spawn` command line: spawn's flags, a TOML file, SLURM's variables,
then the job on torch's elastic launcher and what it says when the job ends."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from trainloop.config import ALIASES, SETTINGS, canonical
from trainloop.spawn.checks import validated_settings
from trainloop.spawn.job import (
    connects_as_client,
    culprit,
    launch_config,
    launcher_scope,
    never_joined,
    never_joined_warning,
    rendezvous_failure,
    wait_until_reachable,
)
from trainloop.topology import first_slurm_host

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


def _with_default(help_text: str, default: Any) -> str:
    """A setting's help with its default, unless the help already says it in words."""
    return help_text if "(default:" in help_text else f"{help_text} (default: {default})"


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
        settings = validated_settings({f.name: values.get(f.name) for f in SETTINGS},
                                      world=(launch["nproc"], launch["nnodes"]))
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

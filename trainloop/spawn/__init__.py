"""Start a job of many processes on PyTorch's own elastic launcher (what `torchrun` runs).

    python -m trainloop.spawn -n 8 train.py --lr 3e-4
    python -m trainloop.spawn -n 8 --nnodes 2 --node-rank 0 --master 10.0.0.1:29500 train.py
    python -m trainloop.spawn -n 2 --precision bf16 --accumulate 4 train.py
    python -m trainloop.spawn -n 8 --max-restarts 3 train.py
    python -m trainloop.spawn --config run.toml train.py
    python -m trainloop.spawn -n 2 -m package.module --flag

    trainloop.spawn.run(fn, *args, n=2)      # from Python: returns rank 0's result

This package only translates trainloop's flags into a `LaunchConfig` and hands it to
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

The package: `run` here; the command line in `command_line` (run by `__main__`); the checks
made before any worker starts in `checks`; the job itself (its `LaunchConfig`, scope, temporary
folder and reports) in `job`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from trainloop.spawn.checks import check_runnable, split_keywords, validated_settings
from trainloop.spawn.command_line import build_parser, main, parse_command_line
from trainloop.spawn.job import free_port, launch_config, launcher_scope, rendezvous_failure
from trainloop.worker import InWorker

__all__ = ["build_parser", "free_port", "launch_config", "main", "parse_command_line", "rendezvous_failure", "run"]


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

    check_runnable(fn)
    fn_kwargs, legacy_settings = split_keywords(fn, args, kwargs)
    parsed = validated_settings({**legacy_settings, **(settings or {})}, world=(n, 1))
    with launcher_scope(parsed, n) as log_dir:
        config = launch_config(n, max_restarts=max_restarts, log_dir=log_dir)
        results = elastic_launch(config, InWorker(fn, os.getpid(), fn_kwargs))(*args)
    return results[0]

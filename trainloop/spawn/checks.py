"""What spawn checks before any worker starts: the function `run` is given, its arguments, and
the run settings (against this machine's devices and the job's world size).

A bad setting found in the workers would fail every restart attempt the same way, and a
function the workers cannot run would fail in each of them: both are refused here, at once.
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from trainloop.config import ALIASES, SETTINGS, canonical, config_from, env_name, parse_setting, settings_from_env


def validated_settings(settings: Mapping[str, Any], environ: Mapping[str, str] = os.environ, *,
                       world: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """Parse and check the run settings here, before any worker starts; return those given.

    The `TRAINLOOP_*` variables already in the environment reach every worker too, unless a
    setting given here replaces them: they are checked with the rest, and an error names the
    variable. (A bad one found in the workers would fail every restart attempt the same way.)
    `world` is (processes per machine, machines): the mesh settings are checked against it.
    """
    given = {canonical(name): parse_setting(name, value) if isinstance(value, str) else value
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


def split_keywords(fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    """`fn`'s keyword arguments and the run settings given as keywords (the older spelling).

    Raises TypeError, naming `fn`'s signature, when the arguments do not fit it: found here
    rather than in every worker.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins): fn gets them all
        return dict(kwargs), {}
    names = {field.name for field in SETTINGS} | set(ALIASES)
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


def check_runnable(fn: Any) -> None:
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

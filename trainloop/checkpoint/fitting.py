"""Fitting a checkpoint read into memory to the run, then restoring it: whole, or in part.

`plan` checks everything against the run before anything is restored and says what will be
restored: the prepared models, optimizers, schedulers and loaders pair up with the checkpoint's
by position, the callbacks by key, the user's extra objects by name. `restore` then restores
exactly that. Strict (the default), any difference is a ValueError listing it; not strict, what
does not fit is left as it is and listed instead (a model's weights load where names and shapes
match). `parts` narrows what is restored at all (`tl.load(..., only=("models",))`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainloop.checkpoint.manifest import _class_name, _model_file, _sharded
from trainloop.checkpoint.reading import _Contents
from trainloop.checkpoint.rng import _set_rng_state
from trainloop.errors import CheckpointWarning
from trainloop.forwarding import unwrap
from trainloop.hooks import Callback

if TYPE_CHECKING:
    from collections.abc import MutableMapping

    from trainloop.state import RunState

PARTS = ("models", "optimizers", "schedulers", "loaders", "callbacks", "rng", "counters")


class Plan:
    """What `restore` restores: (object, saved state) pairs, and the parts."""

    def __init__(self, parts: frozenset[str]):
        self.parts = parts
        self.models: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
        self.optimizers: list[tuple[Any, dict]] = []
        self.schedulers: list[tuple[Any, dict]] = []
        self.loaders: list[tuple[Any, dict]] = []
        self.extra: list[tuple[str, Any]] = []


def plan(state: RunState, path: Path, contents: _Contents, parts: frozenset[str] = frozenset(PARTS),
         not_restored: list[str] | None = None, extra: MutableMapping[str, Any] | None = None) -> Plan:
    """Check the checkpoint against the run; changes nothing.

    Strict when `not_restored` is None: ValueError listing what differs. Otherwise each thing
    that does not fit is appended to `not_restored` (in words) and left out of the plan.
    """
    strict = not_restored is None
    manifest, trainer, optimization = contents.manifest, contents.trainer, contents.optimization
    result = Plan(parts)

    def differs(message: str) -> None:
        if strict:
            raise ValueError(message)
        not_restored.append(message)

    saved_lists = {"models": list(range(manifest["models"])), "optimizers": optimization["optimizers"],
                   "schedulers": optimization["schedulers"], "loaders": trainer["loaders"]}
    prepared = {"models": state.models, "optimizers": state.optimizers, "schedulers": state.schedulers,
                "loaders": state.loaders}
    for kind in saved_lists:
        saved, mine = len(saved_lists[kind]), len(prepared[kind])
        if kind in parts and saved != mine:
            if strict:
                raise ValueError(f"{path} holds {saved} {kind} but the run prepared {mine}: prepare the same objects")
            not_restored.append(f"{kind}: {path} holds {saved}, the run prepared {mine}; the first "
                                f"{min(saved, mine)} were paired up")
    if "models" in parts:
        _plan_models(state, path, contents, result, strict, differs)
    problems: list[str] = []
    classes = trainer.get("classes", {})
    for kind, objects, saved_states, pairs in (
            ("optimizer", state.optimizers, optimization["optimizers"], result.optimizers),
            ("scheduler", state.schedulers, optimization["schedulers"], result.schedulers)):
        if f"{kind}s" not in parts:
            continue
        saved_classes = classes.get(f"{kind}s", [])
        for index, (obj, saved) in enumerate(zip(objects, saved_states)):
            problem = None
            if index < len(saved_classes) and saved_classes[index] != _class_name(obj):
                problem = f"{kind} {index} is a {_class_name(obj)} in the run, a {saved_classes[index]} in the checkpoint"
            elif kind == "optimizer":
                saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
                sizes = [len(group["params"]) for group in obj.param_groups]
                if saved_sizes != sizes:
                    problem = (f"optimizer {index} ({type(obj).__name__}) has param groups of {sizes} "
                               f"parameters in the run, {saved_sizes} in the checkpoint")
                else:
                    problem = _moment_problem(index, obj, saved)
            if problem is None:
                pairs.append((obj, saved))
            elif strict:
                problems.append(problem)
            else:
                not_restored.append(problem)
    if problems:
        raise ValueError(f"{path} does not fit the run: {'; '.join(problems)}. Prepare the same "
                         "optimizers and schedulers, built the same way, as the run that saved it")
    if "loaders" in parts:
        for index, (loader, saved) in enumerate(zip(state.loaders, trainer["loaders"])):
            try:
                loader.check_state_dict(saved)
            except ValueError as error:
                differs(f"loader {index}: {error}")
                continue
            result.loaders.append((loader, saved))
    if "callbacks" in parts and not strict:
        for callback in state.callbacks:
            restores = type(callback).load_state_dict is not Callback.load_state_dict
            if restores and callback.key not in contents.callbacks:
                not_restored.append(f"callback {callback.key!r}: not in the checkpoint")
    _plan_extra(path, contents, extra, result, strict, not_restored)
    return result


def _moment_problem(index: int, optimizer: Any, saved: dict) -> str | None:
    """A saved per-parameter state tensor whose shape is not its parameter's (a model whose layer
    changed: torch's `load_state_dict` would take it, and the first step would fail)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for position, values in saved["state"].items():
        if not (isinstance(position, int) and 0 <= position < len(params) and isinstance(values, dict)):
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[position].shape:
                return (f"optimizer {index} ({type(optimizer).__name__}): its {key!r} of parameter {position} "
                        f"has shape {tuple(value.shape)}, the parameter {tuple(params[position].shape)}")
    return None


def _plan_models(state: RunState, path: Path, contents: _Contents, result: Plan, strict: bool, differs) -> None:
    manifest = contents.manifest
    if _sharded(manifest):
        return  # the shards' shapes are checked by distcp.load_sharded before it loads anything
    if state.strategy.sharded:
        raise ValueError(
            f"{path} holds whole (unsharded) weights from a {manifest['strategy']!r} run; a "
            f"strategy={state.config.strategy!r} run loads sharded checkpoints only: resume with that "
            "strategy, or start from its weights with tl.export and load_state_dict before sharding"
        )
    for index, (model, tensors) in enumerate(zip(state.models, contents.weights)):
        module = unwrap(model)
        problems, fitting = weight_problems(module, tensors)
        if problems:
            file = path / _model_file(index)
            if strict:
                shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
                raise ValueError(f"{file} does not fit {type(module).__name__}: {shown}")
            for problem in problems:
                differs(f"model {index} ({type(module).__name__}): {problem}")
        result.models.append((module, fitting))


def weight_problems(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict]:
    """The differences of names and shapes between `module` and `tensors` (as `load_model` matches
    them: a tied weight is stored once), and the tensors that fit."""
    from safetensors.torch import _remove_duplicate_names

    expected = module.state_dict()
    for removed in _remove_duplicate_names(expected, preferred_names=list(tensors)).values():
        for name in removed:
            del expected[name]
    problems = [f"{name}: checkpoint {tuple(t.shape)}, model {tuple(expected[name].shape)}"
                for name, t in tensors.items() if name in expected and expected[name].shape != t.shape]
    problems += [f"{name}: in the checkpoint, not in the model" for name in tensors if name not in expected]
    problems += [f"{name}: in the model, not in the checkpoint" for name in expected if name not in tensors]
    fitting = {name: t for name, t in tensors.items() if name in expected and expected[name].shape == t.shape}
    return problems, fitting


def _plan_extra(path: Path, contents: _Contents, extra: MutableMapping[str, Any] | None, result: Plan,
                strict: bool, not_restored: list[str] | None) -> None:
    requested = dict(extra or {})
    missing = [name for name in requested if name not in contents.extra]
    if missing and strict:
        raise ValueError(f"{path} holds no extra object named {', '.join(map(repr, missing))} (it holds "
                         f"{sorted(contents.extra) or 'none'}): load with strict=False to restore the others")
    for name, target in requested.items():
        if name not in contents.extra:
            not_restored.append(f"extra {name!r}: not in the checkpoint")
            continue
        saved = contents.extra[name]
        if isinstance(target, torch.nn.Module) and isinstance(saved, dict):
            problems, fitting = weight_problems(target, saved)
            if problems and strict:
                raise ValueError(f"extra {name!r} in {path} does not fit {type(target).__name__}: "
                                 + "; ".join(problems[:5]))
            for problem in problems:
                not_restored.append(f"extra {name!r} ({type(target).__name__}): {problem}")
            saved = fitting
        result.extra.append((name, saved))
    if not_restored is not None:  # not strict
        not_restored += [f"extra {name!r}: in the checkpoint, not asked for" for name in contents.extra
                         if name not in requested]


def restore(state: RunState, path: Path, contents: _Contents, plan: Plan,
            extra: MutableMapping[str, Any] | None = None) -> RunState:
    """Restore what `plan` holds; the state with the checkpoint's counters (if `counters` is a part)."""
    manifest, trainer, optimization, parts = contents.manifest, contents.trainer, contents.optimization, plan.parts
    if _sharded(manifest) and "models" in parts:
        from trainloop.checkpoint import distcp

        distcp.load_sharded([unwrap(m) for m in state.models], state.optimizers, path,
                            manifest["files"], optimization["optimizers"])
    else:
        for module, tensors in plan.models:
            module.load_state_dict(tensors, strict=False)  # `plan` matched the names
        for optimizer, saved in plan.optimizers:
            optimizer.load_state_dict(saved)
    for scheduler, saved in plan.schedulers:
        scheduler.load_state_dict(saved)
    if state.is_main and "loaders" in parts:
        _say_schedule_changes(state, path, trainer)
    for loader, saved in plan.loaders:
        loader.load_state_dict(saved)
    if "callbacks" in parts:
        for callback in state.callbacks:
            if callback.key in contents.callbacks:
                callback.load_state_dict(contents.callbacks[callback.key])
    for name, saved in plan.extra:
        target = extra[name]
        if hasattr(target, "load_state_dict"):
            if isinstance(target, torch.nn.Module):
                target.load_state_dict(saved, strict=False)  # `plan` matched the names
            else:
                target.load_state_dict(saved)
        else:
            extra[name] = saved  # plain data: given back in the mapping, as Fabric's load does
    if "rng" in parts and state.rank < len(contents.rng):
        _set_rng_state(contents.rng[state.rank], state.device)
    if "counters" not in parts:
        return state
    # The report due at the checkpoint's own step was made by the run that saved it (it logs
    # right after its on_step hooks): count it as made, so reports continue at the same steps.
    every = state.config.log_every
    logged_step = max(trainer["logged_step"], trainer["step"] // every * every)
    return state.evolve(step=trainer["step"], micro_step=trainer["micro_step"],
                        logged_step=logged_step, window_micro_steps=0, window_items=None,
                        pending_logs=None)


def _say_schedule_changes(state: RunState, path: Path, trainer: dict[str, Any]) -> None:
    """One warning when the run resumes with another accumulate, batch size or world size:
    every sample is still seen once per epoch, but an optimizer step now takes another number
    of samples, and everything counted in steps (`every=`, `log_every`, LR schedules) shifts."""
    saved_accumulate = trainer.get("accumulate")  # absent before this was recorded
    accumulate = state.config.accumulate
    changes = []
    if isinstance(saved_accumulate, int) and saved_accumulate != accumulate:
        changes.append(f"accumulate {saved_accumulate} -> {accumulate}")
    old_samples = new_samples = None
    for index, (loader, saved) in enumerate(zip(state.loaders, trainer["loaders"])):
        batch_size, world_size = saved.get("batch_size"), saved.get("world_size")
        if not (isinstance(batch_size, int) and isinstance(world_size, int)):
            continue
        which = f" (loader {index})" if len(state.loaders) > 1 else ""
        if batch_size != loader.batch_size:
            changes.append(f"batch_size {batch_size} -> {loader.batch_size}{which}")
        if world_size != loader.world_size and index == 0:
            changes.append(f"world size {world_size} -> {loader.world_size}")
        if index == 0 and isinstance(saved_accumulate, int):
            old_samples = batch_size * world_size * saved_accumulate
            new_samples = loader.batch_size * loader.world_size * accumulate
    if not changes:
        return
    samples = (f" The checkpoint's run took {old_samples} samples per optimizer step, now {new_samples} "
               "(batch_size x world size x accumulate)." if old_samples is not None else "")
    warnings.warn(
        f"resuming from {path} with another schedule: {', '.join(changes)}.{samples} Every sample of an "
        f"epoch is still seen once, from where the checkpoint stopped; the step count continues from "
        f"{trainer['step']}, so what counts steps (Checkpoint every=, log_every, LR schedulers) now counts "
        "steps of the new size", CheckpointWarning, stacklevel=5)

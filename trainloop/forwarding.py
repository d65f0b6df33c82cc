"""The prepared model behaves like the user's model: wrappers forward attribute access to it.

`prepare` returns the user's module inside wrappers (`Autocast`, DDP, torch.compile's
`OptimizedModule`). `ForwardsAttributes` makes what the wrappers do not have themselves reach
the user's module, so `model.generate(...)`, `model.config`, `model.device`,
`model.save_pretrained(...)` and the user's own methods work on the prepared model. The rules:

- Reading: the wrapper's own attributes first (its `nn.Module` methods, its submodule
  `module`, what it set in `__init__`); then the user's module's public attributes (names not
  starting with `_`). Private names are never forwarded: torch's internals probe wrappers for
  them (`_orig_mod`, `_fsdp_*`), and a forwarded one would make a wrapper look like something
  it is not. Reach private attributes through `tl.unwrap(model)`.
- Methods of the user's module come back bound to it, wrapped by `_wrap_method`: `Autocast`
  runs them under the precision policy, as it runs the forward (so `generate` computes in bf16).
- Submodules and other values are returned as they are (`model.lm_head is tl.unwrap(model).lm_head`):
  calling a submodule directly runs it outside the policy.
- Under DDP, the user's methods run outside DDP's forward, where no gradient is synchronised:
  right for inference (`generate` under `torch.no_grad()`, or in eval mode). A method that runs
  the model's forward in training mode with autograd on raises, naming the way out:
  `tl.mark_forward_method(model, "training_step")` makes `model.training_step(...)` run
  through the prepared model's whole forward (policy, DDP), as Lightning Fabric's
  `mark_forward_method` does.
- Writing: assigning a public attribute that the user's module has and the wrapper does not
  sets it on the user's module (`model.config = new_config` reaches `generate`), and so does
  assigning a submodule or parameter (`model.head = nn.Linear(...)`: in the user's module's
  checkpoints), except under DDP or FSDP, which would never synchronise its gradients: there it
  raises (assign it before `tl.prepare`). Any other assignment sets it on the wrapper, as on any
  module: torch's own wrappers set new attributes on themselves after construction (DDP does),
  so sending unknown names down would break them. While a wrapper is being constructed, every
  write is its own. `del model.name` follows the same rule.
- `state_dict()` and `load_state_dict()` are the user's module's, with its keys (no `module.`
  prefix), whatever the wrappers: a checkpoint of the prepared model loads into the plain one.

Nothing of the user's class or instance is patched.

The cost per step: none beyond a plain DDP's. DDP's forward and `no_sync` set their own flags on
every step and read `self.module`; the wrapper's `__setattr__` sets a name it already has with a
single dict check (fewer calls than `nn.Module.__setattr__`, which it stands in for), and its
`__getattr__` finds a submodule as `nn.Module.__getattr__` would. Routing a marked method through
DDP's forward shadows DDP's `_run_ddp_forward` for that one call only.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

# Values that nn.Module.__setattr__ may register (parameters, buffers, submodules) rather than set.
_REGISTERED = (torch.Tensor, nn.Module)


class ForwardsAttributes:
    """Mixin for an `nn.Module` wrapper whose wrapped module is `self.module`; put it first in the bases."""

    def __getattr__(self, name: str) -> Any:
        # Reached only when the normal lookup fails. Per step that is DDP's `self.module`: the
        # wrapper's submodules are looked up here first, as nn.Module.__getattr__ would (the
        # stores hold disjoint names), so a plain DDP pays the same one Python call.
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:
            return modules[name]
        try:
            return nn.Module.__getattr__(self, name)  # the wrapper's parameters and buffers
        except AttributeError:
            users = None if name.startswith("_") else _users_module(self)
            if users is None:
                raise
        try:
            value = getattr(users, name)
        except AttributeError as error:
            raise AttributeError(f"{type(self).__name__} (prepared {type(users).__name__}) has no attribute "
                                 f"{name!r}, nor has the {type(users).__name__} it wraps") from error
        if inspect.ismethod(value) and value.__self__ is users:
            if name in self.__dict__.get("_forward_methods", ()):
                return _through_forward(self, value)
            return _refused_outside_forward(self, self._wrap_method(value), name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__ and not isinstance(value, _REGISTERED):
            # The wrapper's own plain attribute: DDP's flags, which its forward and no_sync set on
            # every step. Never forwarded (the wrapper has it), and what nn.Module.__setattr__
            # does in the end (a name in __dict__ is in none of the parameter, buffer and
            # submodule stores), without its checks: cheaper than on a plain DDP.
            object.__setattr__(self, name, value)
            return
        users = self._forwarded_to(name)
        if users is None and isinstance(value, (nn.Module, nn.Parameter)) and not name.startswith("_") \
                and self.__dict__.get("_writes_forwarded", False) and not _has_own(self, name):
            users = _submodule_home(self, name, value)
        if users is not None:
            setattr(users, name, value)
        else:
            nn.Module.__setattr__(self, name, value)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The user's module's state dict: its own keys, whatever wraps it."""
        return unwrap(self).state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load into the user's module, by its own keys (what `state_dict()` gives)."""
        return unwrap(self).load_state_dict(state_dict, strict=strict, assign=assign)

    def __delattr__(self, name: str) -> None:
        users = self._forwarded_to(name)
        if users is not None:
            delattr(users, name)
        else:
            nn.Module.__delattr__(self, name)

    def __dir__(self) -> list[str]:
        users = _users_module(self)
        own = nn.Module.__dir__(self)
        if users is None:
            return own
        return sorted(set(own) | {name for name in dir(users) if not name.startswith("_")})

    def _wrap_method(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """The user's bound `method` as the wrapper hands it out; as it is, unless a wrapper says otherwise."""
        return method

    def _forward_writes(self) -> None:
        """Call at the end of the wrapper's `__init__`: from then on, writes may reach the user's module.

        Until then every write is the wrapper's own: a constructor sets attributes that the
        user's module may also have (DDP sets `self.device`, a property of Hugging Face models).
        """
        self.__dict__["_writes_forwarded"] = True

    def _forwarded_to(self, name: str) -> nn.Module | None:
        """The user's module when assigning or deleting `name` is for it, else None (the wrapper's)."""
        # The wrapper's own attributes first: this check is a few dict lookups where finding the
        # user's module is a walk.
        if name.startswith("_") or not self.__dict__.get("_writes_forwarded", False) or _has_own(self, name):
            return None
        users = _users_module(self)
        if users is None:
            return None
        return users if hasattr(users, name) else None


def _submodule_home(wrapper: nn.Module, name: str, value: Any) -> nn.Module:
    """Where a submodule or parameter assigned on the prepared model goes: the user's module,
    unless DDP wraps it (it would never synchronise the new parameters' gradients)."""
    users = unwrap(wrapper)  # built: only then are writes forwarded here
    fsdp = sys.modules.get("torch.distributed.fsdp")
    owner = next((type(layer).__name__ for layer in wrapper_layers(wrapper)
                  if isinstance(layer, nn.parallel.DistributedDataParallel)
                  or (fsdp is not None and isinstance(layer, fsdp.FSDPModule))), None)
    if owner is not None:
        raise ValueError(
            f"cannot assign a {type(value).__name__} to the prepared model as {name!r}: "
            f"{owner} took over the parameters at tl.prepare, and would never synchronise this "
            "one's gradients, so each rank would train it apart. Assign it to your model before "
            "tl.prepare"
        )
    return users


def _through_forward(wrapper: Any, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` run as the prepared model's forward: under the policy and inside DDP's forward."""

    @functools.wraps(method)
    def through_forward(*args: Any, **kwargs: Any) -> Any:
        ddp = next((layer for layer in wrapper_layers(wrapper) if isinstance(layer, DistributedDataParallel)), None)
        if ddp is None:
            return wrapper._wrap_method(method)(*args, **kwargs)
        # For this one call, DDP's forward runs `method` where it runs the module's forward: an
        # instance attribute shadows DDP's `_run_ddp_forward` (a plain method of its class), so
        # the ordinary forward, every other step, runs torch's own with no call of ours.
        vars(ddp)["_run_ddp_forward"] = functools.partial(_run_routed, ddp, method)
        try:
            return wrapper(*args, **kwargs)
        finally:
            vars(ddp).pop("_run_ddp_forward", None)

    return through_forward


def _run_routed(ddp: nn.parallel.DistributedDataParallel, method: Callable[..., Any], *inputs: Any,
                **kwargs: Any) -> Any:
    """torch's `DistributedDataParallel._run_ddp_forward`, running `method` instead of the module's
    forward: inside DDP's own bookkeeping; the user's module is never patched."""
    if ddp._use_python_reducer:
        return method(*inputs, **kwargs)
    with ddp._inside_ddp_forward():
        return method(*inputs, **kwargs)


def _refused_outside_forward(wrapper: nn.Module, method: Callable[..., Any], name: str) -> Callable[..., Any]:
    """`method`, which raises if it runs the model's forward in training with autograd on under DDP."""
    if not any(isinstance(layer, nn.parallel.DistributedDataParallel) for layer in wrapper_layers(wrapper)):
        return method
    users = unwrap(wrapper)

    @functools.wraps(method)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if not (users.training and torch.is_grad_enabled()):
            return method(*args, **kwargs)  # inference: nothing to synchronise
        ran: list[nn.Module] = []

        def note(module: nn.Module, inputs: Any) -> None:
            ran.append(module)

        handles = [module.register_forward_pre_hook(note) for module in users.modules()]
        try:
            output = method(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if ran:
            raise RuntimeError(
                f"{type(users).__name__}.{name}() ran the model's forward outside "
                "DistributedDataParallel's forward, in training mode with autograd on: its "
                "gradients would not be synchronised and each rank would train apart. Call "
                f"tl.mark_forward_method(model, {name!r}) after tl.prepare to run it through the "
                "prepared model's forward, or run it under torch.no_grad() (inference)"
            )
        return output

    return checked


def mark_forward_method(model: nn.Module, name: str) -> None:
    """Make `model.<name>(...)` run through the prepared model's whole forward.

    `model` is what `tl.prepare` returned; `name` a method of the user's module (a
    `training_step` that calls `self(...)` and computes the loss). Marked, the method runs
    as the forward would: under the precision policy and inside DDP's forward, so its
    gradients are synchronised like the forward's. Lightning Fabric's `mark_forward_method`.
    On a prepared model with no wrapper (one process in fp32) methods already run as they are,
    and this only checks the name. Raises AttributeError if the user's module has no such method.
    """
    users = unwrap(model)
    if not inspect.ismethod(getattr(users, name, None)):
        raise AttributeError(f"{type(users).__name__} has no method {name!r} to mark as a forward method")
    if isinstance(model, ForwardsAttributes):
        model.__dict__.setdefault("_forward_methods", set()).add(name)


def _has_own(wrapper: nn.Module, name: str) -> bool:
    return (name in wrapper.__dict__ or hasattr(type(wrapper), name)
            or any(name in wrapper.__dict__.get(store, ()) for store in ("_parameters", "_buffers", "_modules")))


def _users_module(wrapper: nn.Module) -> nn.Module | None:
    """The user's module inside `wrapper`; None while the wrapper is being built (no `module` yet)."""
    if "module" not in wrapper.__dict__.get("_modules", {}):
        return None
    return unwrap(wrapper)


# -- the walk through the wrappers -------------------------------------------------------------


def wrapper_layers(model: nn.Module) -> Iterator[nn.Module]:
    """`model`, then each module it wraps, outermost first: the user's module comes last.

    The wrappers `prepare` puts around the user's module: autocast (`precision.Autocast`) and
    DDP (torch's or the subclass below), whose wrapped module is `module`, and torch.compile's
    `OptimizedModule`, whose is `_orig_mod`. FSDP2 and tensor parallelism shard the user's module
    in place and add no layer. Everything that must reach the user's module, or one particular
    layer, walks this one chain.
    """
    while True:
        yield model
        if isinstance(model, (ForwardsAttributes, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(model.__dict__.get("_modules", {}).get("_orig_mod"), nn.Module):  # OptimizedModule
            model = model._orig_mod  # pyright: ignore[reportAssignmentType]  (a Module: checked above)
        else:
            return


def refuse_prepared(model: nn.Module) -> None:
    """ValueError for a model that a `prepare` already wrapped (or sharded): preparing it again
    would wrap it twice (Autocast around Autocast, DDP around DDP)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # imported by then if anything was sharded
    for layer in wrapper_layers(model):
        if isinstance(layer, (ForwardsAttributes, nn.parallel.DistributedDataParallel)) or (
                fsdp is not None and isinstance(layer, fsdp.FSDPModule)):
            raise ValueError(
                f"this {type(model).__name__} was already prepared (it is wrapped in "
                f"{type(layer).__name__}), and preparing it again would wrap it twice: prepare "
                "the user's module once per run (tl.unwrap(model) gives it back), or keep using "
                "the prepared model"
            )


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside what `prepare` returned (autocast, DDP, compile wrappers)."""
    *_, innermost = wrapper_layers(model)
    return innermost


class DistributedDataParallel(ForwardsAttributes, nn.parallel.DistributedDataParallel):
    """torch's DistributedDataParallel, and the user's model's attributes reachable through it.

    Methods reached through it run on the user's module directly, outside DDP's forward (no
    gradient synchronisation is set up for them): right for `generate` and other inference, as
    `tl.unwrap(model).method()` would be. A method marked with `tl.mark_forward_method` runs
    inside DDP's forward instead; an unmarked one that runs the forward in training raises.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._forward_writes()

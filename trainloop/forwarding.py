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
- Writing: assigning a public attribute that the user's module has and the wrapper does not
  sets it on the user's module (`model.config = new_config` reaches `generate`). Any other
  assignment sets it on the wrapper, as on any module: torch's own wrappers set new attributes
  on themselves after construction (DDP does), so sending unknown names down would break them.
  While a wrapper is being constructed, every write is its own. `del model.name` follows the
  same rule.

Nothing of the user's class or instance is patched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn


class ForwardsAttributes:
    """Mixin for an `nn.Module` wrapper whose wrapped module is `self.module`; put it first in the bases."""

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)  # the wrapper's parameters, buffers, submodules
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
            return self._wrap_method(value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        users = self._forwarded_to(name)
        if users is not None:
            setattr(users, name, value)
        else:
            nn.Module.__setattr__(self, name, value)

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
        # The wrapper's own attributes first: DDP sets some of them on every step (no_sync), and
        # this check is a few dict lookups where finding the user's module is a walk.
        if name.startswith("_") or not self.__dict__.get("_writes_forwarded", False) or _has_own(self, name):
            return None
        users = _users_module(self)
        if users is None:
            return None
        return users if hasattr(users, name) else None


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


def unwrap(model: nn.Module) -> nn.Module:
    """The user's own module inside what `prepare` returned (autocast, DDP, compile wrappers)."""
    *_, innermost = wrapper_layers(model)
    return innermost


class DistributedDataParallel(ForwardsAttributes, nn.parallel.DistributedDataParallel):
    """torch's DistributedDataParallel, and the user's model's attributes reachable through it.

    Methods reached through it run on the user's module directly, outside DDP's forward (no
    gradient synchronisation is set up for them): right for `generate` and other inference, as
    `tl.unwrap(model).method()` would be.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._forward_writes()


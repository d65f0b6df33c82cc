"""The callback protocol: small objects with optional hooks, fired by trainloop's functions.

It is part of the core (the record holds the bound hooks, `Hooks`); `trainloop.callbacks`
re-exports `Callback` beside the shipped callbacks, which build only on the public API and on
`trainloop.extension`.

Every hook is optional. trainloop looks once, when a callback is attached, at which hooks a
callback's class overrides, and only those are called afterwards: a run with no callbacks pays
nothing on its hot path.

| hook             | fired by        | when                                                     | returns                     |
| ---------------- | --------------- | -------------------------------------------------------- | --------------------------- |
| `on_prepare`     | `tl.prepare`    | after the objects are prepared and registered; for a     | a new state, or None        |
|                  | `tl.attach`     | callback attached after `prepare`, at once, in `attach`  |                             |
| `on_backward`    | `tl.backward`   | before `loss.backward()`, every micro-step               | the loss to backpropagate   |
| `on_before_step` | `tl.step`       | at a window's end, after gradients are normalised        | a new state, or None        |
| `on_step`        | `tl.step`       | after the optimizer and scheduler stepped                | a new state, or None        |
| `on_log`         | `tl.log`        | every `log_every` steps, main process only, plain floats | None                        |
| `on_log_hparams` | `tl.log_hparams`| main process only, the hyper-parameters given            | None                        |
| `on_finish`      | `tl.finish`     | once, at the end of the run                              | None                        |

Hooks fire in the order the callbacks were given. A hook that changes the run returns a new
state (`state.evolve(...)`); returning None means "unchanged". Hooks never move the counters
(`step`, `micro_step`): only the core functions do.

Which optimizers: in `on_before_step` and `on_step`, `state.stepping` holds the optimizers that
this `tl.step` call steps (a GAN steps its generator and discriminator by separate calls), and
a hook acts on those only: `LossScale` unscales and checks their gradients, `ClipGradNorm` clips
them; another optimizer's pending gradients are left alone. An `on_before_step` hook may narrow
`stepping` (`state.evolve(stepping=...)`: `LossScale` drops an optimizer that overflowed), never
widen it; `skip_step=True` skips the whole call. Outside `tl.step`, `stepping` is `()`.

A callback with persistent state (a loss scale, a tracker's run id) implements `state_dict` and
`load_state_dict`; checkpoints save and restore it under the callback's `key`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch

    from trainloop.state import RunState

HOOKS = ("on_prepare", "on_backward", "on_before_step", "on_step", "on_log", "on_log_hparams", "on_finish")


class Callback:
    """Base class of trainloop callbacks. Override only the hooks you need."""

    @property
    def key(self) -> str:
        """The name this callback's `state_dict` is saved under in checkpoints.

        Defaults to the class name; two callbacks of one class with persistent state in one run
        must override it to differ.
        """
        return type(self).__name__

    def on_prepare(self, state: RunState) -> RunState | None:
        """After `prepare` registered its objects (restore a checkpoint, read the loader length).

        Fired by every `prepare` call, and by `attach` for a callback attached after `prepare`.
        """

    def on_backward(self, state: RunState, loss: torch.Tensor) -> torch.Tensor:
        """Before `loss.backward()`; returns the loss to backpropagate (e.g. scaled)."""
        return loss

    def on_before_step(self, state: RunState) -> RunState | None:
        """At a window's end, gradients synced and normalised, before `optimizer.step()`.

        `state.stepping` holds the optimizers being stepped. Set `skip_step=True` on the returned
        state to skip their steps and their schedulers', or narrow `stepping` to skip some.
        """

    def on_step(self, state: RunState) -> RunState | None:
        """After an optimizer step really happened and `state.step` advanced."""

    def on_log(self, state: RunState, metrics: dict[str, float]) -> None:
        """Every `log_every` steps on the main process, with the cross-rank means as floats."""

    def on_log_hparams(self, state: RunState, hparams: dict[str, Any]) -> None:
        """On the main process, at each `tl.log_hparams`: a checked mapping of names to plain values
        (numbers, strings, bools, None, lists of them, or nested mappings of them)."""

    def on_finish(self, state: RunState) -> None:
        """Once at the end of the run (close files, final checkpoint)."""

    def state_dict(self) -> dict[str, Any]:
        """Persistent state saved in checkpoints. Default: nothing."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def overridden_hooks(callback: Callback) -> tuple[str, ...]:
    """The hook names whose implementation `callback`'s class overrides."""
    cls = type(callback)
    return tuple(name for name in HOOKS if getattr(cls, name, None) is not getattr(Callback, name))


@attrs.frozen
class Hooks:
    """The bound hook methods of the attached callbacks, by hook, in callback order.

    Derived from the callbacks once when they are attached, so that firing the hooks of a run
    with no callbacks is a loop over an empty tuple.
    """

    on_prepare: tuple[Callable, ...] = ()
    on_backward: tuple[Callable, ...] = ()
    on_before_step: tuple[Callable, ...] = ()
    on_step: tuple[Callable, ...] = ()
    on_log: tuple[Callable, ...] = ()
    on_log_hparams: tuple[Callable, ...] = ()
    on_finish: tuple[Callable, ...] = ()

    @classmethod
    def of(cls, callbacks: tuple[Callback, ...]) -> Hooks:
        found: dict[str, list[Callable]] = {name: [] for name in HOOKS}
        for callback in callbacks:
            for name in overridden_hooks(callback):
                found[name].append(getattr(callback, name))
        return cls(**{name: tuple(methods) for name, methods in found.items()})

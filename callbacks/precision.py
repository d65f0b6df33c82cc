"""Callbacks on gradients: dynamic fp16 loss scaling and gradient-norm clipping.

Both act in `on_before_step`, where `tl.step` hands them the gradients of the window that just
closed: synced across ranks and normalised by the window's size. So, in this order:

1. `LossScale` unscales them in place (once) and checks them for inf/nan, per optimizer; it
   takes an optimizer that overflowed out of `state.stepping` (all of them: `skip_step`).
2. `ClipGradNorm` measures the total norm of these true gradients and clips them (not on a
   skipped step).
3. `tl.step` steps the optimizers and schedulers that were not skipped.

Both act on exactly the optimizers of the `tl.step` call (`state.stepping`): with a GAN's
generator and discriminator stepped by separate calls, the other one's pending gradients are
left alone.

`LossScale` must come before `ClipGradNorm` (clipping scaled gradients would clip at
`max_norm * scale`): `init(precision="fp16")` puts a `LossScale` first when none is given, and
`prepare` raises if a `ClipGradNorm` precedes a `LossScale`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trainloop.extension import collective_device
from trainloop.hooks import Callback


def _stepping(state) -> tuple:
    """The optimizers the `tl.step` call in progress steps (every prepared one outside it)."""
    return state.stepping or state.optimizers


def _parameters(optimizers) -> list[torch.Tensor]:
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2's) local shard, which shares its storage; any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


class LossScale(Callback):
    """Dynamic loss scaling for fp16, with `torch.amp.GradScaler`'s semantics and kernels.

    - `on_backward`: the loss is multiplied by `scale` (a float32 tensor, as GradScaler's).
    - At the window's end the gradients of the optimizers being stepped (`state.stepping`) are
      unscaled in place, once, by the float32 reciprocal of the scale computed in float64, and
      checked for inf/nan per optimizer (`torch._amp_foreach_non_finite_check_and_unscale_`, per
      device and dtype; on FSDP2, each rank's shards). One all-reduce (max) of the per-optimizer
      "found inf" flags makes every rank take the same decisions.
    - As `GradScaler.step` does, an optimizer whose gradients overflowed is not stepped (nor its
      scheduler); the others of the same `tl.step` call are. When all of them overflowed, the
      whole step is skipped and `state.step` does not advance.
    - The scale is updated as `GradScaler.update()` is, once per iteration, with the overflows of
      every optimizer stepped in it: multiplied by `backoff_factor` if any overflowed, else by
      `growth_factor` after `growth_interval` clean iterations in a row (`torch._amp_update_scale_`:
      a scale that would become infinite does not grow). An iteration ends at the `tl.step` call
      by which every prepared optimizer has been stepped since the last update: at every call
      for one optimizer, or for several stepped by one call; after the discriminator's and then
      the generator's call of a GAN stepped separately, the loop GradScaler's documentation
      shows (one `scaler.update()` after both `scaler.step`s). An optimizer stepped a second
      time before every other one was (a WGAN critic's extra steps) ends the iteration there:
      its gradients are unscaled by the scale they were made with, then the update of the
      iteration that ended is applied (GradScaler itself refuses a second `step` without an
      `update`: a raw loop calls `update()` in between, one micro-step earlier).

    The scale, the count of clean iterations, `skipped_steps` (the `tl.step` calls in which an
    optimizer was skipped) and an unfinished iteration's overflow are saved in checkpoints.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(
                "LossScale needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                f"growth_interval >= 1 (got {init_scale}, {growth_factor}, {backoff_factor}, {growth_interval})"
            )
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self._scale = torch.full((), float(init_scale), dtype=torch.float32)
        self._growth_tracker = torch.zeros((), dtype=torch.int32)  # clean iterations in a row
        self.skipped_steps = 0
        # The iteration in progress: the indices (in state.optimizers) of the optimizers stepped
        # since the last update, and whether any of them overflowed.
        self._stepped_since_update: set[int] = set()
        self._iteration_found_inf = False

    @property
    def scale(self) -> float:
        """The current loss scale (reading it syncs with the device)."""
        return float(self._scale)

    def on_prepare(self, state):
        self._scale = self._scale.to(state.device)
        self._growth_tracker = self._growth_tracker.to(state.device)

    def on_backward(self, state, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale.to(loss.device)

    def on_before_step(self, state):
        stepping = _stepping(state)
        indices = {_index_of(opt, state.optimizers) for opt in stepping}
        found_inf = torch.stack([self._unscale_and_check(_parameters((opt,))) for opt in stepping])
        if state.world_size > 1:
            # Replicated (DDP) gradients already agree, but sharded (FSDP2) ones, and parameters
            # outside the data-parallel wrapper, do not: decide together or the replicas diverge.
            flags = found_inf.to(collective_device(state))
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            found_inf = flags
        overflowed = [bool(flag) for flag in found_inf.tolist()]  # the host must know what to step
        if indices & self._stepped_since_update:
            self._update_scale()  # an optimizer came round again: the last iteration ended
        self._stepped_since_update |= indices
        self._iteration_found_inf = self._iteration_found_inf or any(overflowed)
        if len(self._stepped_since_update) >= len(state.optimizers):
            self._update_scale()
        if not any(overflowed):
            return None
        self.skipped_steps += 1
        if all(overflowed):
            return state.evolve(skip_step=True)
        return state.evolve(stepping=tuple(opt for opt, bad in zip(stepping, overflowed) if not bad))

    def _update_scale(self) -> None:
        found_inf = torch.full((), float(self._iteration_found_inf), device=self._scale.device)
        torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf,
                                 self.growth_factor, self.backoff_factor, self.growth_interval)
        self._stepped_since_update = set()
        self._iteration_found_inf = False

    def _unscale_and_check(self, parameters: list[torch.Tensor]) -> torch.Tensor:
        """Unscale the gradients in place; return 1.0 if any is inf or nan, else 0.0 (a tensor)."""
        inv_scale = self._scale.double().reciprocal().float()
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for parameter in parameters:
            grad = parameter.grad
            if grad is None:
                continue
            grad = _local(grad)
            if grad.is_sparse:
                grad = grad._values()  # as GradScaler does; only fp16 sparse grads need coalescing
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        found_inf = torch.zeros((), device=self._scale.device)
        with torch.no_grad():
            for (device, _), grads in groups.items():
                found_here = torch.zeros((), device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_here, inv_scale.to(device))
                found_inf += found_here.to(found_inf.device)
        return found_inf

    def state_dict(self) -> dict[str, Any]:
        record = {"scale": self._scale.item(), "growth_tracker": int(self._growth_tracker.item()),
                  "skipped_steps": self.skipped_steps}
        if self._stepped_since_update:  # a checkpoint between a GAN's two tl.step calls
            record["iteration"] = {"stepped": sorted(self._stepped_since_update),
                                   "found_inf": self._iteration_found_inf}
        return record

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A float32 scale survives the trip through a Python float exactly.
        self._scale.fill_(state_dict["scale"])
        self._growth_tracker.fill_(state_dict["growth_tracker"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        iteration = state_dict.get("iteration", {"stepped": [], "found_inf": False})
        self._stepped_since_update = {int(index) for index in iteration["stepped"]}
        self._iteration_found_inf = bool(iteration["found_inf"])

    def __repr__(self) -> str:
        return f"LossScale(scale={self.scale})"


def _index_of(optimizer, optimizers: tuple) -> int:
    for index, candidate in enumerate(optimizers):
        if candidate is optimizer:
            return index
    raise ValueError(f"this {type(optimizer).__name__} was not prepared: pass it to tl.prepare first")


class ClipGradNorm(Callback):
    """Clip the total gradient norm of the parameters of the optimizers being stepped.

    Those are `state.stepping`: the optimizers of the `tl.step` call, less any that `LossScale`
    skipped for an overflow (every prepared optimizer when the hook runs outside `tl.step`).

    Runs at each window's end, on the true gradients: after `LossScale` unscaled them and
    `tl.step` normalised them by the window's size, so the result equals a plain loop's
    `clip_grad_norm_` after `scaler.unscale_(optimizer)`. Works on plain, DDP and FSDP2
    (DTensor) parameters: on FSDP2 the norm is the total over every rank's shards.

    `last_norm` is the pre-clip total norm of the last window (a tensor on the device: log it
    with `tl.log(state, grad_norm=clip.last_norm)` without a host sync); None until the first
    window closes. On a step that `LossScale` skipped it is inf or nan and nothing is clipped.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        if not max_norm > 0:
            raise ValueError(f"ClipGradNorm needs max_norm > 0 (got {max_norm})")
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)
        self.last_norm: torch.Tensor | None = None

    def on_prepare(self, state):
        callbacks = list(state.callbacks)
        if any(isinstance(c, LossScale) for c in callbacks[callbacks.index(self):]):
            raise ValueError(
                "ClipGradNorm comes before LossScale in the callbacks, so it would clip scaled "
                "gradients: put LossScale first (init(precision='fp16') does when you leave it out)"
            )

    def on_before_step(self, state):
        parameters = _parameters(_stepping(state))
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return None
        total = state.strategy.grad_norm(grads, self.norm_type)  # over every rank's shards
        self.last_norm = total
        if not state.skip_step:
            state.strategy.clip_grads_(grads, self.max_norm, total)
        return None

    def __repr__(self) -> str:
        return f"ClipGradNorm(max_norm={self.max_norm}, norm_type={self.norm_type})"

"""Callbacks on gradients: dynamic fp16 loss scaling and gradient-norm clipping.

Both act in `on_before_step`, where `tl.step` hands them the gradients of the window that just
closed: synced across ranks and normalised by the window's size. So, in this order:

1. `LossScale` unscales them in place (once) and checks them for inf/nan; on overflow it marks
   the step skipped.
2. `ClipGradNorm` measures the total norm of these true gradients and clips them (not on a
   skipped step).
3. `tl.step` steps the optimizers and schedulers, unless the step was skipped.

`LossScale` must come before `ClipGradNorm` (clipping scaled gradients would clip at
`max_norm * scale`): `init(precision="fp16")` puts a `LossScale` first when none is given, and
`prepare` raises if a `ClipGradNorm` precedes a `LossScale`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trainloop.callbacks.base import Callback
from trainloop.collectives import collective_device


def _parameters(state) -> list[torch.Tensor]:
    return [p for opt in state.optimizers for group in opt.param_groups for p in group["params"]]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2's) local shard, which shares its storage; any other tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


class LossScale(Callback):
    """Dynamic loss scaling for fp16, with `torch.amp.GradScaler`'s semantics and kernels.

    - `on_backward`: the loss is multiplied by `scale` (a float32 tensor, as GradScaler's).
    - At the window's end the gradients are unscaled in place, once, by the float32 reciprocal
      of the scale computed in float64, and checked for inf/nan
      (`torch._amp_foreach_non_finite_check_and_unscale_`, per device and dtype; on FSDP2, each
      rank's shards). One all-reduce (max) of the "found inf" flag makes every rank take the
      same decision.
    - On overflow the optimizer step *and* the scheduler step are skipped and the scale is
      multiplied by `backoff_factor`; after `growth_interval` clean steps in a row it is
      multiplied by `growth_factor` (`torch._amp_update_scale_`: a scale that would become
      infinite does not grow).

    The scale, the count of clean steps and `skipped_steps` are saved in checkpoints.

    One difference from GradScaler: with several optimizers stepped by one `tl.step` (a GAN's),
    an overflow in any of them skips all of them (GradScaler skips each optimizer separately).
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
        self._growth_tracker = torch.zeros((), dtype=torch.int32)  # clean steps in a row
        self.skipped_steps = 0

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
        found_inf = self._unscale_and_check(_parameters(state))
        if state.world_size > 1:
            # Replicated (DDP) gradients already agree, but sharded (FSDP2) ones, and parameters
            # outside the data-parallel wrapper, do not: decide together or the replicas diverge.
            flag = found_inf.to(collective_device(state))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            found_inf = flag.to(self._scale.device)
        torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf,
                                 self.growth_factor, self.backoff_factor, self.growth_interval)
        if found_inf.item():  # the host must know whether to step: GradScaler syncs here too
            self.skipped_steps += 1
            return state.evolve(skip_step=True)
        return None

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
        return {"scale": self._scale.item(), "growth_tracker": int(self._growth_tracker.item()),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A float32 scale survives the trip through a Python float exactly.
        self._scale.fill_(state_dict["scale"])
        self._growth_tracker.fill_(state_dict["growth_tracker"])
        self.skipped_steps = int(state_dict["skipped_steps"])

    def __repr__(self) -> str:
        return f"LossScale(scale={self.scale})"


class ClipGradNorm(Callback):
    """Clip the total gradient norm of the prepared optimizers' parameters to `max_norm`.

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
        parameters = _parameters(state)
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

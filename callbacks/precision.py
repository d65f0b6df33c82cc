"""Callbacks on gradients: dynamic fp16 loss scaling and gradient-norm clipping.

Both act in `on_before_step`, where `tl.step` hands them gradients that are already synced
across ranks and normalised by the accumulation window: clipping sees true gradients.
Order matters: `LossScale` must come before `ClipGradNorm` (unscale, then clip);
`init(precision="fp16")` puts a `LossScale` first when none is given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trainloop.callbacks.base import Callback


def _gradients(state) -> list[torch.Tensor]:
    return [p.grad for opt in state.optimizers for group in opt.param_groups
            for p in group["params"] if p.grad is not None]


def _parameters(state) -> list[torch.nn.Parameter]:
    return [p for opt in state.optimizers for group in opt.param_groups for p in group["params"]]


class LossScale(Callback):
    """Dynamic loss scaling for fp16, with `torch.amp.GradScaler`'s semantics and kernels.

    The loss is multiplied by `scale` before backward. At the window's end the gradients are
    unscaled in place once and checked for inf/nan (one all-reduce across ranks, so every rank
    takes the same decision); on overflow the optimizer *and* scheduler steps are skipped and the
    scale is multiplied by `backoff_factor`; after `growth_interval` clean steps in a row it is
    multiplied by `growth_factor`. The scale is saved in checkpoints.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(
                "LossScale needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                f"growth_interval >= 1 (got {init_scale}, {growth_factor}, {backoff_factor}, {growth_interval})"
            )
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self._scale = torch.tensor(float(init_scale))
        self._growth_tracker = torch.tensor(0, dtype=torch.int32)
        self.skipped_steps = 0

    @property
    def scale(self) -> float:
        return float(self._scale)

    def on_prepare(self, state):
        self._scale = self._scale.to(state.device)
        self._growth_tracker = self._growth_tracker.to(state.device)

    def on_backward(self, state, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale.to(loss.device)

    def on_before_step(self, state):
        grads = _gradients(state)
        found_inf = torch.zeros(1, device=self._scale.device)
        inv_scale = self._scale.double().reciprocal().float()
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for grad in grads:
            by_device.setdefault(grad.device, []).append(grad)
        for device, group in by_device.items():
            found_here = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_here, inv_scale.to(device))
            found_inf += found_here.to(found_inf.device)
        if state.world_size > 1:
            reduce_on = found_inf.cpu() if state.topology.backend == "gloo" else found_inf
            dist.all_reduce(reduce_on, op=dist.ReduceOp.MAX)
            found_inf = reduce_on.to(found_inf.device)
        torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf,
                                 self.growth_factor, self.backoff_factor, self.growth_interval)
        if found_inf.item():
            self.skipped_steps += 1
            return state.evolve(skip_step=True)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale.item(), "growth_tracker": int(self._growth_tracker.item()),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._scale.fill_(state_dict["scale"])
        self._growth_tracker.fill_(state_dict["growth_tracker"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def __repr__(self) -> str:
        return f"LossScale(scale={self.scale})"


class ClipGradNorm(Callback):
    """Clip the total gradient norm to `max_norm` before each optimizer step.

    Works on plain, DDP and FSDP2 (DTensor) parameters: the norm is the total over all shards.
    The pre-clip total norm of the last step is `last_norm` (a tensor: log it with
    `tl.log(state, grad_norm=clip.last_norm)` without a host sync). Steps that an earlier hook
    decided to skip (an fp16 overflow) are not clipped.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        if not max_norm > 0:
            raise ValueError(f"ClipGradNorm needs max_norm > 0 (got {max_norm})")
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)
        self.last_norm: torch.Tensor | None = None

    def on_before_step(self, state):
        if state.skip_step:
            return None
        self.last_norm = torch.nn.utils.clip_grad_norm_(_parameters(state), self.max_norm, self.norm_type)
        return None

    def __repr__(self) -> str:
        return f"ClipGradNorm(max_norm={self.max_norm}, norm_type={self.norm_type})"

"""`Throughput`: samples/s, tokens/s, TFLOP/s, MFU and peak memory, reported through `tl.log`.

The values join the run's own metrics: they are reduced across ranks and reach every tracker at
the same reports as the loss, one value per report, measured over the steps since the previous
one (the step that measures the FLOPs, the first, is not timed).

How the values reach the trackers: a hook returns a state, so `on_step` returns the state with
the measurements added to `tl.log`'s buffer, without reporting right then. Reporting from inside
`tl.step` (calling `tl.log` there) would flush the buffer before the loop's own
`tl.log(state, loss=...)` of that step, and shift every loss the user logs into the next report.

MFU is model FLOPs utilisation: the FLOPs the model's forward and backward compute (as counted by
`torch.utils.flop_counter.FlopCounterMode`, or as given) per second, over the device's dense bf16
peak. The table below knows common data-centre accelerators; for any other device (the CPU among
them) MFU is reported only when `peak_flops=` is given. A device the table does not know is never
given another device's peak: that is how a wrong MFU gets reported as a right one.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import torch

from trainloop.extension import add_to_report, report_due, unwrap, wrapper_layers
from trainloop.hooks import Callback

if TYPE_CHECKING:
    from trainloop import RunState

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, per device as torch lists it, from the
# vendors' data sheets. Matched as substrings of the device name, first match wins: the more
# specific names come first ("H100 NVL" before "H100", "GB200" before "B200", "H200" before "H20").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("MI325X", 1307e12),
    ("MI300X", 1307e12),
    ("MI250X", 191.5e12),  # per GCD: torch sees each of the package's two dies as a device
)


def peak_bf16_flops(device: torch.device | str) -> float | None:
    """The dense bf16 peak FLOP/s of `device` from `PEAK_BF16_FLOPS`; None when it is not listed."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    backend = getattr(torch, device.type, None)
    get_name = getattr(backend, "get_device_name", None)
    if get_name is None:
        return None
    return peak_bf16_flops_of(get_name(device.index if device.index is not None else 0))


def peak_bf16_flops_of(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the device named `device_name` ("NVIDIA H100 PCIe"), or None."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


class Throughput(Callback):
    """Report how fast the run goes, at every `tl.log` report (every `log_every` steps).

    Metrics (names as the trackers show them):

    - `throughput/samples_per_sec`, `throughput/tokens_per_sec`: the whole job's, all ranks.
    - `throughput/tflops_per_sec`: per device (the mean over the ranks).
    - `throughput/mfu`: per device, a fraction of the peak (see the module doc).
    - `memory/max_allocated_gb`: the accelerator memory torch allocated at its peak so far, per
      device (the mean over the ranks); not reported on the CPU.

    Args:
        batch_size: samples per micro-batch on each process; default: the batch size of the first
            prepared loader. Samples per second are not reported when neither is known.
        tokens: where token counts come from: "num_items" (default) counts the `num_items` given
            to `tl.backward` as tokens, the token-weighted loss of a language model; an int is
            a fixed number of tokens per sample; None reports no tokens.
        flops_per_step: FLOPs of one optimizer step on one process (forward and backward over
            its micro-batches). Default: counted once with `FlopCounterMode`, from the first
            forward of a prepared model to the end of the first optimizer step, and taken as the
            same for every step (fixed shapes). That step runs slower while it is counted. When
            nothing could be counted (0 FLOPs), and under `torch.compile` (whose compiled backward
            the counter does not see: it would count the forward alone), TFLOP/s and MFU are not
            reported rather than reported wrong: give `flops_per_step` then.
        peak_flops: the device's peak FLOP/s for MFU; default: `PEAK_BF16_FLOPS`.

    Timing waits for the device (`torch.accelerator.synchronize`) at report steps only. One
    optimizer step per iteration is assumed: every `tl.step` call that ends a window counts as
    a step's work (a GAN's two calls per iteration would count its samples twice).
    """

    def __init__(self, *, batch_size: int | None = None, tokens: str | int | None = "num_items",
                 flops_per_step: float | None = None, peak_flops: float | None = None):
        for name, value in (("batch_size", batch_size), ("flops_per_step", flops_per_step),
                            ("peak_flops", peak_flops)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"Throughput: {name} must be a positive number or None (got {value!r})")
        if not (tokens is None or tokens == "num_items" or
                (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0)):
            raise ValueError(f"Throughput: tokens must be 'num_items', a positive int or None (got {tokens!r})")
        self.batch_size, self.tokens = batch_size, tokens
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self._set_up = False
        self._hooks: list[Any] = []
        self._counter = None  # the FlopCounterMode while it counts the first step
        self._since: float | None = None  # start of the current measurement
        self._windows = self._samples = 0
        self._tokens: list[Any] = []
        self._reported_window = -1

    def on_prepare(self, state: RunState) -> None:
        self._set_up_once(state)

    def _set_up_once(self, state: RunState) -> None:
        if self._set_up or not state.models:
            return
        self._set_up = True
        if self.batch_size is None and state.loaders:
            self.batch_size = state.loaders[0].batch_size
        if self.peak_flops is None:
            self.peak_flops = peak_bf16_flops(state.device)
        if self.flops_per_step is None and _compiled(state):
            warnings.warn("Throughput: FLOPs cannot be counted under torch.compile (FlopCounterMode does "
                          "not see the compiled backward); TFLOP/s and MFU are not reported unless "
                          "flops_per_step= is given", stacklevel=2)
        elif self.flops_per_step is None:
            # On the user's own module: it runs whichever wrapper the forward goes through.
            self._hooks = [unwrap(model).register_forward_pre_hook(self._start_counting)
                           for model in state.models]

    def _start_counting(self, module: Any, args: Any) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self._remove_hooks()
        self._counter = FlopCounterMode(display=False)
        self._counter.__enter__()  # left in on_before_step, after the first window's backward

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _stop_counting(self) -> None:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        self.flops_per_step = float(counter.get_total_flops()) or None

    def on_before_step(self, state: RunState) -> None:
        if not self._set_up:  # attached after prepare: measure from the next step on
            self._set_up_once(state)
            return
        if self._counter is not None:
            self._stop_counting()
        if self._since is None:
            return  # before the clock starts: the first step is not timed
        self._windows += 1
        if self.batch_size is not None:
            self._samples += state.window_micro_steps * self.batch_size
        if self.tokens == "num_items" and state.window_items is not None:
            self._tokens.append(state.window_items)

    def on_step(self, state: RunState) -> RunState | None:
        if self._since is None:
            self._restart_clock(state)
            return None
        window = state.step // state.config.log_every
        # The steps at which `tl.log` reports, once per report.
        if not report_due(state) or window == self._reported_window:
            return None
        self._reported_window = window
        metrics = self._measure(state)
        self._restart_clock(state)
        return add_to_report(state, metrics)  # in the report that the loop's next `tl.log` makes

    def _restart_clock(self, state: RunState) -> None:
        _synchronize(state.device)
        self._since = time.perf_counter()
        self._windows = self._samples = 0
        self._tokens = []

    def _measure(self, state: RunState) -> dict[str, float]:
        _synchronize(state.device)
        assert self._since is not None, "measured before the clock started"
        elapsed = time.perf_counter() - self._since
        world = state.world_size  # reported means over ranks: a rank's rate x world_size sums them
        metrics: dict[str, float] = {}
        if self.batch_size is not None:
            metrics["throughput/samples_per_sec"] = self._samples / elapsed * world
        tokens = None
        if self.tokens == "num_items" and self._tokens:
            tokens = float(sum(float(t) for t in self._tokens))
        elif isinstance(self.tokens, int) and self.batch_size is not None:
            tokens = float(self._samples * self.tokens)
        if tokens is not None:
            metrics["throughput/tokens_per_sec"] = tokens / elapsed * world
        if self.flops_per_step is not None:
            flops_per_sec = self.flops_per_step * self._windows / elapsed
            metrics["throughput/tflops_per_sec"] = flops_per_sec / 1e12
            if self.peak_flops is not None:
                metrics["throughput/mfu"] = flops_per_sec / self.peak_flops
        peak_memory = getattr(torch.accelerator, "max_memory_allocated", None)  # not in every torch trainloop supports
        if state.device.type != "cpu" and peak_memory is not None:
            metrics["memory/max_allocated_gb"] = peak_memory(state.device) / 2**30
        return metrics

    def on_finish(self, state: RunState) -> None:
        self._remove_hooks()
        if self._counter is not None:  # the run ended before its first optimizer step
            self._stop_counting()

    def __repr__(self) -> str:
        return (f"Throughput(batch_size={self.batch_size}, tokens={self.tokens!r}, "
                f"flops_per_step={self.flops_per_step}, peak_flops={self.peak_flops})")


def _compiled(state: RunState) -> bool:
    return bool(state.config.compile) or any(
        hasattr(layer, "_orig_mod") for model in state.models for layer in wrapper_layers(model))


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)

"""`Throughput`: samples/s, tokens/s, TFLOP/s, MFU and peak memory, reported through `tl.log`.

The values join the run's own metrics: they are reduced across ranks and reach every tracker at
the same reports as the loss, one value per report, measured over the steps since the previous
one (the step that measures the FLOPs, the first, is not timed).

How the values reach the trackers: a hook returns a state, so `on_step` returns the state with
the measurements added to `tl.log`'s buffer, without reporting right then. Reporting from inside
`tl.step` (calling `tl.log` there) would flush the buffer before the loop's own
`tl.log(state, loss=...)` of that step, and shift every loss the user logs into the next report.

Rates are the job's: this rank's samples and tokens per second times the number of
data-parallel replicas (the ranks of one tensor-parallel group share their batches, so counting
every rank would count each sample `tp` times).

MFU is model FLOPs utilisation, counted as torchtitan and the PaLM paper (appendix B) count it:
a transformer's forward and backward cost `6 N + 12 L H Q T` FLOPs per token (N parameters
without the embedding tables, L layers, H heads, Q the head size, T the sequence length), with
no recompute (activation checkpointing's second forward is not useful work) and at the model's
unsharded size. A replica's FLOP/s (its tokens/s times FLOPs per token) are shared by its
devices (`world_size / data-parallel size`): the per-device FLOP/s over the device's dense bf16
peak is MFU (`model_flops_per_token`). Without a sequence length or `flops_per_token`, FLOPs are
counted with `torch.utils.flop_counter.FlopCounterMode`; that count is model FLOPs only without
activation checkpointing and tensor parallelism (it sees the recompute, and DTensor matmuls at
their whole size), so there it is reported as `throughput/hardware_tflops_per_sec` without MFU.

The table below knows common data-centre accelerators; for any other device (the CPU among
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


def model_flops_per_token(model: torch.nn.Module, seq_len: int, *, layers: int | None = None,
                          heads: int | None = None, head_dim: int | None = None) -> float:
    """Training FLOPs per token of a transformer, `6 N + 12 L H Q T` (PaLM, appendix B; torchtitan).

    `N`: the model's parameters at their unsharded size, without those only an `nn.Embedding`
    holds (a lookup multiplies nothing; a tied output head still counts: it is a matmul).
    `L`, `H`, `Q` (layers, heads, head size): given, or read from a Hugging Face model's config
    (`num_hidden_layers` / `n_layer`, `num_attention_heads` / `n_head`, `head_dim` or hidden size
    over heads). `T`: `seq_len`. 6 N: 2 FLOPs per parameter and token forward, 4 backward; 12 L H
    Q T: the attention scores and their weighted sum, 2 matmuls of 2 H Q T FLOPs forward, times 3.

    Raises ValueError when L, H or Q is neither given nor in the model's config.
    """
    config = getattr(model, "config", None)

    def from_config(*names: str) -> int | None:
        return next((int(v) for n in names if isinstance(v := getattr(config, n, None), int)), None)

    layers = layers or from_config("num_hidden_layers", "n_layer")
    heads = heads or from_config("num_attention_heads", "n_head")
    if head_dim is None and heads:
        hidden = from_config("hidden_size", "n_embd")
        head_dim = from_config("head_dim") or (hidden // heads if hidden else None)
    if not (layers and heads and head_dim):
        raise ValueError(
            f"model_flops_per_token: {type(model).__name__} has no Hugging Face config naming its "
            "layers, heads and head size: pass layers=, heads= and head_dim=, or give "
            "Throughput(flops_per_token=...)")
    embedding_only = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                      for p in m.parameters(recurse=False)}
    used_elsewhere = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Embedding)
                      for p in m.parameters(recurse=False)}
    counted = {id(p): p.numel() for p in model.parameters()  # a DTensor's numel is its whole size
               if id(p) not in embedding_only or id(p) in used_elsewhere}
    return 6.0 * sum(counted.values()) + 12.0 * layers * heads * head_dim * seq_len


class Throughput(Callback):
    """Report how fast the run goes, at every `tl.log` report (every `log_every` steps).

    Metrics (names as the trackers show them):

    - `throughput/samples_per_sec`, `throughput/tokens_per_sec`: the whole job's, summed over
      the data-parallel replicas (not over the ranks of a tensor-parallel group).
    - `throughput/step_time_sec`: seconds per optimizer step.
    - `throughput/tflops_per_sec`: model FLOP/s per device (see the module doc).
    - `throughput/mfu`: per device, a fraction of the peak (see the module doc).
    - `throughput/hardware_tflops_per_sec`: instead of the two above, counted FLOP/s per device
      when they are not model FLOPs (activation checkpointing or tensor parallelism, see above).
    - `memory/max_allocated_gb`: the accelerator memory torch allocated at its peak so far, per
      device (the mean over the ranks); not reported on the CPU.

    Args:
        batch_size: samples per micro-batch on each process; default: the batch size of the first
            prepared loader. Samples per second are not reported when neither is known.
        tokens: where token counts come from: "num_items" (default) counts the `num_items` given
            to `tl.backward` as tokens, the token-weighted loss of a language model; an int is
            a fixed number of tokens per sample; None reports no tokens.
        seq_len: tokens per sequence: model FLOPs per token are then `model_flops_per_token`
            of the model (a Hugging Face config gives its layers and heads). Default: `tokens`
            when it is an int, for a model with such a config.
        flops_per_token: model FLOPs per token (forward and backward, no recompute, unsharded),
            for a model without such a config: `model_flops_per_token(model, T, layers=...)`.
        flops_per_step: FLOPs of one optimizer step on one process (forward and backward over
            its micro-batches), when no FLOPs per token are known. Default: counted once with `FlopCounterMode`, from the first
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
                 seq_len: int | None = None, flops_per_token: float | None = None,
                 flops_per_step: float | None = None, peak_flops: float | None = None):
        for name, value in (("batch_size", batch_size), ("flops_per_step", flops_per_step),
                            ("peak_flops", peak_flops), ("seq_len", seq_len), ("flops_per_token", flops_per_token)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"Throughput: {name} must be a positive number or None (got {value!r})")
        if not (tokens is None or tokens == "num_items" or
                (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0)):
            raise ValueError(f"Throughput: tokens must be 'num_items', a positive int or None (got {tokens!r})")
        self.batch_size, self.tokens = batch_size, tokens
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.seq_len, self.flops_per_token = seq_len, flops_per_token
        self.model_flops = True  # False: flops_per_step counts the recompute or whole DTensor matmuls
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
        self._set_up_flops_per_token(state)
        if self.flops_per_token is not None or self.flops_per_step is not None:
            return
        self.model_flops = state.config.activation_checkpointing == "none" and state.config.tp == 1
        if _compiled(state):
            warnings.warn("Throughput: FLOPs cannot be counted under torch.compile (FlopCounterMode does "
                          "not see the compiled backward); TFLOP/s and MFU are not reported unless "
                          "flops_per_step= is given", stacklevel=2)
        else:
            # On the user's own module: it runs whichever wrapper the forward goes through.
            self._hooks = [unwrap(model).register_forward_pre_hook(self._start_counting)
                           for model in state.models]

    def _set_up_flops_per_token(self, state: RunState) -> None:
        if self.flops_per_token is not None:
            return
        seq_len = self.seq_len if self.seq_len is not None else (
            self.tokens if isinstance(self.tokens, int) and not isinstance(self.tokens, bool) else None)
        if seq_len is None:
            return
        try:
            self.flops_per_token = model_flops_per_token(unwrap(state.models[0]), seq_len)
        except ValueError:
            if self.seq_len is not None:  # asked for explicitly: say what is missing
                raise

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
        # Reported values are means over the ranks. A rank's rate x the number of data-parallel
        # replicas is the job's: the ranks of one tensor-parallel group count the same samples.
        replicas = state.strategy.data_parallel()[1]
        devices_per_replica = state.world_size // replicas
        metrics: dict[str, float] = {}
        if self._windows:
            metrics["throughput/step_time_sec"] = elapsed / self._windows
        if self.batch_size is not None:
            metrics["throughput/samples_per_sec"] = self._samples / elapsed * replicas
        tokens = None
        if self.tokens == "num_items" and self._tokens:
            tokens = float(sum(float(t) for t in self._tokens))
        elif isinstance(self.tokens, int) and self.batch_size is not None:
            tokens = float(self._samples * self.tokens)
        if tokens is not None:
            metrics["throughput/tokens_per_sec"] = tokens / elapsed * replicas
        flops_per_sec = None
        if self.flops_per_token is not None and tokens is not None:
            # The replica's tokens (this rank's) at model FLOPs, shared by the replica's devices.
            flops_per_sec = self.flops_per_token * tokens / elapsed / devices_per_replica
        elif self.flops_per_step is not None:
            flops_per_sec = self.flops_per_step * self._windows / elapsed
        if flops_per_sec is not None and not self.model_flops:
            # Counted at DTensors' whole size: each of a tensor-parallel group's devices did 1/tp.
            metrics["throughput/hardware_tflops_per_sec"] = flops_per_sec / devices_per_replica / 1e12
        elif flops_per_sec is not None:
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
        return (f"Throughput(batch_size={self.batch_size}, tokens={self.tokens!r}, seq_len={self.seq_len}, "
                f"flops_per_token={self.flops_per_token}, flops_per_step={self.flops_per_step}, "
                f"peak_flops={self.peak_flops})")


def _compiled(state: RunState) -> bool:
    return bool(state.config.compile) or any(
        hasattr(layer, "_orig_mod") for model in state.models for layer in wrapper_layers(model))


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)

"""Mixed precision: trainloop's policies against the raw PyTorch loops they replace.

    python benchmarks/precision.py            # CPU table (~1 minute on 2 cores), GPU table if CUDA is there
    python benchmarks/precision.py --quick    # a smoke run: tiny numbers, the same code paths

CPU (always): `precision="bf16"` against a hand-written `torch.autocast(dtype=torch.bfloat16)`
loop, and `precision="fp16"` against `torch.autocast(dtype=torch.float16)` + `torch.amp.GradScaler`
with the same settings. One MLP, the same weights and batches for every variant; each variant
does forward, `F.cross_entropy`, backward and an AdamW step per batch. In the raw loops the loss
is computed inside the autocast region, as PyTorch documents; in trainloop's it is computed on
the prepared model's fp32 outputs. Variants run interleaved in rounds (the order rotates), after
a warm-up; the table shows each variant's median time per step and the median over rounds of its
ratio to its raw loop within the same round (which cancels the machine's drift). Target: <= 1.05x.

GPU (only when CUDA is available): a small decoder-only transformer (nn.Linear projections, so
that fp8 can convert them), tokens per second for the raw bf16 autocast loop, `precision="bf16"`,
a raw torchao float8 loop (`convert_to_float8_training`, bf16 autocast, `torch.compile`) and
`precision="fp8", compile=True`. fp8 needs compute capability >= 8.9 and torchao; without them
the fp8 rows are skipped with the reason. Timings are printed, never asserted: the exit code is 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import os
import statistics
import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import trainloop as tl

# `common` sits next to this file: put its directory on sys.path, however this file was loaded.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    Loop,
    S,
    classification_batches,
    interleaved_rounds,
    quick_note,
    ratio_summary,
    target_line,
    time_per_step,
)

STEP_TARGET = 1.05


# -- measuring (shared by both sections) ---------------------------------------------------------


def measure(loops: dict[str, Loop], batches: list, rounds: int, warmup: int,
            synchronize: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per step of each loop in each round; rounds interleave the loops in a rotating order.
    `synchronize` (the GPU's) runs after the warm-up and inside every timed span."""
    return interleaved_rounds(loops, batches, rounds, warmup, partial(time_per_step, unit=S, synchronize=synchronize),
                              after_warmup=synchronize)


def median_ratio(values: list[float], baseline: list[float]) -> float:
    """The median over rounds of value / baseline, paired within each round."""
    return ratio_summary(values, baseline)[1]


# -- CPU: autocast bf16 and fp16 -----------------------------------------------------------------

IN_FEATURES, HIDDEN, CLASSES, BATCH_SIZE = 128, 256, 10, 64
SCALER = {"init_scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}


def build_mlp() -> nn.Module:
    torch.manual_seed(0)  # every variant starts from the same weights
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                         nn.Linear(HIDDEN, CLASSES))


def raw_autocast(dtype: torch.dtype) -> Loop:
    """PyTorch's documented loop; with GradScaler for fp16."""
    model = build_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", **SCALER) if dtype == torch.float16 else None

    def run(batches):
        for x, y in batches:
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)

    return run


def trainloop_precision(precision: str) -> Loop:
    """The loop as users write it; `precision` alone switches the numerics."""
    from trainloop.callbacks import LossScale

    callbacks = [LossScale(**SCALER)] if precision == "fp16" else []
    state = tl.init(precision=precision, device="cpu", callbacks=callbacks)
    model = build_mlp()
    state, model, optimizer = tl.prepare(state, model, torch.optim.AdamW(model.parameters(), lr=1e-3))

    def run(batches):
        nonlocal state
        for x, y in batches:
            state = tl.backward(state, F.cross_entropy(model(x), y))
            state = tl.step(state, optimizer)

    return run


def cpu_section(steps: int, rounds: int, warmup: int) -> dict[str, float]:
    """Print the CPU table; return trainloop's ratio to raw per policy."""
    print(f"CPU, {torch.get_num_threads()} thread(s): MLP {IN_FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES}, "
          f"batch {BATCH_SIZE}, AdamW; {steps} steps x {rounds} interleaved rounds, medians")
    print(f"{'policy':<8}{'variant':<34}{'us/step':>10}{'time vs raw':>13}")
    batches = classification_batches(steps, features=IN_FEATURES, classes=CLASSES, batch_size=BATCH_SIZE)
    ratios = {}
    for precision, dtype, raw_name in (("bf16", torch.bfloat16, "raw autocast bf16"),
                                       ("fp16", torch.float16, "raw autocast fp16 + GradScaler")):
        loops = {raw_name: raw_autocast(dtype), f'trainloop precision="{precision}"': trainloop_precision(precision)}
        times = measure(loops, batches, rounds, warmup)
        for name, values in times.items():
            ratio = median_ratio(values, times[raw_name])
            print(f"{precision:<8}{name:<34}{statistics.median(values) * 1e6:>10.1f}{ratio:>12.3f}x")
            if name != raw_name:
                ratios[precision] = ratio
    return ratios


# -- GPU: bf16 and fp8 on a small transformer ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
    """The transformer and its batches. Every dimension a multiple of 16: float8-eligible."""

    vocab: int = 8192
    width: int = 1024
    heads: int = 16
    layers: int = 4
    sequence: int = 512
    batch: int = 8


class Block(nn.Module):
    """Pre-norm causal attention and MLP; every projection an nn.Linear, so that fp8 converts it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).transpose(1, 3).unbind(2)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attention.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, sizes: Sizes):
        super().__init__()
        self.embed = nn.Embedding(sizes.vocab, sizes.width)
        self.blocks = nn.ModuleList(Block(sizes.width, sizes.heads) for _ in range(sizes.layers))
        self.norm = nn.LayerNorm(sizes.width)
        self.head = nn.Linear(sizes.width, sizes.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_transformer(device: torch.device, sizes: Sizes) -> nn.Module:
    torch.manual_seed(0)
    return TinyTransformer(sizes).to(device)


def token_batches(count: int, device: torch.device, sizes: Sizes) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randint(0, sizes.vocab, (sizes.batch, sizes.sequence + 1), generator=generator).to(device)
            for _ in range(count)]


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """trainloop's rule, written out for the raw loop."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def raw_transformer(device: torch.device, sizes: Sizes, fp8: bool) -> Loop:
    """The raw loop: bf16 autocast; for fp8 also torchao's conversion and torch.compile."""
    model = build_transformer(device, sizes)
    if fp8:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig(emulate=device.type == "cpu")
        model = torch.compile(convert_to_float8_training(model, module_filter_fn=float8_eligible, config=config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run(batches):
        for tokens in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = next_token_loss(model(tokens[:, :-1]), tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def trainloop_transformer(device: torch.device, sizes: Sizes, fp8: bool) -> Loop:
    state = tl.init(precision="fp8" if fp8 else "bf16", compile=fp8, device=str(device))
    model = build_transformer(device, sizes)
    state, model, optimizer = tl.prepare(state, model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def run(batches):
        nonlocal state
        for tokens in batches:
            state = tl.backward(state, next_token_loss(model(tokens[:, :-1]), tokens))
            state = tl.step(state, optimizer)

    return run


def fp8_unavailable(device: torch.device) -> str | None:
    """Why fp8 cannot run on `device`, or None."""
    if importlib.util.find_spec("torchao") is None:
        return 'torchao is not installed (pip install "trainloop-torch[fp8]")'
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor} (< 8.9)"
    return None


def transformer_section(device: torch.device, sizes: Sizes, steps: int, rounds: int, warmup: int) -> None:
    """Print the transformer table: tokens/s, and the ratio to the raw loop of the same precision."""
    batches = token_batches(steps, device, sizes)
    tokens_per_step = sizes.batch * sizes.sequence
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{name}: transformer {sizes}, AdamW; {steps} steps x {rounds} interleaved rounds, medians")
    print(f"{'variant':<42}{'tokens/s':>12}{'time vs raw':>13}")
    reason = fp8_unavailable(device)
    for label, fp8 in (("bf16", False), ("fp8", True)):
        if fp8 and reason is not None:
            print(f"  fp8 skipped: {reason}")
            continue
        raw_name = f"raw {label} (torchao + compile)" if fp8 else f"raw {label} (autocast)"
        ours_name = f'trainloop precision="{label}"' + (", compile=True" if fp8 else "")
        loops = {raw_name: raw_transformer(device, sizes, fp8), ours_name: trainloop_transformer(device, sizes, fp8)}
        times = measure(loops, batches, rounds, warmup, synchronize)
        for variant, values in times.items():
            ratio = median_ratio(values, times[raw_name])
            print(f"{variant:<42}{tokens_per_step / statistics.median(values):>12.0f}{ratio:>12.3f}x")
        del loops, times  # free one pair's weights and optimizer state before the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# -- the report ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (medians over these)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for the CPU table (1: steadier timings on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="tiny numbers for a smoke run")
    args = parser.parse_args()
    if min(args.steps, args.rounds, args.threads) < 1:
        parser.error("--steps, --rounds and --threads must be >= 1")
    if args.quick:
        args.steps, args.rounds = 3, 2
    warmup = 1 if args.quick else 3
    torch.set_num_threads(args.threads)
    print(f"trainloop {tl.__version__} precision benchmark, torch {torch.__version__}\n")
    ratios = cpu_section(args.steps, args.rounds, warmup)
    print("\ntargets:")
    for precision, ratio in ratios.items():
        print(target_line(precision, ratio, STEP_TARGET))
    if args.quick:
        print(quick_note())
    if torch.cuda.is_available():
        transformer_section(torch.device("cuda"), Sizes(), args.steps, args.rounds, warmup)
    else:
        print("\nGPU table skipped: CUDA is not available")
    return 0


if __name__ == "__main__":
    sys.exit(main())

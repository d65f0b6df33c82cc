"""A Llama-3-style model trained the torchtitan way: trainloop beside a raw-PyTorch loop, one run.

    python benchmarks/llama.py                 # CUDA: ~1B parameters, bf16 (fp8 too on H100/H200)
    python benchmarks/llama.py --quick         # a tiny model, a few steps (the CPU smoke test)
    python -m trainloop.spawn -n 8 benchmarks/llama.py    # FSDP2 over 8 GPUs

The recipe, the same for both loops: FSDP2 (`fully_shard` per block, then the root), bf16
mixed precision (bf16 compute, fp32 reduction), activation checkpointing of every block,
`torch.compile` per block (the checkpoint-wrapped block, torchtitan's order), AdamW, gradient
clipping at 1.0. On CUDA with float8 tensor cores a third and fourth row add torchao's fp8.

Reported per loop: tokens/s for the job, MFU (model FLOPs, `6 N + 12 L H Q T` per token, no
recompute, over the device's dense bf16 peak: `trainloop.callbacks.throughput`), and the peak
accelerator memory torch allocated. On the CPU, MFU and memory are "n/a" (no peak FLOP/s to
divide by, no allocator statistics) and compile uses the `aot_eager` backend (inductor's C++
compile would take minutes); the run is a smoke test of the code paths, not a measurement.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import trainloop as tl
from trainloop.callbacks import ClipGradNorm
from trainloop.callbacks.throughput import model_flops_per_token, peak_bf16_flops

SIZES = {
    # Llama-3.2-1B's shape: 16 layers, width 2048, 32 heads of 64, 8 key-value heads.
    "1b": {"width": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "hidden": 8192, "vocab": 128256},
    "tiny": {"width": 64, "layers": 2, "heads": 4, "kv_heads": 2, "hidden": 128, "vocab": 256},
}


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int):
        super().__init__()
        self.head_dim, self.repeats = width // heads, heads // kv_heads
        self.wq = nn.Linear(width, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.wq(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.repeats > 1)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, hidden: int):
        super().__init__()
        self.attention_norm = RMSNorm(width)
        self.attention = Attention(width, heads, kv_heads)
        self.ffn_norm = RMSNorm(width)
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    """torchtitan's layout: tok_embeddings, layers (an nn.ModuleDict), norm, output."""

    def __init__(self, width: int, layers: int, heads: int, kv_heads: int, hidden: int, vocab: int,
                 seq_len: int):
        super().__init__()
        self.shape = {"layers": layers, "heads": heads, "head_dim": width // heads}
        self.tok_embeddings = nn.Embedding(vocab, width)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(width, heads, kv_heads, hidden) for i in range(layers)})
        self.norm = RMSNorm(width)
        self.output = nn.Linear(width, vocab, bias=False)
        head_dim = width // heads
        frequencies = 1.0 / (500000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(seq_len).float(), frequencies).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            x = layer(x, self.cos, self.sin)
        return self.output(self.norm(x))


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def batches(count: int, batch: int, seq_len: int, vocab: int, device: torch.device, rank: int) -> list:
    generator = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, vocab, (count, batch, seq_len + 1), generator=generator)
    return [(t[:, :-1].to(device), t[:, 1:].to(device)) for t in tokens]


# -- the two loops -------------------------------------------------------------------------------


def compile_options(device: torch.device) -> dict:
    return {} if device.type == "cuda" else {"backend": "aot_eager"}


def trainloop_run(args, size: dict, fp8: bool) -> dict:
    state = tl.init(strategy="fsdp", precision="fp8" if fp8 else "bf16", activation_checkpointing="blocks",
                    compile="blocks", compile_options=compile_options(tl_device()) or None)
    model = Llama(**size, seq_len=args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=state.device.type == "cuda")
    state, model, optimizer = tl.prepare(state, model, optimizer)
    state = tl.attach(state, ClipGradNorm(1.0))

    def step(inputs, targets):
        nonlocal state
        with tl.accumulate(state, model):
            state = tl.backward(state, loss_of(model(inputs), targets))
        state = tl.step(state, optimizer)

    result = measure(step, args, size, state.device, state.rank, state.world_size, tl.unwrap(model))
    tl.finish(state)
    return result


def raw_run(args, size: dict, fp8: bool) -> dict:
    """The same recipe written against torch directly (what a torchtitan user writes)."""
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = tl_device()
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(dist.get_default_backend_for_device(device))
        else:
            dist.init_process_group(dist.get_default_backend_for_device(device), store=dist.HashStore(),
                                    rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = Llama(**size, seq_len=args.seq_len).to(device)
    if fp8:
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn != "output")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for name, block in list(model.layers.items()):
        wrapped = checkpoint_wrapper(block)
        wrapped.compile(**compile_options(device))
        model.layers[name] = wrapped
        fully_shard(wrapped, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")

    def step(inputs, targets):
        loss_of(model(inputs), targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, args, size, device, dist.get_rank(), dist.get_world_size(), model)


def tl_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def measure(step, args, size: dict, device: torch.device, rank: int, world_size: int, model: nn.Module) -> dict:
    data = batches(args.warmup + args.steps, args.batch, args.seq_len, size["vocab"], device, rank)
    for inputs, targets in data[:args.warmup]:  # compiles, and the allocator's first growth
        step(inputs, targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for inputs, targets in data[args.warmup:]:
        step(inputs, targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_sec = args.batch * args.seq_len * world_size / seconds  # every rank a data-parallel replica
    flops = model_flops_per_token(model, args.seq_len, **model.shape)
    peak = peak_bf16_flops(device)
    return {
        "tokens_per_sec": tokens_per_sec,
        "mfu": flops * tokens_per_sec / world_size / peak if peak else None,
        "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "seconds_per_step": seconds,
    }


def fp8_available() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return False
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps (smoke test)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    args.size = args.size or ("1b" if cuda else "tiny")
    args.batch = args.batch or (4 if cuda else 2)
    args.seq_len = args.seq_len or (2048 if cuda else 32)
    args.steps = args.steps or (20 if cuda else 2)
    args.warmup = args.warmup or (5 if cuda else 1)
    size = SIZES[args.size]
    # trainloop first: its run joins the process group (one process: a group of one) that the raw
    # loop then uses as it is.
    rows = [("trainloop", trainloop_run, False), ("raw PyTorch", raw_run, False)]
    if fp8_available():
        rows += [("trainloop fp8", trainloop_run, True), ("raw PyTorch fp8", raw_run, True)]
    results = {label: run(args, size, fp8) for label, run, fp8 in rows}
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    parameters = sum(p.numel() for p in Llama(**size, seq_len=1).parameters())
    print(f"Llama-3-style {args.size} ({parameters / 1e6:.1f}M parameters), batch {args.batch} x {args.seq_len} "
          f"tokens per rank, {args.steps} timed steps after {args.warmup}; {device}")
    print("FSDP2 + bf16 + activation checkpointing + per-block compile (fp8: torchao float8 linears)")
    print(f"{'loop':<18} {'tokens/s':>12} {'vs raw':>7} {'MFU':>7} {'peak GiB':>9}")
    for label, found in results.items():
        raw = results["raw PyTorch fp8" if "fp8" in label else "raw PyTorch"]
        mfu = f"{found['mfu']:.1%}" if found["mfu"] is not None else "n/a"
        memory = f"{found['memory_gib']:.2f}" if found["memory_gib"] is not None else "n/a"
        ratio = found["tokens_per_sec"] / raw["tokens_per_sec"]
        print(f"{label:<18} {found['tokens_per_sec']:>12.1f} {ratio:>6.2f}x {mfu:>7} {memory:>9}")
    if not math.isfinite(sum(r["tokens_per_sec"] for r in results.values())):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Activation checkpointing: none, every block, op-level selective, every second block; CPU.

    python benchmarks/activation_checkpointing.py           # width 256, 4 layers, 8 x 256 tokens
    python benchmarks/activation_checkpointing.py --quick   # a tiny model (the smoke test)

One process, the Llama-3-style model of benchmarks/llama.py, AdamW, fp32, no compile. Each
variant runs in a fresh process (so one variant's freed memory is not another's), with glibc's
malloc told to map every allocation of 64 KiB or more on its own (returned on free: see
benchmarks/memory.py). "peak MiB" is the growth of the resident set (VmHWM, reset first) over one
forward and backward after the warm-up steps: what the step's activations, gradients and
recomputation cost; "ms/step" the median of the timed steps. Figures are printed, never asserted.

- `activation_checkpointing="blocks"`: every block keeps only its input; backward recomputes it.
- `"selective"`: op-level (torchtitan's default): the outputs of the matmuls (all but every
  second `mm`) and of attention are kept, the element-wise ops recomputed.
- `"blocks"` with `activation_checkpointing_every=2`: blocks 0, 2, ... checkpointed, the others not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "none": {"activation_checkpointing": "none"},
    "every block": {"activation_checkpointing": "blocks"},
    "selective (op)": {"activation_checkpointing": "selective"},
    "every 2nd block": {"activation_checkpointing": "blocks", "activation_checkpointing_every": 2},
}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from llama import Llama, batches, loss_of
    from memory import PeakMemory

    import trainloop as tl

    state = tl.init(**VARIANTS[name])
    torch.manual_seed(0)
    model = Llama(width=args.width, layers=args.layers, heads=args.width // 32, kv_heads=args.width // 64,
                  hidden=4 * args.width, vocab=512, seq_len=args.seq_len)
    state, model, optimizer = tl.prepare(state, model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    data = batches(args.warmup + args.steps + 1, args.batch, args.seq_len, 512, state.device, 0)
    times = []
    for index, (inputs, targets) in enumerate(data[:-1]):
        start = time.perf_counter()
        with tl.accumulate(state, model):
            state = tl.backward(state, loss_of(model(inputs), targets))
        state = tl.step(state, optimizer)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    inputs, targets = data[-1]
    with PeakMemory() as peak, tl.accumulate(state, model):
        state = tl.backward(state, loss_of(model(inputs), targets))
    tl.finish(state)
    return {"ms_per_step": statistics.median(times) * 1e3, "peak_mib": peak.peak / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.width, args.layers, args.batch, args.seq_len, args.steps, args.warmup = 64, 2, 2, 32, 1, 1
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    passed = [f"--{key.replace('_', '-')}={getattr(args, key)}"
              for key in ("width", "layers", "batch", "seq_len", "steps", "warmup")]
    results = {}
    for name in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--variant", name, *passed], env=env,
                              capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"width {args.width}, {args.layers} layers, {args.batch} x {args.seq_len} tokens, fp32, CPU, one process")
    print(f"{'variant':<18} {'ms/step':>9} {'vs none':>8} {'peak MiB':>9} {'vs none':>8}")
    base = results["none"]
    for name, found in results.items():
        print(f"{name:<18} {found['ms_per_step']:>9.1f} {found['ms_per_step'] / base['ms_per_step']:>7.2f}x "
              f"{found['peak_mib']:>9.1f} {found['peak_mib'] / max(base['peak_mib'], 1e-9):>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train a byte-level GPT on the Python standard library's own source files (no download).

    python examples/stdlib_gpt.py --smoke                          # a minute or less on 2 CPU cores
    python examples/stdlib_gpt.py                                  # the real run (an accelerator helps)
    python -m trainloop.spawn -n 2 examples/stdlib_gpt.py --smoke  # the same script, two processes
    python -m trainloop.spawn -n 2 --strategy fsdp examples/stdlib_gpt.py --smoke

The data is every `.py` file under `sysconfig.get_paths()["stdlib"]`, in sorted order; a file is
held out when the CRC-32 of its path is a multiple of 10 (the same files on every run and rank;
another Python version has another standard library, so compare numbers within one version).
Each file is cut into windows of `--context + 1` bytes; a file's last window is shorter and its
missing targets are ignored, so micro-batches hold different numbers of real bytes. The loss is
the *sum* over real bytes with `num_items` = their count: the update is token-weighted exactly,
however the bytes fall across micro-batches and processes.

bf16 autocast by default (`--precision fp32` to turn it off); checkpoints every
`--checkpoint-every` steps into `--run-dir`, so a killed run (even `kill -9`) continues where it
stopped when started again; TensorBoard event files and a metrics file beside them. The last line
printed is the held-out loss in bits per byte (8.0 is a uniform guess over 256 byte values).
"""

import argparse
import importlib.util
import math
import os
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import trainloop as tl
from trainloop.callbacks import Checkpoint, JSONLines, Progress, TensorBoard, Throughput

IGNORE = -100  # the target of a position past the end of a file: not scored (cross_entropy's default ignore_index)

# -- data ------------------------------------------------------------------------------------


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): the standard library's .py files in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)

    def held_out(path: Path) -> bool:  # by the path's name, not by chance: the same on every machine
        return zlib.crc32(path.relative_to(root).as_posix().encode()) % 10 == 0

    return [p for p in files if not held_out(p)], [p for p in files if held_out(p)]


class ByteWindows(Dataset):
    """Windows of `context + 1` bytes of each file, stride `context`, never across two files.

    Item i: {"x": the window's first `context` bytes, "y": the next byte after each (IGNORE past
    the file's end), "index": i}. Files are read in order until `max_bytes` bytes are in.
    """

    def __init__(self, files: list[Path], context: int, max_bytes: int | None = None):
        chunks, starts, lengths, offset = [], [], [], 0
        for path in files:
            data = path.read_bytes()
            if max_bytes is not None:
                data = data[:max_bytes - offset]
            for start in range(0, len(data) - 1, context):  # a window needs 2 bytes: one input, one target
                starts.append(offset + start)
                lengths.append(min(context + 1, len(data) - start))
            chunks.append(data)
            offset += len(data)
            if max_bytes is not None and offset >= max_bytes:
                break
        self.data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        self.starts, self.lengths, self.context = starts, lengths, context

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.data[self.starts[i]:self.starts[i] + self.lengths[i]].long()
        x = torch.zeros(self.context, dtype=torch.long)
        y = torch.full((self.context,), IGNORE, dtype=torch.long)
        x[:len(window) - 1], y[:len(window) - 1] = window[:-1], window[1:]
        return {"x": x, "y": y, "index": torch.tensor(i)}


# -- the model: a small causal transformer in plain torch -------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, dim = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return h + self.mlp(self.norm2(h))


class ByteGPT(nn.Module):
    """Bytes in, next-byte logits out: embeddings, `layers` pre-norm blocks, a linear head."""

    def __init__(self, context: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.embed, self.position = nn.Embedding(256, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))  # FSDP shards each block
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-byte cross-entropies, number of real bytes) of a micro-batch."""
    logits = model(batch["x"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (batch["y"] != IGNORE).sum()


@torch.no_grad()
def held_out_bits_per_byte(state: tl.RunState, model: nn.Module, loader: tl.PreparedLoader) -> float:
    """The held-out loss in bits per byte, every byte counted once however many processes share it."""
    model.eval()
    windows = len(loader.dataset)
    loss_sums = torch.zeros(windows, dtype=torch.float64, device=state.device)
    byte_counts = torch.zeros(windows, dtype=torch.float64, device=state.device)
    for batch in loader:
        per_byte = F.cross_entropy(model(batch["x"]).transpose(1, 2), batch["y"], ignore_index=IGNORE,
                                   reduction="none")  # 0 at ignored positions
        # Each window is written into its own slot, not added: the loader repeats a few windows in
        # its last batch so that every process gets as many batches, and a repeat lands on its slot.
        loss_sums[batch["index"]] = per_byte.sum(dim=1).double()
        byte_counts[batch["index"]] = (batch["y"] != IGNORE).sum(dim=1).double()
    # A slot holds its window's numbers on the process(es) that scored it and 0 elsewhere: the
    # maximum over processes is each window's numbers, counted once.
    loss_sums, byte_counts = tl.reduce(state, (loss_sums, byte_counts), op="max")
    model.train()
    return (loss_sums.sum() / byte_counts.sum()).item() / math.log(2)


# -- the run ---------------------------------------------------------------------------------

FULL = {"steps": 3000, "batch_size": 16, "accumulate": 2, "lr": 1e-3, "context": 256, "dim": 256,
        "layers": 4, "heads": 4, "max_train_bytes": None, "eval_windows": 2048, "checkpoint_every": 250,
        "log_every": 50}
SMOKE = {"steps": 40, "batch_size": 8, "accumulate": 2, "lr": 3e-3, "context": 64, "dim": 64,
         "layers": 2, "heads": 4, "max_train_bytes": 400_000, "eval_windows": 128, "checkpoint_every": 10,
         "log_every": 5}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and run (CI, a first try)")
    parser.add_argument("--steps", type=int, help="optimizer steps (full: 3000, smoke: 40)")
    parser.add_argument("--batch-size", type=int, help="windows per micro-batch per process")
    parser.add_argument("--accumulate", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, help="peak AdamW learning rate")
    parser.add_argument("--context", type=int, help="bytes of context")
    parser.add_argument("--dim", type=int, help="model width")
    parser.add_argument("--layers", type=int, help="transformer blocks")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--max-train-bytes", type=int, help="read training files until this many bytes")
    parser.add_argument("--eval-windows", type=int, help="held-out windows scored at the end (0: all)")
    parser.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    parser.add_argument("--log-every", type=int, help="optimizer steps between metric reports")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 where it works")
    parser.add_argument("--strategy", choices=("auto", "ddp", "fsdp"), help="as spawn's --strategy")
    parser.add_argument("--run-dir", default="runs/stdlib_gpt", help="checkpoints, TensorBoard, metrics")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    args = parser.parse_args()
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def bf16_works() -> bool:
    # CPU autocast runs bf16; an old GPU (before Ampere) would emulate it slowly.
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    train_files, held_out_files = stdlib_files()
    train_set = ByteWindows(train_files, args.context, args.max_train_bytes)
    held_out_set = ByteWindows(held_out_files, args.context,
                               args.eval_windows * args.context if args.eval_windows else None)
    if args.eval_windows:
        held_out_set = Subset(held_out_set, range(min(args.eval_windows, len(held_out_set))))

    callbacks = [Progress(total=args.steps, show=("bits_per_byte",)), Throughput(),
                 JSONLines(os.path.join(args.run_dir, "metrics.jsonl")),
                 Checkpoint(os.path.join(args.run_dir, "checkpoints"), every=args.checkpoint_every, keep=2,
                            resume=not args.fresh)]
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(TensorBoard(os.path.join(args.run_dir, "tensorboard")))
    settings = {"strategy": args.strategy} if args.strategy else {}
    if "TRAINLOOP_PRECISION" not in os.environ:  # spawn --precision decides when it is given
        settings["precision"] = args.precision or ("bf16" if bf16_works() else "fp32")
    state = tl.init(accumulate=args.accumulate, seed=0, log_every=args.log_every, callbacks=callbacks,
                    **settings)

    model = ByteGPT(args.context, args.dim, args.layers, args.heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)  # linear warm-up, then a cosine down to a tenth of the peak
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))))
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    held_out_loader = DataLoader(held_out_set, batch_size=2 * args.batch_size)
    state, model, optimizer, train_loader, held_out_loader, scheduler = tl.prepare(
        state, model, optimizer, train_loader, held_out_loader, scheduler)
    if state.is_main:
        print(f"{len(train_set)} training windows from {len(train_files)} files, {len(held_out_set)} held-out "
              f"windows; {sum(p.numel() for p in tl.unwrap(model).parameters()):,} parameters; "
              f"{state.config.precision}, {state.world_size} process(es)", flush=True)
        if state.step:
            print(f"resumed from {callbacks[3].restored_from} at step {state.step}", flush=True)

    while state.step < args.steps:  # epochs, until the step budget is spent (the loader knows its place)
        for batch in train_loader:
            with tl.accumulate(state, model):
                loss, num_bytes = summed_loss(model, batch)
                state = tl.backward(state, loss, num_items=num_bytes)  # a sum over bytes, weighted by bytes
            state = tl.step(state, optimizer)
            state = tl.log(state, bits_per_byte=loss.detach() / num_bytes / math.log(2))
            if state.step >= args.steps:
                break

    bits = held_out_bits_per_byte(state, model, held_out_loader)
    tl.finish(state)
    if state.is_main:
        print(f"trained to step {state.step} in {time.perf_counter() - started:.1f} s")
        print(f"held-out bits per byte: {bits:.3f}")


if __name__ == "__main__":
    main()

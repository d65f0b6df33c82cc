"""Big-model inference: run a model on less memory than it needs.

A byte-level language model of about 150 MB is saved as a safetensors checkpoint in a temporary
directory, then run here under a deliberately small budget: 40 MiB of RAM, the rest streamed from
disk block by block. The script prints where each block went, how long loading and the forward
took, the peak memory, and checks the logits against the fully loaded model's.

    python examples/bigmodel_inference.py [--cpu-budget 40MiB] [--depth 6]

The input is real text that ships with Python: the first bytes of the standard library's own
`json/decoder.py`. The weights are random (seeded): this shows memory, not language.
"""

from __future__ import annotations

import argparse
import json.decoder
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from trainloop.bigmodel import device_map, dispatch, empty_weights


class Block(nn.Module):
    """A pre-norm MLP block with a residual: its forward needs all its weights at once."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 3 * width)
        self.down = nn.Linear(3 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class ByteLM(nn.Module):
    """Next-byte logits from bytes: embedding, blocks, and a head tied to the embedding."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        x = self.embed(data)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def write_checkpoint(directory: str, width: int, depth: int, data: torch.Tensor) -> None:
    """Save a seeded model and its logits on `data`. Runs in a child process, so that this one
    never holds the full model and its peak memory is the big-model inference's alone."""
    torch.manual_seed(0)
    model = ByteLM(width, depth).eval()
    save_model(model, f"{directory}/model.safetensors")  # the tied weight is stored once
    with torch.no_grad():
        save_file({"logits": model(data)}, f"{directory}/reference.safetensors")


def peak_rss() -> int:
    """This process's peak resident memory in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def print_placement(model: nn.Module, placement: dict[str, str]) -> int:
    """Print each entry's device and size (a tied weight counted where it first appears);
    return the largest entry's size in bytes."""
    seen: set[int] = set()
    largest = 0
    for name, device in placement.items():
        tensors = [t for t in model.get_submodule(name).state_dict(keep_vars=True).values() if id(t) not in seen]
        seen.update(map(id, tensors))
        size = sum(t.numel() * t.element_size() for t in tensors)
        largest = max(largest, size)
        tied = "" if tensors else "  (its weights are tied to an entry above)"
        print(f"  {name or '(model)':<12} {device:<5} {size / 2**20:6.1f} MiB{tied}")
    return largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-budget", default="40MiB", help="RAM for weights (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=6)
    args = parser.parse_args()
    text = Path(json.decoder.__file__).read_bytes()[:64]
    data = torch.tensor(list(text)).unsqueeze(0)

    with tempfile.TemporaryDirectory() as directory:
        writer = multiprocessing.get_context("spawn").Process(
            target=write_checkpoint, args=(directory, args.width, args.depth, data))
        writer.start()
        writer.join()
        checkpoint_mib = Path(directory, "model.safetensors").stat().st_size / 2**20

        with empty_weights():
            model = ByteLM(args.width, args.depth)
        # The baseline is taken after building on meta: that costs no memory for weights, but the
        # first meta initialisation in a process imports torch's decompositions (~70 MB, once).
        baseline = peak_rss()
        placement = device_map(model, max_memory={"cpu": args.cpu_budget, "disk": "1TB"}, no_split=[Block])
        print(f"checkpoint {checkpoint_mib:.0f} MiB, RAM budget for weights {args.cpu_budget}")
        largest = print_placement(model, placement)

        start = time.perf_counter()
        dispatch(model, directory, placement)
        loaded = time.perf_counter()
        with torch.no_grad():
            logits = model(data)
        ran = time.perf_counter()
        reference = load_file(f"{directory}/reference.safetensors")["logits"]

    print(f"dispatch {loaded - start:.2f} s, forward {ran - loaded:.2f} s")
    print(f"peak memory over the baseline: {(peak_rss() - baseline) / 2**20:.0f} MiB for a {checkpoint_mib:.0f} MiB "
          f"model (budget {args.cpu_budget}, plus one streamed block of {largest / 2**20:.0f} MiB, plus activations)")
    print(f"largest difference from the fully loaded model's logits: {(logits - reference).abs().max().item():.2e}")
    print(f"input: {text[:40]!r}... ({data.shape[1]} bytes)")


if __name__ == "__main__":
    main()

"""Big-model inference: what dispatch and offloading cost, next to plain torch, in one run.

Loading: `empty_weights()` + `dispatch` against the usual `Model()` + `torch.load(weights_only=True)`
+ `load_state_dict`, and against torch's own fast path (build on meta, `torch.load(mmap=True)`,
`load_state_dict(assign=True)`). Forward: the model in memory against the same model dispatched
all in RAM (the hooks' overhead) and with most blocks on disk (streamed each forward), from a warm
page cache and, where the OS lets us drop the file's pages, a cold one.

    python benchmarks/bigmodel.py [--width 1024] [--depth 8] [--repeats 9]

The variants of a table run round-robin (one of each per round), so that load from other
processes falls on all of them alike. Times are medians of the rounds; ratios are against the
first row of each table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from trainloop.bigmodel import device_map, dispatch, empty_weights


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 256)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        x = self.embed(data)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


Variant = tuple[str, Callable[[], object], Callable[[], None]]  # label, what to time, untimed set-up


def compare(title: str, variants: list[Variant], repeats: int) -> None:
    """Time the variants round-robin and print each one's median and its ratio to the first."""
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for (_label, run, before), samples in zip(variants, times):
            before()
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
    medians = [statistics.median(samples) for samples in times]
    print(f"\n{title}")
    for (label, _run, _before), seconds in zip(variants, medians):
        print(f"  {label:<62} {seconds * 1e3:9.1f} ms   x{seconds / medians[0]:6.2f}")


def nothing() -> None:
    pass


def drop_page_cache(path: Path) -> None:
    """Ask the OS to forget the file's cached pages, so the next read comes from the drive."""
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = torch.randint(0, 256, (4, 32))

    with tempfile.TemporaryDirectory() as directory:
        full = Model(args.width, args.depth).eval()
        safetensors_file, torch_file = Path(directory, "model.safetensors"), Path(directory, "model.pt")
        save_model(full, str(safetensors_file))
        torch.save(full.state_dict(), torch_file)
        os.sync()  # clean pages can be dropped from the cache; dirty ones cannot
        block = sum(p.numel() * p.element_size() for p in full.blocks[0].parameters())
        size_mib = safetensors_file.stat().st_size / 2**20

        def meta_model() -> Model:
            with empty_weights():
                return Model(args.width, args.depth)

        all_in_ram = {"": "cpu"}
        offloaded = device_map(meta_model(), max_memory={"cpu": block + 2**20, "disk": "1TB"}, no_split=[Block])
        on_disk = list(offloaded.values()).count("disk")
        print(f"model: {size_mib:.0f} MiB, {args.depth} blocks of {block / 2**20:.0f} MiB; offloaded map: "
              f"{len(offloaded) - on_disk} entries in RAM, {on_disk} on disk; "
              f"{args.repeats} repeats, {torch.get_num_threads()} threads")

        def torch_load() -> None:
            Model(args.width, args.depth).load_state_dict(torch.load(torch_file, weights_only=True))

        def torch_meta_assign() -> None:
            state_dict = torch.load(torch_file, weights_only=True, mmap=True)
            meta_model().load_state_dict(state_dict, assign=True)

        compare("load (model construction included)", [
            ("Model() + torch.load(weights_only=True) + load_state_dict", torch_load, nothing),
            ("meta Model + torch.load(mmap) + load_state_dict(assign), lazy", torch_meta_assign, nothing),
            ("empty_weights + dispatch, all in RAM",
             lambda: dispatch(meta_model(), safetensors_file, all_in_ram), nothing),
            (f"empty_weights + dispatch, {on_disk} entries on disk, lazy",
             lambda: dispatch(meta_model(), safetensors_file, offloaded), nothing),
        ], args.repeats)

        in_ram = dispatch(meta_model(), safetensors_file, all_in_ram)
        streamed = dispatch(meta_model(), safetensors_file, offloaded)
        variants = [
            ("in memory (plain nn.Module)", lambda: full(data), nothing),
            ("dispatched, all in RAM (the hooks' overhead)", lambda: in_ram(data), nothing),
            (f"dispatched, {on_disk} entries on disk, warm page cache", lambda: streamed(data), nothing),
        ]
        if hasattr(os, "posix_fadvise"):
            variants.append((f"dispatched, {on_disk} entries on disk, cold page cache", lambda: streamed(data),
                             lambda: drop_page_cache(safetensors_file)))
        with torch.no_grad():
            for _label, run, _before in variants:
                run()  # warm up: first-call allocations, kernel selection
            compare(f"forward, batch {tuple(data.shape)}", variants, args.repeats)


if __name__ == "__main__":
    main()

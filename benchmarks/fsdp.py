"""FSDP2 under trainloop against a hand-written `fully_shard` loop, on 2 processes (gloo, CPU).

    python benchmarks/fsdp.py            # the full run (~1 minute on 2 CPU cores)
    python benchmarks/fsdp.py --quick    # a smoke run: small numbers, same code paths

What is measured, and why it is fair:

- Step time. The same model (4 blocks of Linear 256-256 + Tanh in a ModuleList, a Linear head;
  batch 32 per rank, AdamW), sharded the same way by every variant, as torchtitan and trainloop's
  `fsdp_shard_ends` do: `fully_shard` on each block, on the head (a unit of its own, kept gathered
  after forward: backward needs it first), then on the root. The raw loop is torchtitan's: it turns the
  gradient sync off with `set_requires_gradient_sync(False)` off the window's last micro-step
  and scales each micro-batch loss by 1/k; trainloop's is the loop its docs show (`accumulate`,
  `backward`, `step`, which normalises the summed gradients once per window). Batches are
  tensors already in memory. The variants run inside one 2-rank job, interleaved in rounds
  whose order rotates, after a warm-up; a barrier, not timed, starts each segment on both ranks.
  ms/step is rank 0's median over rounds and the ratio the median of the per-round ratios (which
  cancels the machine's drift), with the lowest and highest of them as the spread; the same
  again for rank 0's main-thread CPU time, which a busy machine disturbs far less.
- The peers, where installed (the `bench` extra). Lightning Fabric runs FSDP2 on the CPU through
  its `ModelParallelStrategy` (the same `fully_shard` calls, in its `parallelize_fn`, over its
  `data_parallel` mesh of all the ranks: `data_parallel_size=2, tensor_parallel_size=1`, where its
  "auto" would make it a 1-rank mesh, no sharding at all) with its documented `no_backward_sync`
  accumulation; its `strategy="fsdp"` (FSDPStrategy) refuses the CPU, and the report quotes it.
  Accelerate is asked for FSDP2 as its docs set it up (`FullyShardedDataParallelPlugin(
  fsdp_version=2)`, `cpu=True`); where it does not shard (today it wraps the model in DDP on the
  CPU) it is left out, and the report says what it did instead. Neither runs HSDP here.
  Every variant's parameters are checked to be sharded over the mesh it claims, before timing.
- HSDP. The same pair again on a 2-D mesh of (replicate 2, shard 1), as HSDP across two
  machines of one rank each: `fully_shard(mesh=...)` by hand against `dp_replicate=2`.
- Memory. The bytes each rank holds for parameters, gradients and optimizer state after a
  backward, counted from the tensors themselves (under FSDP the local shards): trainloop's
  FSDP against trainloop's DDP for the same model and optimizer. On top of this FSDP gathers
  one block at a time during forward and backward (here 0.25 MiB), and DDP keeps gradient
  buckets (a further copy of the gradients); neither is counted. `--quick` shrinks the blocks
  to 32 features.

Target: trainloop's step time <= 1.02x the raw loop's. Timings are printed,
never asserted: the exit code is 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import trainloop as tl
from trainloop import spawn

# The workers re-import this file by path, with no guarantee that its directory is on their
# sys.path: put it there, so that `common` resolves in them as it does in the script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    MS,
    Loop,
    Spread,
    adamw,
    finish_all,
    interleaved_rounds,
    quick_note,
    ratio_cells,
    ratio_summary,
    round_up,
    target_line,
    wall_and_cpu_per_step,
)

DEPTH, OUT, BATCH_SIZE, NPROC = 4, 16, 32, 2
STEP_TARGET = 1.02
RAW, TRAINLOOP = "raw fully_shard", "trainloop fsdp"
RAW_HSDP, TRAINLOOP_HSDP = "raw HSDP 2x1", "trainloop HSDP 2x1"
FABRIC, ACCELERATE = "Fabric FSDP2", "Accelerate FSDP2"


class Skipped(Exception):
    """A peer that cannot do the same job here; the message says why, for the report's notes."""


class Net(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        torch.manual_seed(0)  # every variant starts from the same weights
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(DEPTH))
        self.head = nn.Linear(width, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_batches(count: int, width: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1 + rank)
    return [(torch.randn(BATCH_SIZE, width, generator=generator),
             torch.randn(BATCH_SIZE, OUT, generator=generator)) for _ in range(count)]


def mesh_shapes(model: nn.Module) -> set[tuple[int, ...]]:
    """The shapes of the meshes `model`'s parameters are sharded over (empty if none is a DTensor)."""
    return {tuple(p.device_mesh.shape) for p in tl.unwrap(model).parameters() if hasattr(p, "device_mesh")}


UNITS = ["", *(f"blocks.{i}" for i in range(DEPTH)), "head"]  # the modules every variant fully_shards


def units(model: nn.Module) -> list[str]:
    """The names of `model`'s modules that are FSDP units ("" for the root)."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in tl.unwrap(model).named_modules() if isinstance(module, FSDPModule)]


def check_sharded(name: str, model: nn.Module, shape: tuple[int, ...]) -> None:
    """Raise unless `model` is sharded in the units of UNITS and every parameter over a mesh of
    `shape`: a variant that shards otherwise (or not at all) would not do the same job as the others
    (one more unit is one more all-gather and reduce-scatter per step)."""
    found, sharded = mesh_shapes(model), units(model)
    if found != {shape} or sharded != UNITS:
        raise RuntimeError(f"{name}: units {sharded}, parameters sharded over meshes {sorted(found)}, not the "
                           f"units {UNITS} over {shape} of the other variants: its times would not compare")


# -- the variants ------------------------------------------------------------------------------


def raw_fully_shard(accumulate: int, width: int, hsdp: bool = False) -> Loop:
    """torchtitan's loop; `hsdp`: over a 2-D (replicate 2, shard 1) mesh, as HSDP across 2 machines."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = Net(width)
    mesh = init_device_mesh("cpu", (NPROC, 1) if hsdp else (NPROC,),
                            mesh_dim_names=("dp_replicate", "dp_shard") if hsdp else ("dp_shard",))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model.head, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    check_sharded(RAW_HSDP if hsdp else RAW, model, (NPROC, 1) if hsdp else (NPROC,))
    optimizer = adamw(model)
    micro_steps = 0

    def run(batches):
        nonlocal micro_steps
        for x, y in batches:
            micro_steps += 1
            at_window_end = micro_steps % accumulate == 0
            model.set_requires_gradient_sync(at_window_end)
            loss = F.mse_loss(model(x), y)
            (loss / accumulate if accumulate > 1 else loss).backward()
            if at_window_end:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return run


def trainloop_fsdp(accumulate: int, width: int, hsdp: bool = False) -> Loop:
    mesh = {"dp_replicate": NPROC, "dp_shard": 1} if hsdp else {}
    state = tl.init(strategy="fsdp", accumulate=accumulate, **mesh)
    model = Net(width)
    state, model, optimizer = tl.prepare(state, model, adamw(model))
    check_sharded(TRAINLOOP_HSDP if hsdp else TRAINLOOP, model, (NPROC, 1) if hsdp else (NPROC,))

    def run(batches):
        nonlocal state
        for x, y in batches:
            with tl.accumulate(state, model):
                state = tl.backward(state, F.mse_loss(model(x), y))
            state = tl.step(state, optimizer)

    run.finish = lambda: tl.finish(state)  # type: ignore[attr-defined]  (see common.finish_all)
    return run


def fabric_fsdp(accumulate: int, width: int) -> Loop:
    """Fabric's FSDP2 (ModelParallelStrategy, sharded as the raw loop is) and its documented loop."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    def parallelize(model: nn.Module, mesh) -> nn.Module:
        for block in model.blocks:
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(model.head, mesh=mesh["data_parallel"], reshard_after_forward=False)
        fully_shard(model, mesh=mesh["data_parallel"], reshard_after_forward=False)
        return model

    # Sizes given: "auto" puts the ranks of one machine on the tensor-parallel dimension, which
    # this model does not use, and leaves a data-parallel mesh of 1 rank (nothing sharded).
    strategy = ModelParallelStrategy(parallelize_fn=parallelize, data_parallel_size=NPROC, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cpu", devices=NPROC, strategy=strategy)
    fabric.launch()  # processes started outside: this only sets Fabric up in this one
    model = fabric.setup_module(Net(width))
    check_sharded(FABRIC, model.module, (NPROC,))
    optimizer = fabric.setup_optimizers(adamw(model))
    micro_steps = 0

    def run(batches):
        nonlocal micro_steps
        for x, y in batches:
            micro_steps += 1
            at_window_end = micro_steps % accumulate == 0
            with fabric.no_backward_sync(model, enabled=not at_window_end):
                loss = F.mse_loss(model(x), y)
                fabric.backward(loss / accumulate if accumulate > 1 else loss)
            if at_window_end:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return run


def fabric_fsdp_strategy_refusal() -> str:
    """What Fabric's own FSDP strategy (`strategy="fsdp"`) says on the CPU, for the notes."""
    from lightning.fabric import Fabric

    try:
        Fabric(accelerator="cpu", devices=NPROC, strategy="fsdp")
    except Exception as error:  # its refusal is what the note reports
        return f"Fabric's strategy='fsdp' (FSDPStrategy) refuses here: {error} (its FSDP2 row: ModelParallelStrategy)"
    return "Fabric's strategy='fsdp' (FSDPStrategy) accepted the CPU; its row here is ModelParallelStrategy's FSDP2"


def accelerate_fsdp(accumulate: int, width: int) -> Loop:
    """Accelerate's FSDP2 as its docs set it up, and its documented loop; Skipped where its
    `prepare` does not shard the model (on the CPU it wraps it in DDP instead)."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate, fsdp_plugin=plugin)
    model = Net(width)
    model, optimizer = accelerator.prepare(model, adamw(model))
    if mesh_shapes(model) != {(NPROC,)}:
        raise Skipped(f"Accelerate skipped: asked for FSDP2 (cpu=True, FullyShardedDataParallelPlugin(fsdp_version=2)), "
                      f"its prepare gave a {type(model).__name__} (distributed type "
                      f"{accelerator.distributed_type.value}) with no sharded parameter: not the same job")

    def run(batches):
        for x, y in batches:
            with accelerator.accumulate(model):
                accelerator.backward(F.mse_loss(model(x), y))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return run


def peers(accumulate: int, width: int) -> tuple[dict[str, Loop], list[str]]:
    """Fabric's and Accelerate's FSDP2 loops where installed and sharding; notes for the rest."""
    loops: dict[str, Loop] = {}
    notes = []
    if importlib.util.find_spec("lightning") is None:
        notes.append("Lightning Fabric skipped: lightning is not installed (pip install -e '.[bench]')")
    else:
        notes.append(fabric_fsdp_strategy_refusal())
        loops[FABRIC] = fabric_fsdp(accumulate, width)
    if importlib.util.find_spec("accelerate") is None:
        notes.append("Accelerate skipped: accelerate is not installed (pip install -e '.[bench]')")
    else:
        try:
            loops[ACCELERATE] = accelerate_fsdp(accumulate, width)
        except Skipped as skipped:
            notes.append(str(skipped))
    return loops, notes


# -- measuring (inside the 2-rank job) ---------------------------------------------------------


def measure(loops: dict[str, Loop], batches: list, rounds: int,
            warmup: int) -> dict[str, dict[str, list[float]]]:
    """{variant: {"wall": [ms/step per round], "cpu": [...]}}; rounds interleave the loops in a
    rotating order. The collector is frozen first (torch: ~100k objects)."""
    times = interleaved_rounds(loops, batches, rounds, warmup, partial(wall_and_cpu_per_step, unit=MS),
                               freeze_gc=True)
    return {name: {"wall": [wall for wall, _ in pairs], "cpu": [cpu for _, cpu in pairs]}
            for name, pairs in times.items()}


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (local shards under FSDP)."""
    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    def size(tensors) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors)

    parameters = list(tl.unwrap(model).parameters())
    state = [v for entry in optimizer.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    return {"parameters": size(parameters), "gradients": size(p.grad for p in parameters if p.grad is not None),
            "optimizer": size(state)}


def memory_after_backward(strategy: str, width: int) -> dict[str, int]:
    state = tl.init(strategy=strategy)
    model = Net(width)
    state, model, optimizer = tl.prepare(state, model, adamw(model))
    (x, y), = make_batches(1, width, state.rank)
    state = tl.step(tl.backward(state, F.mse_loss(model(x), y)), optimizer)  # creates AdamW's state
    state = tl.backward(state, F.mse_loss(model(x), y))
    return held_bytes(model, optimizer)


def benchmark(steps: int, rounds: int, warmup: int, width: int) -> dict:
    """Runs on every rank; rank 0's result is returned by spawn.run."""
    # Each rank's batches are its own shard already (seeded by rank), as that warning allows.
    warnings.filterwarnings("ignore", message=r"this run has \d+ processes but no prepared DataLoader")
    job = tl.init(strategy="fsdp")
    batches = make_batches(steps, width, job.rank)
    results: dict = {"times": {}, "hsdp_times": {}, "memory": {}, "notes": set()}
    for accumulate in (1, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer_loops, notes = peers(accumulate, width)
            results["notes"].update(notes)
            loops = {RAW: raw_fully_shard(accumulate, width), TRAINLOOP: trainloop_fsdp(accumulate, width),
                     **peer_loops}
            hsdp = {RAW_HSDP: raw_fully_shard(accumulate, width, hsdp=True),
                    TRAINLOOP_HSDP: trainloop_fsdp(accumulate, width, hsdp=True)}
        results["times"][accumulate] = measure(loops, batches, rounds, warmup)
        results["hsdp_times"][accumulate] = measure(hsdp, batches, rounds, warmup)
        finish_all(loops)
        finish_all(hsdp)
    for label, strategy in (("DDP", "ddp"), ("FSDP", "fsdp")):
        results["memory"][label] = memory_after_backward(strategy, width)
    tl.finish(job)
    return results


# -- the report --------------------------------------------------------------------------------


def print_times(times: dict[int, dict[str, dict[str, list[float]]]], raw: str,
                ours: str) -> dict[int, tuple[float, Spread, float]]:
    """One row per variant and accumulation; returns `ours`'s wall-clock ratio to `raw`, its
    spread and its CPU ratio, by accumulation."""
    ratios = {}
    for accumulate, by_variant in times.items():
        for name, measured in by_variant.items():
            wall, wall_ratio, wall_spread = ratio_summary(measured["wall"], by_variant[raw]["wall"])
            cpu, cpu_ratio, cpu_spread = ratio_summary(measured["cpu"], by_variant[raw]["cpu"])
            print(f"{accumulate:>10}  {name:<20}{ratio_cells(wall, wall_ratio, wall_spread, digits=2)}"
                  f"{ratio_cells(cpu, cpu_ratio, cpu_spread, width=13, digits=2)}")
            if name == ours:
                ratios[accumulate] = wall_ratio, wall_spread, cpu_ratio
    return ratios


def print_memory(memory: dict[str, dict[str, int]]) -> None:
    print(f"\nheld per rank after a backward ({NPROC} ranks), KiB:")
    print(f"  {'strategy':<10}{'parameters':>12}{'gradients':>11}{'optimizer':>11}{'total':>9}{'vs DDP':>9}")
    ddp_total = sum(memory["DDP"].values())
    for label, held in memory.items():
        total = sum(held.values())
        cells = "".join(f"{held[kind] / 1024:>{width}.1f}"
                        for kind, width in (("parameters", 12), ("gradients", 11), ("optimizer", 11)))
        print(f"  {label:<10}{cells}{total / 1024:>9.1f}{total / ddp_total:>8.3f}x")
    print(f"  ideal for FSDP: 1/{NPROC} = {1 / NPROC:.3f}x (uneven shards are padded)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="micro-steps per variant per round")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (medians over these)")
    parser.add_argument("--width", type=int, default=256, help="features of each block's Linear")
    parser.add_argument("--quick", action="store_true", help="tiny numbers for a smoke run")
    args = parser.parse_args()
    if min(args.steps, args.rounds, args.width) < 1:
        parser.error("--steps, --rounds and --width must be >= 1")
    if args.quick:
        args.steps, args.rounds, args.width = 4, 1, 32
    args.steps = round_up(args.steps, 4)  # whole windows of 4
    warmup = 1 if args.quick else 3

    print(f"trainloop {tl.__version__} FSDP2 step time and memory, torch {torch.__version__}, {NPROC} "
          f"processes (gloo, CPU): {DEPTH} blocks of Linear {args.width}-{args.width} + Tanh, batch {BATCH_SIZE} "
          f"per rank, AdamW; {args.steps} micro-steps x {args.rounds} interleaved rounds, medians")
    results = spawn.run(benchmark, args.steps, args.rounds, warmup, args.width, n=NPROC)
    print(f"{'accumulate':>10}  {'variant':<20}{'ms/step':>9}{'vs raw':>9}{'spread':>13}"
          f"{'cpu ms/step':>13}{'vs raw':>9}{'spread':>13}")
    ratios = print_times(results["times"], RAW, TRAINLOOP)
    hsdp_ratios = print_times(results["hsdp_times"], RAW_HSDP, TRAINLOOP_HSDP)
    print("  ms/step: rank 0's median wall-clock time per micro-step; vs raw: median of the per-round ratios "
          "to the raw loop on the same mesh; spread: the lowest and highest of them.\n"
          "  cpu ms/step: the same for rank 0's main-thread CPU time: the loop's own work, mostly without the "
          "waits for gloo\n  and for other processes, so it stays readable on a busy machine.")
    for note in sorted(results["notes"]):
        print(f"  note: {note}")
    print_memory(results["memory"])
    print("\ntarget:")
    for label, by_accumulate in (("per-step", ratios), ("HSDP per-step", hsdp_ratios)):
        for accumulate, (ratio, spread, cpu_ratio) in by_accumulate.items():
            print(target_line(f"{label}, accumulate {accumulate}", ratio, STEP_TARGET, spread=spread)
                  + f"; main-thread CPU {cpu_ratio:.3f}x")
    if args.quick:
        print(quick_note())
    return 0


if __name__ == "__main__":
    sys.exit(main())

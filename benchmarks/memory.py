"""Memory per rank: DDP, FSDP2, HSDP and FSDP2 + activation checkpointing; whole build vs meta-init.

    python benchmarks/memory.py            # the ~28M-parameter model (about 4 minutes on 2 CPU cores)
    python benchmarks/memory.py --quick    # a smoke run: a tiny model, same code paths

The model: `--depth` residual blocks (LayerNorm, Linear width -> 4 width, GELU, Linear back) in
an nn.ModuleList and a Linear head; width 512 and depth 13 give 27.6M parameters (105 MiB in
fp32). AdamW; one batch of `--batch` x `--sequence` tokens per rank. CPU, gloo.

Table 1, strategies (`--nproc` ranks, 4 by default; HSDP is dp_replicate=2 x dp_shard=nproc/2):
each job builds the model whole, prepares it, takes one optimizer step (creating AdamW's state)
and a second backward, then counts what this rank holds, from the tensors themselves (under
FSDP the local shards): parameters, gradients, optimizer state. "peak build" is the growth of
the process's resident memory while the model is built (whole) and prepared, "peak step" its
growth from there while it takes the step and the backward: gradients, optimizer state,
activations and FSDP's gathered blocks (see below for how).

Table 2, building (2 ranks, strategy="fsdp", the same model): built whole on every rank, or
under `tl.empty_weights()` (prepare materialises only this rank's shards), then
`tl.load_weights` from a safetensors file of another model's weights. "peak" covers build,
prepare and load. Each run's weights are compared with the file, bit for bit, afterwards.

Table 3, cold (2 ranks, FSDP2, meta-init + load_weights, as issue 20's held-out check measures
it): the job's first and only run, with glibc's default malloc, from the resident set right after
`tl.init`: the growth of VmHWM and of ru_maxrss (which counts everything since the process
started, so also library code paged in for the first time and lazily imported modules: nothing
is imported or warmed up before the baseline), each over this rank's shard bytes (target <= 1.3x).
`--linear --width 1536 --depth 12` is the issue's 28M-parameter model (plus the head).

How peak memory is measured (Linux): writing "5" to /proc/self/clear_refs resets the kernel's
high-water mark of the resident set (VmHWM) to the current resident set; "peak" is VmHWM at the
end of the phase minus the resident set at its start. torch's CPU allocator keeps no statistics,
so the process's own resident set is the honest measure: it counts every allocation, torch's or
not, that was touched. It also counts file-backed pages: the library code a kernel runs for the
first time, and the pages of a memory-mapped checkpoint that a load read, while the file is
open (the page cache's, reclaimable and shared between processes). So a sampling thread also
records the peak of the anonymous part alone (RssAnon, every 2 ms): "peak anon" is the memory
the process itself allocated (a spike shorter than 2 ms can escape it; "peak" never misses one).
Each job runs its measured work twice and reports the second run (see REHEARSAL_ENV; not with
`--quick`).

Rows whose wiring is not in this trainloop (HSDP, activation checkpointing, meta-init in
prepare) are skipped with a message saying what is missing. Figures are printed, never asserted:
the exit code is 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import trainloop as tl
from trainloop import spawn

# The workers re-import this file by path, with no guarantee that its directory is on their
# sys.path: put it there, so that `fsdp` (benchmarks/fsdp.py) resolves in them as in the script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fsdp import held_bytes

MIB = 2**20
# Each job runs its measured work twice and reports the second run: the first run of a process
# imports modules, starts threads and pages in the library code its kernels use (tens of MiB,
# and more for the code paths of big tensors than of small ones), which would otherwise count as
# the model's. glibc's malloc is told to serve every allocation of 64 KiB or more with its own
# mapping (returned on free), so that the first run leaves no freed heap for the second to reuse.
REHEARSAL_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
META_TARGET = 0.7  # from the issue: meta-init's peak <= 0.7x the whole build's, per rank
SHARD_TARGET = 1.3  # meta-init + load_weights: peak above the post-init baseline <= 1.3x the rank's shard bytes


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    """`depth` MLP blocks and a head; `linear=True`: `depth` plain width x width Linear blocks instead."""

    def __init__(self, width: int, depth: int, seed: int = 0, linear: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(nn.Linear(width, width) if linear else Block(width) for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# -- measuring -----------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (its values are in kB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakMemory:
    """The growth of this process's resident memory over a phase: total (VmHWM) and anonymous."""

    def __enter__(self) -> PeakMemory:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        self.start_rss, self.start_anon = _status("VmRSS"), _status("RssAnon")
        # ru_maxrss cannot be reset: how far the process's high-water mark already lies above now.
        self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start_rss
        self._peak_anon = self.start_anon
        self._running = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._peak_anon = max(self._peak_anon, _status("RssAnon"))
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._sampler.join()
        self._peak_anon = max(self._peak_anon, _status("RssAnon"))
        self.peak = _status("VmHWM") - self.start_rss
        self.peak_anon = self._peak_anon - self.start_anon
        # ru_maxrss (what `resource`, `/usr/bin/time` and schedulers report) is the process's
        # high-water mark since it started and cannot be reset: it reads the same as VmHWM here
        # unless the process was larger before the phase began.
        self.peak_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start_rss


def _all_ranks(state, report: dict) -> list[dict]:
    import torch.distributed as dist

    gathered: list = [None] * state.world_size
    dist.all_gather_object(gathered, report)
    return gathered


# -- table 1: strategies -----------------------------------------------------------------------------


def strategy_job(settings: dict, width: int, depth: int, batch: int, sequence: int, rehearse: bool) -> list[dict]:
    """One strategy: build, prepare, step, backward; what each rank holds and its peak."""
    if rehearse:  # see REHEARSAL_ENV
        _train_once(settings, width, depth, batch, sequence)
        gc.collect()  # wrappers' hooks make reference cycles: free the rehearsal's model now
    state, report = _train_once(settings, width, depth, batch, sequence)
    reports = _all_ranks(state, report)
    tl.finish(state)
    return reports


def _train_once(settings: dict, width: int, depth: int, batch: int, sequence: int):
    state = tl.init(**settings)
    generator = torch.Generator().manual_seed(state.rank)
    x = torch.randn(batch, sequence, width, generator=generator)
    y = torch.randn(batch, sequence, width, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PeakMemory() as build:
            model = Net(width, depth)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            state, model, optimizer = tl.prepare(state, model, optimizer)
        with PeakMemory() as steps:
            state = tl.step(tl.backward(state, F.mse_loss(model(x), y)), optimizer)  # AdamW's state
            state = tl.backward(state, F.mse_loss(model(x), y))
        held = held_bytes(model, optimizer)
    user_module = tl.unwrap(model)
    first = next(user_module.parameters())
    return state, {**held, "peak_build": build.peak, "peak_steps": steps.peak,
                   "mesh_dims": first.device_mesh.ndim if hasattr(first, "device_mesh") else 0,
                   "checkpointed": sum("Checkpoint" in type(m).__name__ for m in user_module.modules())}


STRATEGIES = {
    "DDP": {"strategy": "ddp"},
    "FSDP2": {"strategy": "fsdp"},
    "HSDP": {"strategy": "fsdp", "dp_replicate": 2},
    "FSDP2+AC": {"strategy": "fsdp", "activation_checkpointing": "blocks"},
}


def missing_wiring(label: str, settings: dict) -> str | None:
    """Why a row cannot run in this trainloop (a setting it lacks), or None."""
    known = attrs.fields_dict(tl.Config)
    absent = [name for name in settings if name not in known]
    if absent:
        return f"{label}: skipped, this trainloop has no setting {', '.join(absent)}"
    return None


def wiring_problem(label: str, ranks: list[dict]) -> str | None:
    """Why a row that ran did not measure what it names (the setting exists but does nothing yet)."""
    if label == "HSDP" and ranks[0]["mesh_dims"] != 2:
        return "HSDP: skipped, dp_replicate=2 is accepted but prepare does not shard on a 2-D mesh yet"
    if label == "FSDP2+AC" and not ranks[0]["checkpointed"]:
        return "FSDP2+AC: skipped, activation_checkpointing is accepted but no block is checkpointed"
    return None


# -- table 2: whole build vs meta-init ---------------------------------------------------------------


def build_job(on_meta: bool, file: str, width: int, depth: int, rehearse: bool, linear: bool = False) -> list[dict]:
    """Build (whole, or under empty_weights), prepare with FSDP2, load the file; peak and equality."""
    if rehearse:  # see REHEARSAL_ENV
        _build_and_load(on_meta, file, width, depth, linear)
        gc.collect()
    state, report = _build_and_load(on_meta, file, width, depth, linear)
    reports = _all_ranks(state, report)
    tl.finish(state)
    return reports


def _build_and_load(on_meta: bool, file: str, width: int, depth: int, linear: bool = False):
    from safetensors import safe_open

    state = tl.init(strategy="fsdp")
    report: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with PeakMemory() as peak:
                if on_meta:
                    with tl.empty_weights():
                        model = Net(width, depth, linear=linear)
                else:
                    model = Net(width, depth, linear=linear)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                state, model, optimizer = tl.prepare(state, model, optimizer)
                tl.load_weights(state, model, file)
        except (NotImplementedError, RuntimeError, ValueError) as error:
            # Every rank fails alike, before any collective: prepare cannot take meta parameters.
            return state, {"skipped": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    report.update(peak=peak.peak, peak_anon=peak.peak_anon, peak_maxrss=peak.peak_maxrss,
                  maxrss_before=peak.maxrss_before,
                  parameters=held_bytes(model, optimizer)["parameters"])
    equal = True
    with safe_open(file, framework="pt") as stored, torch.no_grad():
        for name, parameter in tl.unwrap(model).named_parameters():
            whole = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            equal &= torch.equal(whole, stored.get_tensor(name))
    report["equal"] = bool(equal)
    return state, report


# -- the report --------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / MIB:>9.1f}"


def print_strategies(results: dict[str, list[dict]], skipped: list[str], nproc: int) -> None:
    print(f"\nper rank, {nproc} ranks, MiB: held after a step and a backward; peak growth of the resident "
          "set while building and preparing the model, and while it takes the step and the backward")
    print(f"  {'strategy':<10}{'rank':>5}{'params':>9}{'grads':>9}{'optim':>9}{'held':>9}{'peak build':>12}"
          f"{'peak step':>11}")
    for label, ranks in results.items():
        for rank, r in enumerate(ranks):
            held = r["parameters"] + r["gradients"] + r["optimizer"]
            print(f"  {label if rank == 0 else '':<10}{rank:>5}{_mib(r['parameters'])}{_mib(r['gradients'])}"
                  f"{_mib(r['optimizer'])}{_mib(held)}{_mib(r['peak_build']):>12}{_mib(r['peak_steps']):>11}")
    for line in skipped:
        print(f"  {line}")


def print_builds(results: dict[str, list[dict]]) -> None:
    print("\nbuilding and loading on 2 FSDP ranks, MiB: peak during build + prepare + load_weights")
    print(f"  {'build':<12}{'rank':>5}{'params':>9}{'peak':>9}{'maxrss':>9}{'peak anon':>10}{'= file':>8}")
    rows = {label: ranks for label, ranks in results.items() if "skipped" not in ranks[0]}
    for label, ranks in rows.items():
        for rank, r in enumerate(ranks):
            print(f"  {label if rank == 0 else '':<12}{rank:>5}{_mib(r['parameters'])}{_mib(r['peak'])}"
                  f"{_mib(r['peak_maxrss'])}{_mib(r['peak_anon']):>10}{'yes' if r['equal'] else 'NO':>8}")
    for label, ranks in results.items():
        if label not in rows:
            print(f"  {label}: skipped, prepare cannot take a model on the meta device here "
                  f"({ranks[0]['skipped']})")
    if len(rows) == 2:
        whole, meta = rows["whole"], rows["meta-init"]
        for kind in ("peak", "peak_anon"):
            ratios = [m[kind] / w[kind] for m, w in zip(meta, whole)]
            verdict = "meets" if max(ratios) <= META_TARGET else "MISSES"
            print(f"  meta-init / whole, {kind.replace('_', ' ')}: "
                  + ", ".join(f"rank {i} {r:.2f}x" for i, r in enumerate(ratios))
                  + f"  ({verdict} the target <= {META_TARGET}x)")
    if "meta-init" in rows:
        for kind, label in (("peak", "VmHWM"), ("peak_maxrss", "ru_maxrss")):
            ratios = [r[kind] / r["parameters"] for r in rows["meta-init"]]
            verdict = "meets" if max(ratios) <= SHARD_TARGET else "MISSES"
            print(f"  meta-init peak / the rank's shard bytes, {label}: "
                  + ", ".join(f"rank {i} {x:.2f}x" for i, x in enumerate(ratios))
                  + f"  ({verdict} the target <= {SHARD_TARGET}x)")


def print_cold(ranks: list[dict]) -> None:
    print("\nmeta-init + load_weights on 2 FSDP ranks, cold (the job's first and only run, default malloc), MiB:\n"
          "  growth above the resident set right after tl.init, as the OS counts it (VmHWM; ru_maxrss)")
    print(f"  {'rank':>6}{'shard':>9}{'VmHWM':>9}{'ratio':>7}{'maxrss':>9}{'ratio':>7}{'= file':>8}")
    for rank, r in enumerate(ranks):
        print(f"  {rank:>6}{_mib(r['parameters'])}{_mib(r['peak'])}{r['peak'] / r['parameters']:>6.2f}x"
              f"{_mib(r['peak_maxrss'])}{r['peak_maxrss'] / r['parameters']:>6.2f}x{'yes' if r['equal'] else 'NO':>8}")
    print("  (ru_maxrss was already " + ", ".join(f"{r['maxrss_before'] / MIB:.1f}" for r in ranks)
          + " MiB above the baseline when it was taken)")
    worst = max(max(r["peak"], r["peak_maxrss"]) / r["parameters"] for r in ranks)
    print(f"  worst peak / shard bytes: {worst:.2f}x ({'meets' if worst <= SHARD_TARGET else 'MISSES'} "
          f"the target <= {SHARD_TARGET}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=13)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--sequence", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--nproc", type=int, default=4, help="ranks of the strategy table (even)")
    parser.add_argument("--tables", default="strategies,builds,cold",
                        help="which tables to measure: strategies, builds, cold (comma-separated)")
    parser.add_argument("--linear", action="store_true",
                        help="blocks of one width x width Linear each (e.g. --width 1536 --depth 12: 28M parameters)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model on 2 ranks, no rehearsal runs: a smoke run of the code paths")
    args = parser.parse_args()
    if args.quick:
        args.width, args.depth, args.batch, args.sequence, args.nproc = 32, 2, 2, 8, 2
    if min(args.width, args.depth, args.batch, args.sequence) < 1 or args.nproc < 2 or args.nproc % 2:
        parser.error("--width, --depth, --batch, --sequence must be >= 1; --nproc even and >= 2")
    tables = set(args.tables.split(","))
    if not tables or tables - {"strategies", "builds", "cold"}:
        parser.error(f"--tables takes strategies, builds and/or cold (got {args.tables!r})")
    if not os.path.exists("/proc/self/clear_refs"):
        print("memory.py measures resident memory through /proc (Linux only)")
        return 0
    with tl.empty_weights():  # not built here: a worker inherits its parent's ru_maxrss (see measure_cold)
        parameters = sum(p.numel() for p in Net(args.width, args.depth, linear=args.linear).parameters())
    print(f"trainloop {tl.__version__}, torch {torch.__version__}: {parameters / 1e6:.2f}M parameters "
          f"({parameters * 4 / MIB:.1f} MiB fp32), AdamW, {args.batch}x{args.sequence} tokens per rank, CPU/gloo")

    if "cold" in tables:  # first: its workers must not inherit REHEARSAL_ENV
        measure_cold(args)
    os.environ.update(REHEARSAL_ENV)  # the workers inherit it; this process does not need it
    if "strategies" in tables:
        measure_strategies(args)
    if "builds" in tables:
        measure_builds(args)
    return 0


def measure_strategies(args: argparse.Namespace) -> None:
    strategies, skipped = {}, []
    for label, settings in STRATEGIES.items():
        reason = missing_wiring(label, settings)
        if reason is None:
            ranks = spawn.run(strategy_job, settings, args.width, args.depth, args.batch, args.sequence,
                              not args.quick, n=args.nproc)
            reason = wiring_problem(label, ranks)
            if reason is None:
                strategies[label] = ranks
        if reason is not None:
            skipped.append(reason)
    print_strategies(strategies, skipped, args.nproc)


def measure_builds(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as directory:
        from safetensors.torch import save_file

        file = str(Path(directory) / "weights.safetensors")
        save_file(Net(args.width, args.depth, seed=1, linear=args.linear).state_dict(), file)
        builds = {label: spawn.run(build_job, on_meta, file, args.width, args.depth, not args.quick, args.linear, n=2)
                  for label, on_meta in (("whole", False), ("meta-init", True))}
    print_builds(builds)


def write_weights(file: str, width: int, depth: int, linear: bool) -> None:
    from safetensors.torch import save_file

    save_file(Net(width, depth, seed=1, linear=linear).state_dict(), file)


def measure_cold(args: argparse.Namespace) -> None:
    # Linux keeps ru_maxrss across fork and exec: a worker starts with its parent's high-water
    # mark. So this process never holds the model: a process of its own writes the file.
    with tempfile.TemporaryDirectory() as directory:
        file = str(Path(directory) / "weights.safetensors")
        spawn.run(write_weights, file, args.width, args.depth, args.linear, n=1)
        ranks = spawn.run(build_job, True, file, args.width, args.depth, False, args.linear, n=2)
    if "skipped" in ranks[0]:
        print(f"\ncold meta-init: skipped ({ranks[0]['skipped']})")
        return
    print_cold(ranks)


if __name__ == "__main__":
    sys.exit(main())

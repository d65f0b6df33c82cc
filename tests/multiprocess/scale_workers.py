"""What runs inside the worker processes of tests/multiprocess/test_strategies.py (strategies and scale).

`two_rank_checks` runs every 2-process check in one start-up; the tests assert on the plain
data it returns, against plain PyTorch loops run in the test process.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.checks import WorkerResults
from tests.support.models import BlockModel
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.bigmodel import empty_weights
from trainloop.forwarding import wrapper_layers

DDP = nn.parallel.DistributedDataParallel


def train(state, model, optimizer, loader, epochs: int):
    for _ in range(loader.epoch, epochs):
        for x, y in loader:
            with tl.accumulate(state, model):
                state = tl.backward(state, mse(model, x, y))
            state = tl.step(state, optimizer)
    return state


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters and buffers on every rank (a collective under FSDP)."""
    found = {}
    for name, value in tl.unwrap(model).state_dict().items():
        full = getattr(value, "full_tensor", None)
        found[name] = (full() if full is not None else value).detach().clone()
    return found


def trained(settings: dict, model: nn.Module, epochs: int = 2) -> tuple[dict, int]:
    """AdamW on 40 samples, batch 4 per rank, shuffled, seed 3: the big batch is 16 on 2 ranks."""
    state = tl.init(seed=3, **settings)
    state, model, optimizer, loader = tl.prepare(
        state, model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        DataLoader(regression_data(40), batch_size=4, shuffle=True))
    state = train(state, model, optimizer, loader, epochs)
    return weights(model), state.step


class WithSpare(nn.Module):
    """A tiny model with a `spare` layer that the forward uses only when told to."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(6, 3)
        self.spare = nn.Linear(6, 3)
        self.use_spare = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.used(x)
        return out + self.spare(x) if self.use_spare else out


# -- DDP's own options ------------------------------------------------------------------------


def _ddp_option_checks(results: dict) -> None:
    state = tl.init(ddp_find_unused_parameters=True, ddp_gradient_as_bucket_view=True,
                    ddp_bucket_cap_mb=1.5, ddp_static_graph=False)
    state, model = tl.prepare(state, tiny_model())
    ddp = next(layer for layer in wrapper_layers(model) if isinstance(layer, DDP))
    results["ddp_attributes"] = (ddp.find_unused_parameters, ddp.gradient_as_bucket_view,
                                 ddp.bucket_bytes_cap, ddp.static_graph)
    state, model = tl.prepare(tl.init(), tiny_model())
    ddp = next(layer for layer in wrapper_layers(model) if isinstance(layer, DDP))
    results["ddp_default_attributes"] = (ddp.find_unused_parameters, ddp.gradient_as_bucket_view,
                                         ddp.bucket_bytes_cap_default, ddp.static_graph)

    # Exact with accumulation, whatever the option (no_sync composes with each).
    for name, settings in {"bucket_view": {"ddp_gradient_as_bucket_view": True, "ddp_bucket_cap_mb": 0.001},
                           "unused": {"ddp_find_unused_parameters": True}}.items():
        results[f"{name}_weights"], results[f"{name}_steps"] = trained({"accumulate": 2, **settings}, tiny_model())
    # static_graph only without accumulation (torch's DDP breaks under no_sync with it).
    results["static_graph_weights"], results["static_graph_steps"] = trained({"ddp_static_graph": True}, tiny_model())
    try:
        tl.init(ddp_static_graph=True, accumulate=2)
    except ValueError as error:
        results["static_graph_with_accumulation"] = str(error)

    # A parameter no rank uses: without find_unused_parameters DDP refuses at the next forward;
    # with it, training goes on and the spare layer is never updated.
    try:
        trained({"accumulate": 2}, WithSpare(), epochs=1)
        results["unused_without_setting"] = "trained"
    except RuntimeError as error:
        results["unused_without_setting"] = str(error)
    results["spare_weights"], _ = trained({"accumulate": 2, "ddp_find_unused_parameters": True}, WithSpare())

    # The trap: a parameter only rank 0 uses is averaged with rank 1's zeros.
    state = tl.init(ddp_find_unused_parameters=True)
    model = WithSpare()
    state, model = tl.prepare(state, model)
    tl.unwrap(model).use_spare = state.rank == 0
    x = torch.ones(2, 6)
    model(x).sum().backward()
    local = torch.autograd.grad(tl.unwrap(model).spare(x).sum(), tl.unwrap(model).spare.weight)[0]
    grads: list = [None] * state.world_size
    dist.all_gather_object(grads, tl.unwrap(model).spare.weight.grad.clone())
    results["rank0_only_grad"] = (grads, local)  # rank 0's local gradient

    # Compression hooks: the gradient all-reduced in bf16 / fp16, as torch's default_hooks do.
    try:
        tl.init(ddp_comm_hook="bf16")
    except ValueError as error:
        results["bf16_hook_on_gloo"] = str(error)
    hooks = [("fp16", torch.float16)]
    if tl.init().topology.backend == "nccl":  # torch's bf16 hook needs nccl
        hooks.append(("bf16", torch.bfloat16))
    for hook, dtype in hooks:
        state = tl.init(ddp_comm_hook=hook)
        state, model = tl.prepare(state, tiny_model())
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(state.rank))
        local = torch.autograd.grad(mse(tl.unwrap(model), x, torch.zeros(8, 3)),
                                    list(tl.unwrap(model).parameters()))
        mse(model, x, torch.zeros(8, 3)).backward()
        synced = [p.grad.clone() for p in tl.unwrap(model).parameters()]
        everyone = [[torch.empty_like(g) for g in local] for _ in range(state.world_size)]
        for slot, grad in enumerate(local):
            dist.all_gather([rank_grads[slot] for rank_grads in everyone], grad)
        compressed = [sum((rank_grads[slot] / state.world_size).to(dtype) for rank_grads in everyone).float()
                      for slot in range(len(local))]
        exact = [sum(rank_grads[slot] for rank_grads in everyone) / state.world_size for slot in range(len(local))]
        results[f"{hook}_hook"] = (synced, compressed, exact)
        results[f"{hook}_hook_weights"], _ = trained({"accumulate": 2, "ddp_comm_hook": hook}, tiny_model())


# -- models built on the meta device ----------------------------------------------------------


class Rotary(nn.Module):
    """A non-persistent buffer computed in __init__ (as rotary embeddings' inv_freq is)."""

    def __init__(self, dim: int = 8, recompute: bool = False):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", self._frequencies(), persistent=False)
        if recompute:
            self.reset_parameters = self._reset

    def _frequencies(self) -> torch.Tensor:
        return 1.0 / (10000 ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def _reset(self) -> None:
        self.inv_freq.copy_(self._frequencies())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.cos(self.inv_freq).repeat(2)


class RotaryModel(BlockModel):
    def __init__(self, recompute: bool = False):
        super().__init__()
        self.rotary = Rotary(recompute=recompute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.rotary(torch.ones(8)).sum()


def _meta_init_checks(results: dict) -> None:
    for strategy in ("fsdp", "ddp"):
        state = tl.init(strategy=strategy, seed=3, accumulate=2)
        with empty_weights():
            model = RotaryModel()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # on meta parameters
        was_meta = all(p.is_meta for p in model.parameters())
        state, model, optimizer, loader = tl.prepare(
            state, model, optimizer, DataLoader(regression_data(40), batch_size=4, shuffle=True))
        local = [getattr(p, "to_local", lambda p=p: p)() for p in model.parameters()]
        results[f"meta_{strategy}"] = {
            "was_meta": was_meta,
            "initial": weights(model),
            "local_numel": sum(t.numel() for t in local),
            "local_storage": sum(t.untyped_storage().nbytes() for t in local),
            "optimizer_bound": all(a is b for a, b in zip(optimizer.param_groups[0]["params"], model.parameters())),
            "inv_freq": tl.unwrap(model).rotary.inv_freq.clone(),
        }
        state = train(state, model, optimizer, loader, epochs=2)
        results[f"meta_{strategy}"]["trained"] = weights(model)

    # Buffers built on meta too: recomputed by a reset_parameters, else refused by name.
    for recompute in (True, False):
        state = tl.init(strategy="fsdp", seed=3)
        with empty_weights(include_buffers=True):
            model = RotaryModel(recompute=recompute)
        try:
            state, model = tl.prepare(state, model)
            results[f"meta_buffers_recompute_{recompute}"] = tl.unwrap(model).rotary.inv_freq.clone()
        except ValueError as error:
            results[f"meta_buffers_recompute_{recompute}"] = str(error)


# -- activation checkpointing ------------------------------------------------------------------


def saved_tensor_count(model: nn.Module, x: torch.Tensor) -> int:
    """How many tensors autograd keeps for backward during one forward."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum()
    return count


def _activation_checkpointing_checks(results: dict) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    for checkpointing in ("blocks", "none"):
        settings = {"strategy": "fsdp", "accumulate": 2, "activation_checkpointing": checkpointing}
        state = tl.init(seed=3, **settings)
        state, model = tl.prepare(state, BlockModel(seed=3, depth=4))
        results[f"ac_{checkpointing}_wrappers"] = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
        results[f"ac_{checkpointing}_saved"] = saved_tensor_count(model, torch.randn(4, 6))
    results["ac_weights"], results["ac_steps"] = trained(
        {"strategy": "fsdp", "accumulate": 2, "activation_checkpointing": "blocks"}, BlockModel(seed=3, depth=4))
    # The torchtitan stack: checkpointed blocks, each compiled (inductor on the CPU), FSDP2.
    results["ac_compiled_weights"], _ = trained(
        {"strategy": "fsdp", "accumulate": 2, "activation_checkpointing": "blocks", "compile": "blocks"},
        BlockModel(seed=3, depth=4))


def _activation_checkpointing_resume_checks(results: dict, directory: str) -> None:
    """Sharded checkpoints of checkpoint-wrapped blocks: saved before any step and after one epoch."""
    from pathlib import Path

    runs: list = []
    directory = Path(directory)
    for kind in ("saved", "resumed"):
        state = tl.init(seed=3, strategy="fsdp", accumulate=2, activation_checkpointing="blocks")
        model = BlockModel(seed=3 if kind == "saved" else 9, depth=4)
        state, model, optimizer, loader = tl.prepare(
            state, model, torch.optim.AdamW(model.parameters(), lr=1e-2),
            DataLoader(regression_data(40), batch_size=4, shuffle=True))
        if kind == "saved":
            tl.save(state, directory / "ac-step-0")  # no optimizer state yet
            state = train(state, model, optimizer, loader, epochs=1)
            tl.save(state, directory / "ac-epoch-1")
        else:
            state = tl.load(state, directory / "ac-step-0")
            state = tl.load(state, directory / "ac-epoch-1")
            state = train(state, model, optimizer, loader, epochs=2)
            results["ac_resumed_weights"], results["ac_resumed_steps"] = weights(model), state.step
        runs.append(kind)


def two_rank_checks(directory: str) -> WorkerResults:
    """Every 2-process check; each reported alone (tests/support/checks.py)."""
    results = WorkerResults()
    for check in (_ddp_option_checks, _meta_init_checks, _activation_checkpointing_checks):
        with results.check(check.__name__):
            check(results)
    with results.check("_activation_checkpointing_resume_checks"):
        _activation_checkpointing_resume_checks(results, directory)
    return results


# -- meshes on 4 ranks: HSDP 2x2, TP 2 x dp_shard 2, checkpoints across meshes ----------------

TP_PLAN = {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}
MESH_SAMPLES = 64
HSDP = {"strategy": "fsdp", "dp_replicate": 2, "dp_shard": 2}
TP = {"strategy": "fsdp", "tp": 2, "dp_shard": 2, "tp_plan": TP_PLAN}


class FeedForward(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class MeshModel(nn.Module):
    """An input layer, residual feed-forward blocks (up/down: what a TP plan shards), a head."""

    def __init__(self, seed: int = 0, width: int = 8, depth: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(FeedForward(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def mesh_run(settings: dict, *, sgd: bool = False, clip: float | None = None, epochs: int = 2,
             resume: str | None = None, save: str | None = None, meta: bool = False,
             export: str | None = None) -> dict:
    """64 samples, batch 4 per data-parallel rank, shuffled, seed 3, accumulate 2.

    `meta`: the model built under empty_weights(), so initialised from the seed (3) in prepare.
    """
    from trainloop.callbacks import ClipGradNorm

    clipper = ClipGradNorm(clip) if clip else None
    state = tl.init(seed=3, accumulate=2, callbacks=[clipper] if clipper else [], **settings)
    with empty_weights() if meta else contextlib.nullcontext():
        model = MeshModel()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1) if sgd
                 else torch.optim.AdamW(model.parameters(), lr=1e-2))
    state, model, optimizer, loader = tl.prepare(
        state, model, optimizer, DataLoader(regression_data(MESH_SAMPLES), batch_size=4, shuffle=True))
    if resume:
        state = tl.load(state, resume)
    norms, first_batches = [], []
    for _ in range(loader.epoch, epochs):
        for x, y in loader:
            if not first_batches:
                first_batches.append(x.clone())
            with tl.accumulate(state, model):
                state = tl.backward(state, mse(model, x, y))
            before = state.step
            state = tl.step(state, optimizer)
            if clipper and state.step != before:
                norms.append(float(clipper.last_norm))
    if save:
        tl.save(state, save)
    if export:
        tl.export(state, export)
    seen: list = [None] * state.world_size
    dist.all_gather_object(seen, (state.strategy.data_parallel(), first_batches[0] if first_batches else None))
    dp_rank, _ = state.strategy.data_parallel()
    gathered = tl.gather(state, torch.tensor([dp_rank, state.rank]))
    return {"weights": weights(model), "steps": state.step, "norms": norms, "seen": seen, "gathered": gathered,
            "local_numel": sum(p.to_local().numel() for p in model.parameters())}


def four_rank_checks(directory: str) -> dict:
    from pathlib import Path

    results = WorkerResults()  # each check reported alone (tests/support/checks.py)
    with results.check("hsdp"):
        results["hsdp"] = mesh_run(HSDP)
    with results.check("hsdp_clip"):
        results["hsdp_clip"] = mesh_run(HSDP, sgd=True, clip=0.05)
    with results.check("tp"):
        results["tp"] = mesh_run(TP, export=str(Path(directory) / "tp.safetensors"))
        results["tp_export"] = str(Path(directory) / "tp.safetensors")
    with results.check("tp_clip"):
        results["tp_clip"] = mesh_run(TP, sgd=True, clip=0.05)
    with results.check("tp_meta"):
        results["tp_meta"] = mesh_run(TP, meta=True)
    # Saved on the 2x2 mesh after one epoch; resumed on 4x1 (here) and on one process (the test).
    with results.check("hsdp checkpoint across meshes"):
        saved = str(Path(directory) / "hsdp-2x2")
        results["saved_on_2x2"] = mesh_run(HSDP, epochs=1, save=saved)
        results["resumed_on_4x1"] = mesh_run({"strategy": "fsdp", "dp_shard": 4}, resume=saved)
        results["checkpoint"] = saved
    # Saved under TP x FSDP (2-D shards); resumed on one process by the test.
    with results.check("tp checkpoint"):
        results["tp_checkpoint"] = str(Path(directory) / "tp-2x2")
        results["saved_under_tp"] = mesh_run(TP, epochs=1, save=str(Path(directory) / "tp-2x2"))
    return results

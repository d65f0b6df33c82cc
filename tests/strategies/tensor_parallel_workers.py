"""What runs inside the worker processes of the tensor-parallel tests (tests/strategies/test_tensor_parallel.py).

`tp_checks` is started once on 4 ranks, a mesh of dp_shard=2 x tp=2: each TP group shards
small models with `apply_tp_plan` over its "tp" sub-mesh and compares forward outputs and
gradients with the same model whole, on inputs that differ between the two TP groups. Every
rank reports its largest differences; rank 0 returns all ranks' reports.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import trainloop as tl
from trainloop.bigmodel import empty_weights
from trainloop.strategies.mesh import MeshShape, build_mesh
from trainloop.strategies.tensor_parallel import apply_tp_plan

WIDTH = 8


class FeedForward(nn.Module):
    def __init__(self, width: int = WIDTH, norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Stack(nn.Module):
    """Blocks of a residual feed-forward, then a head: what a tensor-parallel plan names."""

    def __init__(self, depth: int = 2, norm: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(FeedForward(norm=norm) for _ in range(depth))
        self.head = nn.Linear(WIDTH, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _compare(model: nn.Module, plan, tp_mesh, inputs: torch.Tensor, output_of=lambda out: out) -> dict:
    """Largest |difference| of the output and of each parameter's gradient, sharded vs whole."""
    reference = copy.deepcopy(model)
    apply_tp_plan(model, tp_mesh, plan)
    out, expected = output_of(model(inputs)), output_of(reference(inputs))
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(reference.named_parameters())
    gradient_error = max((_whole(p.grad) - grads[name].grad).abs().max().item()
                         for name, p in model.named_parameters())
    return {
        "output_error": (_whole(out) - expected).abs().max().item(),
        "gradient_error": gradient_error,
        "sharded": sorted(name for name, p in model.named_parameters() if isinstance(p, DTensor)),
        "placements": {name: str(p.placements) for name, p in model.named_parameters()
                       if isinstance(p, DTensor)},
        "local_shapes": {name: list(p.to_local().shape) for name, p in model.named_parameters()
                         if isinstance(p, DTensor)},
    }


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                         max_position_embeddings=32)
    return LlamaForCausalLM(config)


def tp_checks() -> dict:
    state = tl.init()
    mesh = build_mesh(MeshShape(dp_replicate=1, dp_shard=2, tp=2), "cpu")
    tp_mesh = mesh.tp_mesh
    # The two TP groups see different batches; the ranks of one group the same one.
    inputs = torch.randn(3, 5, WIDTH, generator=torch.Generator().manual_seed(mesh.data_parallel_rank))
    report = {
        "dp_rank": mesh.data_parallel_rank,
        "mlp": _compare(Stack(), {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}, tp_mesh, inputs),
        "sequence_parallel": _compare(
            Stack(norm=True),
            {"blocks.*.norm": "sequence_parallel", "blocks.*.up": "colwise", "blocks.*.down": "rowwise"},
            tp_mesh, inputs),
        "gathered": _compare(Stack(), {"blocks.*.up": "colwise_rep", "head": "rowwise_rep",
                                       "blocks.*.down": "replicate"}, tp_mesh, inputs),
    }
    with empty_weights():
        on_meta = Stack()
    apply_tp_plan(on_meta, tp_mesh, {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"})
    up = on_meta.blocks[0].up.weight
    report["meta"] = {"dtensor": isinstance(up, DTensor), "is_meta": up.to_local().is_meta,
                      "local_shape": list(up.to_local().shape)}

    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(mesh.data_parallel_rank))
    report["llama"] = _compare(_llama(), None, tp_mesh, tokens, output_of=lambda out: out.logits)
    gathered: list = [None] * state.world_size
    dist.all_gather_object(gathered, report)
    tl.finish(state)
    return {"ranks": gathered}

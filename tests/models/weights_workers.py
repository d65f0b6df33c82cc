"""What runs inside the worker processes of the load_weights tests (tests/models/test_weights.py).

`weights_checks` is started once on 2 ranks. It loads checkpoints that the test wrote from a
whole model into models prepared with strategy="fsdp" (DTensor shards), with DDP, and sharded by
tensor parallelism (alone and under FSDP2), and reports whether each equals the file bit for
bit, what each rank holds locally, and whether the loaded model computes what the file's model
computes. Rank 0 returns all ranks' reports.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import trainloop as tl
from tests.support.models import BlockModel, full_weights, probe_input
from trainloop.strategies.mesh import MeshShape, build_mesh
from trainloop.strategies.tensor_parallel import apply_tp_plan

TP_PLAN = {"blocks.0.linear": "colwise", "blocks.1.linear": "rowwise", "blocks.2.linear": "colwise_rep",
           "head": "rowwise_rep"}


def _equals_file(model, expected: dict[str, torch.Tensor]) -> bool:
    weights = full_weights(model)
    return weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


def _report(model, expected: dict[str, torch.Tensor], reference_output: torch.Tensor) -> dict:
    user_module = tl.unwrap(model)
    with torch.no_grad():
        output = model(probe_input())
    output = output.full_tensor() if isinstance(output, DTensor) else output
    return {
        "equal": _equals_file(model, expected),
        "output_error": (output - reference_output).abs().max().item(),
        "local_shapes": {name: list(p.to_local().shape) for name, p in user_module.named_parameters()
                         if isinstance(p, DTensor)},
        "placements": sorted({str(p.placements) for p in user_module.parameters() if isinstance(p, DTensor)}),
    }


def weights_checks(file: str, directory: str) -> dict:
    expected = load_file(file)
    source = BlockModel(seed=1)
    source.load_state_dict(expected)
    with torch.no_grad():
        reference_output = source(probe_input())
    report: dict = {}

    state = tl.init(strategy="fsdp")
    model = BlockModel(seed=0)  # other weights: the load must replace every one
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state, model, optimizer = tl.prepare(state, model, optimizer)
    result = tl.load_weights(state, model, file)
    report["fsdp"] = {**_report(model, expected, reference_output), "result": list(result)}
    # The optimizer still trains the loaded shards.
    before = full_weights(model)["head.weight"]
    with tl.accumulate(state, model):
        state = tl.backward(state, model(probe_input()).square().mean())
    state = tl.step(state, optimizer)
    report["fsdp"]["trains"] = not torch.equal(full_weights(model)["head.weight"], before)

    state = tl.init(strategy="fsdp")
    state, model = tl.prepare(state, BlockModel(seed=0))
    tl.load_weights(state, model, directory)
    report["fsdp_index"] = _report(model, expected, reference_output)

    state = tl.init(strategy="ddp")
    state, model = tl.prepare(state, BlockModel(seed=0))
    tl.load_weights(state, model, directory)
    report["ddp"] = _report(model, expected, reference_output)

    mesh = build_mesh(MeshShape(1, 1, 2), "cpu")
    model = apply_tp_plan(BlockModel(seed=0), mesh.tp_mesh, TP_PLAN)
    tl.load_weights(state, model, file)
    report["tp"] = _report(model, expected, reference_output)

    # FSDP2 over tensor parallelism: (dp_shard, tp) placements on a 2-D mesh.
    model = apply_tp_plan(BlockModel(seed=0), mesh.tp_mesh, TP_PLAN)
    for block in model.blocks:
        fully_shard(block, mesh=mesh.fsdp_mesh)
    fully_shard(model, mesh=mesh.fsdp_mesh)
    tl.load_weights(state, model, file)
    report["fsdp_tp"] = _report(model, expected, reference_output)

    gathered: list = [None] * state.world_size
    dist.all_gather_object(gathered, report)
    tl.finish(state)
    return {"ranks": gathered}

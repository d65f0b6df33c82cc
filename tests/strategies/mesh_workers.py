"""What runs inside the worker processes of the mesh tests (tests/strategies/test_mesh.py).

`mesh_checks` is started once on 4 ranks; it builds every mesh shape 4 ranks allow and reports,
for each rank, the ranks of each sub-mesh and group, and the result of a real all-reduce over
the data-parallel group. Rank 0 returns everything (gathered from all ranks).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

import trainloop as tl
from trainloop.strategies import mesh as meshes

SHAPES = [(1, -1, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4), (4, 1, 1)]


def _one_rank(mesh: meshes.Mesh) -> dict:
    group = mesh.data_parallel_group
    # A real reduction over the group: the sum of the world ranks it holds.
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total, group=group)
    fsdp = mesh.fsdp_mesh
    return {
        "dp_rank": mesh.data_parallel_rank,
        "dp_size": mesh.data_parallel_size,
        "fsdp_mesh": fsdp.mesh.tolist(),
        "fsdp_dims": fsdp.mesh_dim_names,
        "tp_mesh": mesh.tp_mesh.mesh.tolist(),
        "dp_group": dist.get_process_group_ranks(group),
        "dp_sum": total.item(),
    }


def mesh_checks() -> dict:
    """Every rank's view of each mesh shape; rank 0 returns all ranks' views."""
    state = tl.init()
    views: dict = {}
    for dp_replicate, dp_shard, tp in SHAPES:
        config = tl.Config(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp)
        shape = meshes.mesh_shape(config, state.world_size)
        views[(dp_replicate, dp_shard, tp)] = _one_rank(meshes.build_mesh(shape, "cpu"))
    gathered: list = [None] * state.world_size
    dist.all_gather_object(gathered, views)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meshes.build_mesh(meshes.MeshShape(1, 2, 2), "cpu").data_parallel_group
    try:
        meshes.build_mesh(meshes.MeshShape(1, 2, 1), "cpu")
        too_small = ""
    except ValueError as error:
        too_small = str(error)
    tl.finish(state)
    return {"views": gathered, "warnings": [str(w.message) for w in caught], "too_small": too_small}

"""The run's device mesh (trainloop.strategies.mesh): settings, validation, and the ranks of each group.

The validation runs in this process; one call of `mesh_checks` on 4 ranks (shared job) builds every
mesh 4 ranks allow and reports each rank's groups (tests/strategies/mesh_workers.py).
"""

from __future__ import annotations

import json

import pytest

import trainloop as tl
from tests.strategies.mesh_workers import SHAPES, mesh_checks
from tests.support import shared_job
from trainloop.config import resolve_config
from trainloop.strategies.mesh import MeshShape, mesh_shape


def test_defaults_are_plain_data_parallel_over_the_world():
    config = tl.Config()
    assert (config.dp_replicate, config.dp_shard, config.tp, config.tp_plan) == (1, -1, 1, None)
    assert mesh_shape(config, 8) == MeshShape(1, 8, 1)
    assert mesh_shape(config, 1) == MeshShape(1, 1, 1)


@pytest.mark.parametrize(("sizes", "world_size", "expected"), [
    ((2, -1, 1), 8, (2, 4, 1)),
    ((1, -1, 2), 8, (1, 4, 2)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((2, 2, 2), 8, (2, 2, 2)),
    ((1, 1, 4), 4, (1, 1, 4)),
])
def test_dp_shard_minus_one_takes_what_is_left(sizes, world_size, expected):
    config = tl.Config(dp_replicate=sizes[0], dp_shard=sizes[1], tp=sizes[2])
    shape = mesh_shape(config, world_size)
    assert shape.sizes == expected
    assert shape.world_size == world_size
    assert shape.data_parallel_size == expected[0] * expected[1]


def test_a_product_that_is_not_the_world_size_names_all_three_and_the_world():
    with pytest.raises(ValueError) as raised:
        mesh_shape(tl.Config(dp_replicate=2, dp_shard=3, tp=1), 4)
    message = str(raised.value)
    assert "dp_replicate=2" in message and "dp_shard=3" in message and "tp=1" in message
    assert "world size is 4" in message


def test_what_is_left_must_be_whole():
    with pytest.raises(ValueError, match=r"dp_replicate=2 x tp=3 = 6 does not divide the world size 8"):
        mesh_shape(tl.Config(dp_replicate=2, tp=3), 8)


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("dp_replicate", 0, "dp_replicate must be a number >= 1"),
    ("tp", -1, "tp must be a number >= 1"),
    ("dp_shard", 0, "dp_shard must be -1"),
    ("dp_shard", -2, "dp_shard must be -1"),
    ("tp", 2.0, "tp must be an integer"),
    ("tp_plan", ["colwise"], "tp_plan must be a dict"),
    ("tp_plan", {"up": "colwize"}, "unknown style"),
    ("tp_plan", "{not json", "tp_plan must be a JSON object"),
])
def test_bad_mesh_settings_are_refused(setting, value, message):
    with pytest.raises(ValueError, match=message):
        tl.Config(**{setting: value})


def test_mesh_settings_come_from_the_environment():
    plan = {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}
    config = resolve_config({}, {"TRAINLOOP_DP_REPLICATE": "2", "TRAINLOOP_TP": "2",
                                 "TRAINLOOP_TP_PLAN": json.dumps(plan)})
    assert (config.dp_replicate, config.dp_shard, config.tp) == (2, -1, 2)
    assert config.tp_plan == plan
    assert json.loads(json.dumps(config.to_dict()))["tp_plan"] == plan


def test_a_bad_plan_in_the_environment_names_the_variable():
    with pytest.raises(ValueError, match="TRAINLOOP_TP_PLAN"):
        resolve_config({}, {"TRAINLOOP_TP_PLAN": '{"up": "sideways"}'})


MESH = shared_job.Call(mesh_checks, n=4)


@pytest.fixture(scope="module")
def four_ranks(request) -> dict:
    return MESH.result(request)


def _expected(sizes: tuple[int, int, int], rank: int) -> dict:
    """Each rank's groups, worked out by hand from the row-major (dp_replicate, dp_shard, tp) layout."""
    shape = mesh_shape(tl.Config(dp_replicate=sizes[0], dp_shard=sizes[1], tp=sizes[2]), 4)
    replicate, shard, tp = shape.sizes
    r, s, t = rank // (shard * tp), rank // tp % shard, rank % tp
    dp_group = [(i * shard + j) * tp + t for i in range(replicate) for j in range(shard)]
    shard_ranks = [(r * shard + j) * tp + t for j in range(shard)]
    fsdp_mesh = shard_ranks if replicate == 1 else [
        [(i * shard + j) * tp + t for j in range(shard)] for i in range(replicate)]
    return {
        "dp_rank": r * shard + s,
        "dp_size": replicate * shard,
        "fsdp_mesh": fsdp_mesh,
        "fsdp_dims": ("dp_shard",) if replicate == 1 else ("dp_replicate", "dp_shard"),
        "tp_mesh": [(r * shard + s) * tp + k for k in range(tp)],
        "dp_group": dp_group,
        "dp_sum": float(sum(dp_group)),
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize("sizes", SHAPES)
def test_each_rank_gets_its_groups(four_ranks, sizes):
    for rank, views in enumerate(four_ranks["views"]):
        assert views[sizes] == _expected(sizes, rank), f"rank {rank}, mesh {sizes}"


@pytest.mark.multiprocess
def test_tp_ranks_of_one_group_share_a_data_parallel_rank(four_ranks):
    views = [v[(1, 2, 2)] for v in four_ranks["views"]]
    assert [v["dp_rank"] for v in views] == [0, 0, 1, 1]
    assert [v["tp_mesh"] for v in views] == [[0, 1], [0, 1], [2, 3], [2, 3]]


@pytest.mark.multiprocess
def test_the_flattened_mesh_is_kept_without_deprecated_slicing(four_ranks):
    assert not [w for w in four_ranks["warnings"] if "flattened" in w], four_ranks["warnings"]


@pytest.mark.multiprocess
def test_a_mesh_smaller_than_the_process_group_is_refused(four_ranks):
    assert "has 2 ranks, but the process group has 4" in four_ranks["too_small"]

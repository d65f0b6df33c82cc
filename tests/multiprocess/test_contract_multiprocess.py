"""The loop's contract on 2 real processes (gloo): the checks run in tests/contract_workers.py,
in one `spawn.run` start-up; each is compared there with plain PyTorch on one process."""

from __future__ import annotations

import pytest

from tests.multiprocess.contract_workers import contract_checks
from trainloop import spawn

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn.run(contract_checks, str(tmp_path_factory.mktemp("contract")), n=2)


def test_two_backward_calls_before_one_step_give_the_plain_ddp_gradient(ranks):
    # d mean(w . x) / dw averaged over the ranks (x = 1 and 2): 1.5; SGD lr 1 from 1.0.
    assert ranks["rank0"]["two_losses"] == [[[-0.5, -0.5, -0.5]], [[-0.5, -0.5, -0.5]]]


def test_a_method_runs_through_ddps_forward_once_marked_and_is_refused_unmarked(ranks):
    for rank in ("rank0", "rank1"):
        result = ranks[rank]["forward_methods"]
        assert "mark_forward_method" in result["unmarked"] and "training_step" in result["unmarked"]
        assert result["no_grad"] > 0 and result["marked_equals_reference"] is True


def test_broadcast_into_a_placeholder_of_another_shape_or_dtype_raises_on_every_rank(ranks):
    zero, one = ranks["rank0"]["broadcast"], ranks["rank1"]["broadcast"]
    for case in ("dtype", "shape"):
        assert zero[case] is not None and zero[case] == one[case] and "placeholder" in zero[case]
    assert one["none_placeholder"] == [1.5, 2.5, 3.5] and one["same"] == [1.5, 2.5, 3.5]


def test_accumulate_with_the_users_module_turns_off_the_sync_until_the_windows_end(ranks):
    assert ranks["rank0"]["accumulate_raw"] == {"first_local": True, "last_synced": True}


def test_ddps_prepared_model_has_the_users_keys_and_refuses_a_new_submodule(ranks):
    result = ranks["rank0"]["state_dict"]
    assert result["keys"] is True
    assert "before tl.prepare" in result["assigned"]


def test_reduce_gives_what_one_process_gives(ranks):
    for rank in ("rank0", "rank1"):
        assert ranks[rank]["reduce"]["int_mean_dtype"] == "torch.float32"
        assert "reduce needs tensors or numbers" in ranks[rank]["reduce"]["non_tensor"]


def test_gather_with_sync_grads_gives_one_processes_gradients(ranks):
    assert ranks["rank0"]["gather_sync_grads"] is True and ranks["rank1"]["gather_sync_grads"] is True


def test_no_sync_keeps_gradients_local_until_enabled_is_false(ranks):
    for rank in ("rank0", "rank1"):
        assert ranks[rank]["no_sync"] == {"synced_0": False, "synced_1": True, "equals_reference": True}


def test_shard_false_keeps_a_distributed_samplers_shards_and_sets_its_epoch(ranks):
    for rank in ("rank0", "rank1"):
        assert ranks[rank]["shard_false"] == {"equal": True, "epochs_differ": True, "epoch": 2}


def test_lbfgs_on_two_ranks_equals_one_process_over_the_global_batch(ranks):
    for rank in ("rank0", "rank1"):
        assert ranks[rank]["lbfgs"] == {"step": 2, "close": True, "same": True}


def test_print_on_the_main_process_only_and_main_first_per_node(ranks):
    zero, one = ranks["rank0"]["rank_helpers"]
    assert zero["printed"] == "from 0\n" and one["printed"] == ""
    assert zero["saw_marker"] is False and one["saw_marker"] is True


def test_ddps_per_step_path_costs_no_more_python_than_a_plain_ddp_and_still_forwards(ranks):
    for rank in ("rank0", "rank1"):
        result = ranks[rank]["ddp_hot_path"]
        assert result["is_ddp"] is True
        # DDP's forward, no_sync and the flags it sets each step run no more Python calls than on
        # a plain torch DDP (fewer: the subclass's setattr skips nn.Module's checks for DDP's own
        # flags), and of trainloop.forwarding only the two hooks that stand in for nn.Module's:
        # no lookup of the user's module, no override of DDP's forward.
        assert set(result["forwarding_calls"]) <= {"__getattr__", "__setattr__"}, result
        assert result["calls"]["prepared"] <= result["calls"]["plain"], result
        # tl.accumulate on the prepared DDP: the strategy's no_sync, no walk through the layers.
        assert set(result["accumulate_calls"]) - {"__getattr__", "__setattr__"} == {"no_sync"}, result
        assert result["passthrough"] == {"label": ("changed", "changed"), "flag_is_ddps": True,
                                         "inside_ddp_forward": [True], "routing_left": False}

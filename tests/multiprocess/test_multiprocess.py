"""Many processes on CPU with gloo: DDP exactness, sharded data, collectives.

One `spawn.run` starts the 2 workers once and runs every check (tests/multiprocess/workers.py); the tests
below assert on what it returned.
"""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess.workers import ddp_checks
from tests.support.reference import TokenData, big_batch_reference, regression_data, tiny_model
from trainloop import spawn

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    tracking_dir = tmp_path_factory.mktemp("tracking")
    results = spawn.run(ddp_checks, str(tracking_dir), n=2)
    results["tracking_files_after_the_job"] = sorted(p.name for p in tracking_dir.iterdir())
    return results


def assert_weights(weights: dict, model: torch.nn.Module) -> None:
    for name, value in model.state_dict().items():
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=0, msg=f"{name} differs")


def test_runs_on_two_gloo_ranks(ddp):
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"


def test_ddp_with_accumulation_equals_one_process_with_the_big_batch(ddp):
    reference = tiny_model()
    big_batch_reference(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2),
                        regression_data(40), big_batch=16, epochs=2, seed=3, shuffle=True)
    assert ddp["ddp_steps"] == 6  # 3 windows per epoch, the last one short
    assert_weights(ddp["ddp_weights"], reference)


def test_ddp_ragged_num_items_equals_token_weighted_big_batch(ddp):
    reference = tiny_model()
    big_batch_reference(reference, torch.optim.SGD(reference.parameters(), lr=0.05), TokenData(30),
                        big_batch=12, epochs=2, seed=5, shuffle=True, loss="tokens")
    assert_weights(ddp["token_weights"], reference)


@pytest.mark.parametrize("n", [11, 99, 8])
def test_per_batch_gather_counts_every_sample_once_in_order(ddp, n):
    assert ddp[f"gather_{n}"] == list(range(n))


def test_a_sharded_iterable_dataset_is_gathered_once_in_order(ddp):
    assert ddp["gather_stream_11"] == list(range(11))


def test_shuffled_gather_is_a_permutation_identical_on_every_rank(ddp):
    assert sorted(ddp["gather_shuffled"]) == list(range(99))
    assert ddp["gather_shuffled"] != list(range(99))
    assert ddp["gather_shuffled_same_on_every_rank"]


def test_gather_of_sizes_that_differ_per_rank(ddp):
    ragged = ddp["gather_ragged"]
    assert ragged["a"].tolist() == [0, 0, 1]
    assert ragged["b"][0].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1], [1, 1]]


def test_reduce_broadcast_split_main_first(ddp):
    reduce = ddp["reduce"]
    assert reduce["sum"]["t"].tolist() == [3.0, 10.0] and reduce["sum"]["n"] == 3.0
    assert reduce["mean"]["t"].tolist() == [1.5, 5.0] and reduce["mean"]["n"] == 1.5
    assert reduce["max"]["t"].tolist() == [2.0, 10.0] and reduce["min"]["t"].tolist() == [1.0, 0.0]
    assert ddp["broadcast_tensor"].tolist() == [1.0, 1.0, 1.0]
    assert ddp["broadcast_object"] == {"from": 0, "items": [0, 0]}
    assert ddp["split"].tolist() == list(range(7))
    assert ddp["split_list"] == ["a", "b", "c"]  # rank 0 takes the extra item
    assert ddp["main_first_done"] == [0.0, 1.0]


def test_mismatched_gather_raises_on_every_rank(ddp):
    assert "different structure, trailing shapes or dtypes" in ddp["mismatch"]
    assert ddp["mismatch_on_every_rank"] == [True, True]


def test_log_reports_the_cross_rank_mean_on_the_main_process(ddp):
    assert ddp["log_reports"] == [(1, {"constant": 3.0, "rank_value": 1.0})]


def test_trackers_on_two_ranks_write_one_run_with_the_cross_rank_mean(ddp):
    tracking = ddp["tracking"]
    expected = tracking["expected"]
    for tracker in ("tensorboard", "jsonlines", "mlflow", "wandb"):
        assert tracking[tracker] == pytest.approx(expected), tracker
    assert tracking["runs"] == {"tensorboard": 1, "jsonlines": 1, "mlflow": 1, "wandb": 1}
    assert ddp["tracking_files_after_the_job"] == ["metrics.jsonl", "ml", "tb", "wandb"]

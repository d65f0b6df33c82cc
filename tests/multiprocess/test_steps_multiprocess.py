"""`tl.log` across 2 real processes (gloo): names checked at every report, never a hang, never a
value mixed up across names; every logged value reported. The checks run in tests/multiprocess/steps_workers.py."""

from __future__ import annotations

import pytest

from tests.multiprocess.steps_workers import log_checks
from trainloop import spawn

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def logs():
    return spawn.run(log_checks, n=2)


def test_a_report_with_the_agreed_names_is_exactly_one_collective(logs):
    assert logs["first"] == ([(1, {"loss": 1.5})], None)
    reported, error, calls = logs["agreed"]
    assert reported == [(2, {"loss": 3.5})] and error is None
    assert calls == [["all_reduce"], ["all_reduce"]]  # per rank: the report's one all-reduce


def test_a_name_logged_more_often_on_one_rank_is_averaged_over_all_its_values(logs):
    assert logs["counts_differ"] == ([(3, {"loss": 2.0})], None)  # (1 + 3 + 2) / 3


@pytest.mark.parametrize("case", ["names_differ", "name_counts_differ"])
def test_ranks_logging_different_names_never_mix_them_up_and_never_hang(logs, case):
    reported, errors = logs[case]
    assert reported == []  # nothing reached the tracker: no value summed across names
    assert errors[0] == errors[1] and errors[0] is not None  # the same error on every rank
    expected = "rank 0: a; rank 1: b" if case == "names_differ" else "rank 0: a; rank 1: a, b"
    assert "the ranks logged different metric names" in errors[0] and expected in errors[0]


def test_one_rank_changing_its_names_after_they_were_agreed_raises_on_every_rank(logs):
    error, errors = logs["one_rank_adds_a_name"]
    assert error is None
    assert errors[0] == errors[1] and "rank 0: loss; rank 1: extra, loss" in errors[0]


def test_every_rank_changing_its_names_alike_is_reported(logs):
    assert logs["all_change_alike"] == ([(8, {"loss": 1.0, "val_acc": 0.5})], None)


def test_finish_reports_what_every_rank_logged_after_the_last_report(logs):
    assert logs["finish"] == [(8, {"final": 0.5})]


def test_finish_never_hangs_on_a_value_only_one_rank_logged_after_the_last_report(logs):
    errors = logs["finish_one_rank_logs"]
    assert errors[0] == errors[1] and "rank 0: val_acc; rank 1: (none)" in errors[0]


def test_finish_with_nothing_left_to_report_reports_nothing_more(logs):
    assert logs["finish_nothing_pending"] == [(1, {"loss": 0.5})]

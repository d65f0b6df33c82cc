"""A check that raises in a worker fails the tests that read it, not the whole module.

One `spawn.run` on 2 ranks runs three checks (tests/multiprocess/checks_workers.py); the middle
one raises on rank 1 only. The in-process tests check the same bookkeeping without processes.
"""

from __future__ import annotations

import pytest

from tests.multiprocess.checks_workers import one_check_raises_on_rank_1
from tests.support.checks import WorkerResults
from trainloop import spawn

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def results() -> WorkerResults:
    return spawn.run(one_check_raises_on_rank_1, n=2)


def test_the_checks_around_a_failed_one_report_their_data(results):
    assert type(results) is WorkerResults
    assert results["before"] == 1.0
    assert results["after"] == [0, 1]


def test_a_key_of_a_check_that_raised_on_another_rank_fails_with_that_ranks_traceback(results):
    # Rank 0 wrote both keys of the middle check; rank 1 raised: both fail for the reader on rank 0.
    for key in ("written before the error", "never written on rank 1"):
        with pytest.raises(pytest.fail.Exception) as failure:
            results[key]  # reading is what fails
        assert "the check 'raises on rank 1' raised in the worker on rank(s) [1]" in str(failure.value)
        assert "RuntimeError: deliberate failure on rank 1" in str(failure.value)
    with pytest.raises(pytest.fail.Exception, match="no check wrote 'missing'; these failed"):
        results["missing"]


def test_without_a_process_group_a_check_records_this_process_alone():
    results = WorkerResults()
    with results.check("fine"):
        results["a"] = 1
    with results.check("broken"):
        results["b"] = 2
        raise ValueError("boom")
    assert results["a"] == 1 and results.get("a") == 1 and results.get("nothing", 5) == 5
    with pytest.raises(pytest.fail.Exception, match=r"(?s)'b' comes from a check that failed.*ValueError: boom"):
        results.get("b")
    with pytest.raises(KeyError):
        WorkerResults()["absent"]  # no failures: a plain KeyError

"""The suite's tiers hold: folders and `multiprocess` mark tests slow, and a fast-tier test that
starts a process fails, naming the marker to add (the hooks of tests/conftest.py, run by pytester)."""

from __future__ import annotations

import pytest

from tests.support.paths import REPO

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow  # each case runs its tests, which start processes


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\naddopts = --strict-markers -p no:cacheprovider\nmarkers =\n"
                     "    slow: s\n    bench: b\n    multiprocess: m\n")
    starts = "import subprocess, sys\n\ndef start():\n    subprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
    pytester.makepyfile(test_here=starts + (
        "import pytest\n\n"
        "def test_quiet():\n    pass\n\n"
        "def test_starts_unmarked():\n    start()\n\n"
        "@pytest.mark.slow\ndef test_starts_marked_slow():\n    start()\n\n"
        "@pytest.mark.multiprocess\ndef test_starts_marked_multiprocess():\n    start()\n"))
    pytester.mkpydir("multiprocess").joinpath("test_there.py").write_text(starts + "\ndef test_in_the_folder():\n    start()\n")
    pytester.mkpydir("benchmarks").joinpath("test_bench.py").write_text("def test_smoke():\n    pass\n")
    return pytester


def test_a_fast_test_that_starts_a_process_fails_naming_the_marker(suite):
    result = suite.runpytest_subprocess()
    result.assert_outcomes(passed=6, errors=1)
    result.stdout.fnmatch_lines(["*test_starts_unmarked started a child process*mark it `@pytest.mark.slow`*"])


def test_the_fast_tier_leaves_out_the_slow_folders_markers_and_benchmarks(suite):
    result = suite.runpytest_subprocess("-m", "not slow and not bench", "-v")
    result.assert_outcomes(passed=2, errors=1, deselected=4)  # test_quiet, and test_starts_unmarked failing
    result.stdout.fnmatch_lines(["*test_quiet PASSED*"])

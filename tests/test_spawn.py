"""The launcher: real processes, real failures, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reference import big_batch_reference, regression_data, tiny_model
from trainloop import spawn

pytestmark = pytest.mark.multiprocess
SCRIPTS = Path(__file__).parent / "scripts"


def launch(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainloop.spawn", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def reference_weights() -> dict:
    model = tiny_model()
    big_batch_reference(model, torch.optim.AdamW(model.parameters(), lr=1e-2), regression_data(40),
                        big_batch=8, epochs=2, seed=3, shuffle=True)
    return model.state_dict()


def assert_reference(saved: dict) -> None:
    for name, value in reference_weights().items():
        torch.testing.assert_close(saved["weights"][name], value, atol=1e-6, rtol=0)


def run_failing_job(*args: str) -> tuple[str, float]:
    """Launch, wait, and return the output and the seconds taken; the job must fail."""
    start = time.monotonic()
    job = launch(*args)
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0, output
    return output, time.monotonic() - start


def test_a_rank_that_raises_ends_the_job_quickly_naming_it():
    output, elapsed = run_failing_job("-n", "2", str(SCRIPTS / "fail_on_rank.py"), "1")
    assert elapsed < 15, f"took {elapsed:.1f}s"
    assert output.count("RuntimeError: deliberate failure on rank 1") == 1, output
    assert "rank 1 (pid" in output and "failed first" in output, output


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_launcher_stops_every_worker(tmp_path, stop):
    job = launch("-n", "2", str(SCRIPTS / "wait_forever.py"), str(tmp_path))
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("*.pid"))) < 2:
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()[0]
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    job.send_signal(stop)
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 128 + stop and f"stopped by {stop.name}" in output, output
    for pid in pids:
        assert not _alive(pid), f"worker {pid} outlived the launcher:\n{output}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by its (dead) parent.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_two_single_process_nodes_on_loopback_match_one_node(tmp_path):
    port = str(spawn.free_port())
    nodes = [launch("-n", "1", "--nnodes", "2", "--node-rank", str(rank), "--master", f"127.0.0.1:{port}",
                    str(SCRIPTS / "train_tiny.py"), str(tmp_path / f"node{rank}.pt"))
             for rank in (0, 1)]
    for node in nodes:
        output, _ = node.communicate(timeout=120)
        assert node.returncode == 0, output
    saved = torch.load(tmp_path / "node0.pt", weights_only=True)
    assert saved["world_size"] == 2
    assert_reference(saved)


def test_max_restarts_restarts_a_worker_that_was_killed(tmp_path):
    job = launch("-n", "2", "--max-restarts", "1", str(SCRIPTS / "train_tiny.py"),
                 str(tmp_path / "out.pt"), "--die-once", str(tmp_path))
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0, output
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert saved["restart"] == 1 and (tmp_path / "died").exists()
    assert_reference(saved)


def test_bad_settings_are_refused_before_any_worker_starts():
    job = launch("-n", "2", "--precision", "fp9", str(SCRIPTS / "fail_on_rank.py"), "0")
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 2 and "precision must be one of" in output


def test_help_lists_every_flag_with_its_default():
    output = subprocess.run([sys.executable, "-m", "trainloop.spawn", "--help"], capture_output=True,
                            text=True, check=True).stdout
    for flag in ("--nproc", "--nnodes", "--node-rank", "--master", "--max-restarts", "--config",
                 "--precision", "--accumulate", "--strategy", "--seed", "--log-every", "--compile",
                 "--timeout", "--device"):
        assert flag in output
    assert "(default: fp32)" in output and "(default: 1)" in output


def test_settings_from_a_toml_file_and_flags_reach_init(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('nproc = 2\nprecision = "bf16"\naccumulate = 3\n')
    script = tmp_path / "show.py"
    script.write_text("import trainloop as tl\ns = tl.init()\n"  # one write per line: ranks never interleave
                      "c = s.config\n"
                      "print(f'settings {s.rank} {s.world_size} {c.precision} {c.accumulate}\\n', end='', flush=True)\n"
                      "tl.finish(s)\n")
    job = launch("--config", str(config), "--accumulate", "5", str(script))
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 0, output
    assert "settings 0 2 bf16 5" in output and "settings 1 2 bf16 5" in output


def test_a_hung_rank_ends_the_job_within_the_timeout_and_is_named():
    output, elapsed = run_failing_job("-n", "2", str(SCRIPTS / "hang_on_rank.py"), "1")
    assert elapsed < 30, f"took {elapsed:.1f}s with a 3 s timeout"
    assert "rank(s) [1] never reached it" in output, output

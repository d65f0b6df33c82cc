"""The launcher: real processes, real failures, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.support.launching import alive, assert_reference, launch, wait_for_pids, write_pid_and_wait
from tests.support.paths import REPO, SCRIPTS
from trainloop import spawn

pytestmark = pytest.mark.multiprocess


def run_failing_job(*args: str, ends_within: float = 120) -> str:
    """Launch, wait, and return the output; the job must fail, and end by itself.

    `ends_within` is a generous bound, not a timing: a job whose surviving ranks are not stopped
    waits in its collective for torch's default timeout (minutes), or for a hung rank's 600 s
    sleep, far beyond it. No test asserts how fast a loaded machine runs.
    """
    job = launch(*args)
    try:
        output, _ = job.communicate(timeout=ends_within)
    except subprocess.TimeoutExpired:
        job.kill()
        output, _ = job.communicate()
        pytest.fail(f"the job did not end within {ends_within} s:\n{output}")
    assert job.returncode != 0, output
    return output


def test_a_rank_that_raises_ends_the_job_quickly_naming_it():
    output = run_failing_job("-n", "2", str(SCRIPTS / "fail_on_rank.py"), "1")
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
        assert not alive(pid), f"worker {pid} outlived the launcher:\n{output}"


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
    for flag in ("--nproc", "--nnodes", "--node-rank", "--master", "--max-restarts", "--join-timeout", "--config",
                 "--precision", "--accumulate", "--strategy", "--seed", "--log-every", "--compile",
                 "--timeout", "--device"):
        assert flag in output
    assert "(default: fp32)" in output and "(default: 1)" in output
    assert "(default: None)" not in output  # each flag states its default once, in its own words


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
    output = run_failing_job("-n", "2", str(SCRIPTS / "hang_on_rank.py"), "1")  # a 3 s timeout, a 600 s hang
    assert "rank(s) [1] never reached it" in output, output


def test_workers_die_with_a_launcher_killed_by_sigkill(tmp_path):
    """Nothing can stop the workers of a SIGKILLed launcher but the kernel (PR_SET_PDEATHSIG):
    script workers (`python -m trainloop.spawn`) and function workers (`spawn.run`) alike."""
    scripts, functions = tmp_path / "scripts", tmp_path / "functions"
    scripts.mkdir(), functions.mkdir()
    script_job = launch("-n", "2", str(SCRIPTS / "wait_forever.py"), str(scripts))
    code = ("from tests.support.launching import write_pid_and_wait; from trainloop import spawn; "
            f"spawn.run(write_pid_and_wait, {str(functions)!r}, n=2)")
    # `python -c` imports from its working directory: the repository root holds tests.support.
    function_job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, cwd=REPO)
    jobs = [script_job, function_job]
    pids = wait_for_pids(scripts, 2, jobs) + wait_for_pids(functions, 2, jobs)
    for job in jobs:
        job.kill()
        job.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)  # leave no orphans behind, even when the test fails
    assert not survivors, f"workers {survivors} outlived their SIGKILLed launcher by 10 s"


def _seen(output: str) -> dict:
    [line] = [line for line in output.splitlines() if line.startswith("seen ")]
    return json.loads(line[len("seen "):])


def test_the_scripts_own_flags_reach_it_untouched_as_python_would_pass_them():
    """spawn reads its flags up to the script's name, with no prefix matching (`--n` is not
    `--nproc`), and the script runs as `python script.py` (or `python -m module`) runs it."""
    script = launch("-n", "1", str(SCRIPTS / "show_argv.py"), "--n", "40", "-n", "3", "--precision",
                    "bf16", "-m", "x", "--", "y")
    module = launch("-n", "1", "-m", "show_argv", "--nproc", "3", cwd=SCRIPTS)
    script_output, _ = script.communicate(timeout=120)
    module_output, _ = module.communicate(timeout=120)
    assert script.returncode == 0 and module.returncode == 0, script_output + module_output
    as_script, as_module = _seen(script_output), _seen(module_output)
    assert as_script == {"argv": [str(SCRIPTS / "show_argv.py"), "--n", "40", "-n", "3", "--precision",
                                  "bf16", "-m", "x", "--", "y"],
                         "path0": str(SCRIPTS), "name": "__main__", "file": str(SCRIPTS / "show_argv.py"),
                         "world_size": 1, "precision": "fp32"}
    assert as_module == {"argv": [str(SCRIPTS / "show_argv.py"), "--nproc", "3"],
                         "path0": str(SCRIPTS), "name": "__main__", "file": str(SCRIPTS / "show_argv.py"),
                         "world_size": 1, "precision": "fp32"}


def _command_line_error(capsys, *argv: str) -> str:
    """Run spawn's command line here; it must refuse with exit code 2 and a one-line error."""
    with pytest.raises(SystemExit) as stop:
        spawn.main(list(argv))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m trainloop.spawn: error: "), err
    return err


@pytest.mark.parametrize(("content", "message"), [
    (None, r"--config .*missing.toml: No such file or directory"),
    ("nproc = = 2", r"--config .*run.toml is not valid TOML: .*line 1"),
    ("nproc = 2\nprecison = 'bf16'", r"--config .*run.toml: unknown key\(s\) \['precison'\]"),
    ("nproc = 0", r"--nproc must be an integer >= 1 \(got 0\)"),
    ("nproc = true", r"--nproc must be an integer >= 1 \(got True\)"),
    ("timeout = nan", r"timeout must be a finite number \(got nan\)"),
])
def test_a_bad_config_file_is_a_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / ("missing.toml" if content is None else "run.toml")
    if content is not None:
        path.write_text(content)
    assert re.search(message, _command_line_error(capsys, "--config", str(path), str(SCRIPTS / "show_argv.py")))


@pytest.mark.parametrize(("flags", "message"), [
    (["-n", "0"], r"--nproc must be an integer >= 1 \(got 0\)"),
    (["-n", "two"], r"--nproc must be an integer >= 1 \(got 'two'\)"),
    (["--nnodes", "0"], r"--nnodes must be an integer >= 1"),
    (["--max-restarts", "-1"], r"--max-restarts must be an integer >= 0"),
    (["--nnodes", "2", "--node-rank", "2", "--master", "127.0.0.1:29500"], r"--node-rank must be below --nnodes 2"),
    (["--nnodes", "2", "--master", "127.0.0.1"], r"--master must be HOST:PORT"),
    (["--nnodes", "2"], r"--nnodes > 1 needs --master HOST:PORT"),
    (["--n", "2"], r"unrecognized arguments: --n"),  # no prefix matching
    (["--timeout", "nan"], r"timeout must be a finite number"),
    (["--timeout", "abc"], r"timeout must be a number \(got 'abc'\)"),
    (["--seed", str(2**64)], r"seed must be at most 2\*\*63 - 1"),
])
def test_bad_flags_are_one_line_errors(capsys, flags, message):
    assert re.search(message, _command_line_error(capsys, *flags, str(SCRIPTS / "show_argv.py")))


def test_bad_trainloop_variables_already_set_are_refused_before_any_worker_starts(tmp_path, capsys, monkeypatch):
    script = str(SCRIPTS / "show_argv.py")
    monkeypatch.setenv("TRAINLOOP_ACCUMULATE", "0")
    assert "TRAINLOOP_ACCUMULATE: accumulate must be a number >= 1 (got 0)" in _command_line_error(capsys, "-n", "2", script)
    with pytest.raises(ValueError, match=r"TRAINLOOP_ACCUMULATE: accumulate must be a number >= 1"):
        spawn.run(write_pid_and_wait, str(tmp_path), n=2)
    assert not list(tmp_path.iterdir())  # no worker started
    # A flag replaces the variable, so the variable's value does not matter then.
    monkeypatch.setenv("TRAINLOOP_TIMEOUT", "nan")
    assert "TRAINLOOP_TIMEOUT: timeout must be a finite number" in _command_line_error(capsys, "--accumulate", "2", script)
    monkeypatch.setenv("TRAINLOOP_TIMEOUT", "30")
    monkeypatch.setenv("TRAINLOOP_PRECISON", "bf16")
    assert "unknown environment variable TRAINLOOP_PRECISON" in _command_line_error(capsys, "--accumulate", "2", script)


def test_a_function_the_workers_cannot_import_is_refused_before_any_worker_starts():
    with pytest.raises(TypeError, match="lambda or a nested function"):
        spawn.run(lambda: 1, n=2)
    # A function of a notebook cell (or `python -c`) lives in a __main__ without a file.
    code = ("from trainloop import spawn\n"
            "def train(): return 1\n"
            "try:\n    spawn.run(train, n=2)\n"
            "except TypeError as error:\n    print(error)\n")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "defined in a notebook cell" in shown.stdout, shown.stderr


def test_a_mapping_setting_reaches_the_workers_as_json(monkeypatch):
    seen = {}
    with spawn._launcher_scope({"tp_plan": {"blocks.*.up": "colwise"}}, 1):
        seen.update(os.environ)
    assert json.loads(seen["TRAINLOOP_TP_PLAN"]) == {"blocks.*.up": "colwise"}

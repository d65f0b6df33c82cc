"""The launcher: real processes, real failures, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.support.launching import alive, assert_reference, launch, wait_for_pids, write_pid_and_wait
from tests.support.paths import REPO, SCRIPTS
from trainloop import spawn
from trainloop.spawn import checks
from trainloop.spawn import job as launcher

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
    # The traceback starts at the script, as python's own would: no launcher frames above it.
    traceback = output[output.index("Traceback"):output.index("RuntimeError: deliberate")]
    assert "runpy" not in traceback and "worker.py" not in traceback and "fail_on_rank.py" in traceback, output


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
    script.write_text("import trainloop as tl\ns = tl.init(accumulate=2)\n"  # one write per line: ranks never interleave
                      "c = s.config\n"
                      "print(f'settings {s.rank} {s.world_size} {c.precision} {c.accumulate}\\n', end='', flush=True)\n"
                      "tl.finish(s)\n")
    job = launch("--config", str(config), "--accumulate", "5", str(script))
    output, _ = job.communicate(timeout=60)
    assert job.returncode == 0, output
    assert "settings 0 2 bf16 5" in output and "settings 1 2 bf16 5" in output
    assert output.count("TRAINLOOP_ACCUMULATE=5 overrides init(accumulate=2)") == 1, output  # once per job


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
    # The mesh against -n x --nnodes, before any worker starts (each used to fail in the workers).
    (["--strategy", "fsdp", "--dp-replicate", "3", "-n", "2"],
     r"dp_replicate=3 = 3 does not divide the world size 2 \(-n 2 x --nnodes 1\)"),
    (["--strategy", "fsdp", "--dp-shard", "4", "-n", "2"], r"dp_shard=4 = 4 does not divide the world size 2"),
    (["--strategy", "fsdp", "--dp-replicate", "2", "--dp-shard", "2", "--tp", "2", "-n", "2", "--nnodes", "2",
      "--master", "127.0.0.1:29500"], r"dp_replicate=2 x dp_shard=2 x tp=2 = 8, not the world size 4 \(-n 2 x --nnodes 2\)"),
    (["--strategy", "ddp", "--tp", "2", "-n", "2"], r"tp=2 need strategy='fsdp'"),
])
def test_bad_flags_are_one_line_errors(capsys, flags, message):
    assert re.search(message, _command_line_error(capsys, *flags, str(SCRIPTS / "show_argv.py")))


def test_mesh_settings_the_scripts_init_could_still_complete_are_not_refused(monkeypatch):
    # A setting not given to spawn may come from the script's init(strategy="fsdp", dp_shard=2).
    assert checks.validated_settings({"tp": "2"}, world=(4, 1)) == {"tp": 2}
    assert checks.validated_settings({"strategy": "fsdp", "tp": "2", "dp_replicate": "2"}, world=(8, 1))
    monkeypatch.setenv("TRAINLOOP_DP_REPLICATE", "3")  # a variable already set counts as given
    with pytest.raises(ValueError, match=r"dp_replicate=3 = 3 does not divide the world size 4"):
        checks.validated_settings({"strategy": "fsdp"}, world=(4, 1))


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
    with launcher.launcher_scope({"tp_plan": {"blocks.*.up": "colwise"}}, 1):
        seen.update(os.environ)
    assert json.loads(seen["TRAINLOOP_TP_PLAN"]) == {"blocks.*.up": "colwise"}


def fail_on_rank(*, rank: int) -> None:
    """A `spawn.run` worker: rank `rank` raises (naming its seed setting); the others wait for
    it in a collective and fail when it dies."""
    import trainloop as tl

    state = tl.init()
    if state.rank == rank:
        raise RuntimeError(f"deliberate failure on rank {rank} (seed {state.config.seed})")
    tl.barrier(state)
    tl.finish(state)


def _job_dirs(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("trainloop-spawn-*"))


def test_spawn_run_names_the_rank_that_failed_first_every_time_and_leaves_no_temporary_folder(
        tmp_path, monkeypatch):
    """The victim (rank 0, whose barrier fails when rank 1 dies) used to be named in about half
    the launches; keywords reach fn and `settings=` reaches tl.init on the way."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the launcher makes its folder
    for attempt in range(3):
        with pytest.raises(ChildFailedError) as failed:
            spawn.run(fail_on_rank, rank=1, n=2, settings={"seed": 7})
        rank, _ = failed.value.get_first_failure()
        assert rank == 1 and "deliberate failure on rank 1 (seed 7)" in str(failed.value), (attempt, failed.value)
        assert not _job_dirs(tmp_path), attempt


def add(a, b, *, scale=1):
    return (a + b) * scale


def test_spawn_run_refuses_at_once_what_the_workers_could_not_run(tmp_path):
    with pytest.raises(TypeError, match=r"spawn.run needs a function .* got 42 \(int\)"):
        spawn.run(42, n=2)
    with pytest.raises(TypeError, match=r"to run a script: python -m trainloop.spawn"):
        spawn.run("train.py", n=2)
    with pytest.raises(TypeError, match=r"do not fit add\(a, b, \*, scale=1\): .*'c'.*settings="):
        spawn.run(add, 1, 2, c=3, n=2)
    with pytest.raises(TypeError, match=r"do not fit add.*missing a required argument: 'b'"):
        spawn.run(add, 1, n=2)
    # Keywords that fn does not take but that name run settings are settings, as they always were.
    assert checks.split_keywords(add, (1, 2), {"scale": 3, "accumulate": 2, "fsdp_blocks": "Block"}) == (
        {"scale": 3}, {"accumulate": 2, "fsdp_blocks": "Block"})  # an old setting name too
    with pytest.raises(ValueError, match=r"accumulate must be a number >= 1"):
        spawn.run(add, 1, 2, accumulate=0, n=2)


def test_a_script_that_calls_spawn_run_without_the_main_guard_gets_one_line_naming_it(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      "from tests.spawn.test_spawn import add\nfrom trainloop import spawn\n"
                      "print(spawn.run(add, 1, 2, n=2))\n")
    guarded = tmp_path / "guarded.py"
    guarded.write_text(script.read_text().replace("print(", "def main():\n    print(").replace("n=2", "n=1")
                       + "\nif __name__ == '__main__':\n    main()\n")
    shown = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 1 and shown.stdout == "", shown.stdout + shown.stderr
    last = shown.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: spawn.run was called at the top level of") and \
        'if __name__ == "__main__":' in last, shown.stderr
    assert "bootstrapping" not in shown.stderr and len(shown.stderr.splitlines()) < 12, shown.stderr
    shown = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout == "3\n", shown.stdout + shown.stderr


def test_a_script_that_never_calls_init_is_warned_about_once_by_the_launcher(tmp_path):
    alone = tmp_path / "alone.py"
    alone.write_text("print('trained alone', flush=True)\n")
    job = launch("-n", "2", str(alone))
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0 and output.count("trained alone") == 2, output
    warnings = [line for line in output.splitlines() if "ended without calling tl.init" in line]
    assert warnings == ["trainloop.spawn: warning: rank(s) 0, 1 of 2 ended without calling tl.init, so each "
                        "ran the script on its own (on all the data) instead of as one job: call `state = "
                        "tl.init()` in the script before training (a script that joins a process group of "
                        "its own and leaves it again may ignore this)"], output


def test_the_folder_of_a_launcher_killed_by_sigkill_is_removed_by_the_next_launch(tmp_path, monkeypatch):
    """A SIGKILLed launcher cannot clean up; its lock dies with it, and the next launch sweeps."""
    job = launch("-n", "1", str(SCRIPTS / "wait_forever.py"), str(tmp_path), env={**os.environ, "TMPDIR": str(tmp_path)})
    wait_for_pids(tmp_path, 1, [job])
    [left] = _job_dirs(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with launcher.launcher_scope({}, 1) as ours:  # the folder of a running job is never swept
        assert _job_dirs(tmp_path) == sorted([left, Path(ours).name])
    job.kill()
    job.communicate(timeout=30)
    with launcher.launcher_scope({}, 1) as ours:
        assert _job_dirs(tmp_path) == [Path(ours).name]
    assert not _job_dirs(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check of a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_refused_by_init_and_before_any_worker_starts(
        tmp_path, capsys, monkeypatch):
    import trainloop as tl

    no_cuda = r"device '(cuda|cuda:3)' was requested but torch finds no cuda device on this machine"
    for device in ("cuda", "cuda:3"):  # one message for both (cuda:3 was torch's AssertionError)
        with pytest.raises(ValueError, match=no_cuda):
            tl.init(device=device)
    script = str(SCRIPTS / "show_argv.py")
    assert re.search(no_cuda, _command_line_error(capsys, "-n", "2", "--device", "cuda:3", script))
    monkeypatch.setenv("TRAINLOOP_DEVICE", "cuda")
    assert re.search("TRAINLOOP_DEVICE: " + no_cuda, _command_line_error(capsys, "-n", "2", script))
    with pytest.raises(ValueError, match="TRAINLOOP_DEVICE: " + no_cuda):
        spawn.run(write_pid_and_wait, str(tmp_path), n=2)
    monkeypatch.delenv("TRAINLOOP_DEVICE")
    with pytest.raises(ValueError, match=no_cuda):
        spawn.run(write_pid_and_wait, str(tmp_path), n=2, settings={"device": "cuda"})
    assert not list(tmp_path.iterdir())  # no worker started


def test_a_device_index_beyond_the_machines_devices_is_refused_naming_them():
    from trainloop.topology import check_device

    expected = (r"has \d+ cuda device\(s\), cuda:0 to cuda:\d+" if torch.cuda.is_available()
                else "finds no cuda device")
    with pytest.raises(ValueError, match=r"device 'cuda:99' was requested but .*" + expected):
        check_device("cuda:99")
    assert check_device("cpu") == torch.device("cpu")

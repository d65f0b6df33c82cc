"""The small tools: tl.any/all, gather_object, pad, find_batch_size, Throughput, Profile, `python -m trainloop env`.

The multi-process checks share one 2-process start-up (tests/core/tools_workers.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.paths import REPO
from tests.support.reference import TokenData, mse, regression_data, tiny_model, token_loss_sum
from trainloop import spawn
from trainloop.callbacks import JSONLines, Profile, Throughput
from trainloop.callbacks.throughput import peak_bf16_flops, peak_bf16_flops_of

# -- one process -------------------------------------------------------------------------------

def test_any_all_gather_object_pad_on_one_process_are_the_local_answer():
    state = tl.init()
    assert tl.any(state, True) is True and tl.any(state, False) is False
    assert tl.all(state, torch.tensor([True, False])) is False
    assert tl.any(state, torch.tensor([[False], [True]])) is True
    assert tl.gather_object(state, {"a": 1}) == [{"a": 1}]
    tensor = torch.ones(2, 3)
    assert tl.pad(state, tensor, dim=1) is tensor


def test_any_all_refuse_what_is_not_a_bool():
    state = tl.init()
    with pytest.raises(TypeError, match="bool tensor"):
        tl.any(state, torch.tensor([1.0]))
    with pytest.raises(TypeError, match="got int"):
        tl.all(state, 1)


def test_pad_refuses_a_dim_out_of_range_and_a_scalar():
    state = tl.init()
    with pytest.raises(ValueError, match="dim 2 is out of range for a 2-dim tensor"):
        tl.pad(state, torch.ones(2, 3), dim=2)
    with pytest.raises(TypeError, match="at least one dim"):
        tl.pad(state, torch.tensor(1.0))


def pretend_memory(limit: int, tried: list[int], error=torch.OutOfMemoryError):
    def fn(batch_size: int) -> str:
        tried.append(batch_size)
        if batch_size > limit:
            raise error(f"CUDA out of memory. Tried to allocate {batch_size} GiB")
        return f"trained with {batch_size}"
    return fn


def test_find_batch_size_halves_on_out_of_memory_and_returns_the_size_and_the_result():
    tried: list[int] = []
    assert tl.find_batch_size(pretend_memory(20, tried), 128) == (16, "trained with 16")
    assert tried == [128, 64, 32, 16]


def test_find_batch_size_also_halves_on_runtime_errors_that_mean_out_of_memory():
    tried: list[int] = []
    assert tl.find_batch_size(pretend_memory(3, tried, RuntimeError), 12)[0] == 3
    assert tried == [12, 6, 3]


def test_find_batch_size_lets_other_errors_through_at_once():
    tried: list[int] = []

    def broken(batch_size):
        tried.append(batch_size)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        tl.find_batch_size(broken, 64)
    assert tried == [64]


def test_find_batch_size_raises_out_of_memory_when_even_one_does_not_fit():
    tried: list[int] = []
    with pytest.raises(torch.OutOfMemoryError, match="batch size 1 still ran out of memory"):
        tl.find_batch_size(pretend_memory(0, tried), 5)
    assert tried == [5, 2, 1]
    with pytest.raises(ValueError, match="start must be an integer >= 1"):
        tl.find_batch_size(pretend_memory(0, tried), 0)


def flops_of_tiny_model(batch: int) -> int:
    """FLOPs of tiny_model's forward and backward on `batch` samples: its two matmuls' 2*m*k*n each.

    Forward: 6->16 and 16->3. Backward: the second layer's input and weight gradients, the first
    layer's weight gradient only (its input, the data, needs no gradient).
    """
    first, second = 2 * batch * 6 * 16, 2 * batch * 16 * 3
    return (first + second) + (2 * second + first)


def train_tiny(tmp_path, callbacks, *, steps_of: int = 64, tokens: bool = False, log_every: int = 2):
    state = tl.init(accumulate=2, log_every=log_every, callbacks=[*callbacks, JSONLines(tmp_path / "m.jsonl")])
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dataset = TokenData(steps_of) if tokens else regression_data(steps_of)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, DataLoader(dataset, batch_size=4))
    for batch in loader:
        with tl.accumulate(state, model):
            if tokens:
                x, y, mask = batch
                loss = token_loss_sum(model, x, y, mask)
                state = tl.backward(state, loss, num_items=mask.sum())
            else:
                loss = mse(model, *batch)
                state = tl.backward(state, loss)
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=loss)
    tl.finish(state)
    return [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]


def test_throughput_reaches_the_trackers_with_the_loss_and_leaves_the_loss_as_it_was(tmp_path):
    throughput = Throughput(peak_flops=2e9)
    with_it = train_tiny(tmp_path / "a", [throughput])
    without = train_tiny(tmp_path / "b", [])
    assert [(r["step"], r["loss"]) for r in with_it] == [(r["step"], r["loss"]) for r in without]
    # 16 batches, windows of 2: 8 steps, reports every 2. The first step is counted, not timed.
    assert [r["step"] for r in with_it] == [2, 4, 6, 8]
    assert throughput.flops_per_step == 2 * flops_of_tiny_model(4)  # two micro-batches of 4
    for record in with_it:
        samples, tflops = record["throughput/samples_per_sec"], record["throughput/tflops_per_sec"]
        assert samples > 0
        # Both over the same seconds: their ratio is samples per step over FLOPs per step.
        assert samples / tflops == pytest.approx(8 * 1e12 / throughput.flops_per_step, rel=1e-6)
        assert record["throughput/mfu"] == pytest.approx(tflops * 1e12 / 2e9, rel=1e-6)
        assert "memory/max_allocated_gb" not in record  # the CPU: no accelerator memory


def test_throughput_counts_tokens_from_num_items(tmp_path):
    records = train_tiny(tmp_path, [Throughput(flops_per_step=1e6)], tokens=True)
    masks = [TokenData(64)[i][2] for i in range(64)]
    tokens_of_step = [int(sum(m.sum() for m in masks[8 * s:8 * s + 8])) for s in range(8)]  # 8 samples a step
    first = records[0]  # step 2: the window of step 2 alone (step 1 started the clock)
    ratio = first["throughput/tokens_per_sec"] / first["throughput/samples_per_sec"]
    assert ratio == pytest.approx(tokens_of_step[1] / 8, rel=1e-6)
    second = records[1]  # step 4: steps 3 and 4
    ratio = second["throughput/tokens_per_sec"] / second["throughput/samples_per_sec"]
    assert ratio == pytest.approx((tokens_of_step[2] + tokens_of_step[3]) / 16, rel=1e-6)
    assert "throughput/mfu" not in first  # no peak known for the CPU


def test_throughput_refuses_bad_settings():
    with pytest.raises(ValueError, match="tokens must be"):
        Throughput(tokens="words")
    with pytest.raises(ValueError, match="peak_flops must be a positive number"):
        Throughput(peak_flops=0)


def test_peak_flops_table_matches_the_specific_name_first():
    assert peak_bf16_flops_of("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops_of("NVIDIA H200") == 989e12
    assert peak_bf16_flops_of("NVIDIA H20") == 148e12
    assert peak_bf16_flops_of("NVIDIA GB200") == 2.5e15
    assert peak_bf16_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops_of("AMD Instinct MI300X") == 1307e12
    assert peak_bf16_flops_of("NVIDIA GeForce GTX 1080") is None  # unknown: no guess
    assert peak_bf16_flops(torch.device("cpu")) is None


def test_profile_writes_a_tensorboard_trace_of_the_active_steps(tmp_path):
    profile = Profile(tmp_path / "trace", wait=1, warmup=1, active=2)
    train_tiny(tmp_path, [profile])
    traces = list((tmp_path / "trace").glob("*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("ProfilerStep#2" in event.get("name", "") for event in events)  # the active steps
    assert any("aten::addmm" in event.get("name", "") for event in events)  # the model's work
    assert profile._profiler is None  # stopped after the last active step


def test_profile_refuses_bad_schedules(tmp_path):
    with pytest.raises(ValueError, match="active must be an integer >= 1"):
        Profile(tmp_path, active=0)


# -- python -m trainloop env ------------------------------------------------------------------

@pytest.mark.slow  # a child process
def test_env_reports_versions_devices_backends_and_the_launch_variables():
    env = {**os.environ, "TRAINLOOP_PRECISION": "bf16", "MASTER_PORT": "29512", "OMP_NUM_THREADS": "1",
           "WANDB_API_KEY": "secret-key-never-printed"}
    done = subprocess.run([sys.executable, "-m", "trainloop", "env"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"torch {torch.__version__}" in out and f"trainloop {tl.__version__}" in out
    assert "gloo: yes" in out and "nccl:" in out and "mpi:" in out
    assert "TRAINLOOP_PRECISION=bf16" in out and "MASTER_PORT=29512" in out and "OMP_NUM_THREADS=1" in out
    assert "secret-key" not in out  # only the variables that matter for a bug report


@pytest.mark.slow  # a child process
def test_env_as_json_holds_the_same_facts_and_imports_no_optional_library():
    code = ("import contextlib, io, json, sys; from trainloop import env; out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out): env.main(['--json'])\n"
            "print(json.dumps({'report': json.loads(out.getvalue()), 'imported': sorted(m for m in "
            "('transformers', 'tensorboard', 'wandb', 'mlflow', 'torchao', 'accelerate') if m in sys.modules)}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=True)
    found = json.loads(done.stdout)
    assert found["imported"] == []
    report = found["report"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["backends"]["gloo"] is True
    assert report["devices"]["accelerator"] in (None, "cuda", "mps", "xpu", "hpu", "mtia")


# -- two processes ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from tests.core.tools_workers import tool_checks

    directory = tmp_path_factory.mktemp("tools")
    results = spawn.run(tool_checks, str(directory), n=2)
    results["metrics"] = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return results


@pytest.mark.multiprocess
def test_one_ranks_flag_reaches_every_rank(two_ranks):
    for rank in two_ranks["ranks"]:
        assert rank["flags"] == {"any_one_rank_true": True, "all_one_rank_true": False,
                                 "all_every_rank_true": True, "any_no_rank_true": False,
                                 "any_tensor": True, "all_tensor": False}


@pytest.mark.multiprocess
def test_gather_object_lists_every_ranks_object_in_rank_order(two_ranks):
    expected = [{"rank": 0, "text": "x"}, {"rank": 1, "text": "xx"}]
    assert [rank["objects"] for rank in two_ranks["ranks"]] == [expected, expected]


@pytest.mark.multiprocess
def test_pad_pads_to_the_longest_rank_along_any_dim(two_ranks):
    rank0, rank1 = (rank["pads"] for rank in two_ranks["ranks"])
    torch.testing.assert_close(rank0["padded"], torch.tensor([[1.0, 1, 1, -1]] * 2))
    torch.testing.assert_close(rank1["padded"], torch.full((2, 4), 2.0))
    torch.testing.assert_close(rank0["last_dim"], torch.tensor([[1.0, 1, 1, 0]] * 2))
    torch.testing.assert_close(rank0["rows"], torch.tensor([0, 7]))
    torch.testing.assert_close(rank1["rows"], torch.tensor([0, 1]))
    torch.testing.assert_close(rank0["gathered_after_pad"], torch.cat([rank0["padded"], rank1["padded"]]))
    for pads in (rank0, rank1):  # the same clear error on every rank, not a hang
        assert "different numbers of dims" in pads["mismatch"]


@pytest.mark.multiprocess
def test_find_batch_size_agrees_across_ranks_on_the_size_every_rank_fits(two_ranks):
    rank0, rank1 = (rank["batch_sizes"] for rank in two_ranks["ranks"])
    assert rank0["found"] == (8, "rank 0 ran 8") and rank1["found"] == (8, "rank 1 ran 8")
    assert rank0["tried"] == rank1["tried"] == [64, 32, 16, 8]


@pytest.mark.multiprocess
def test_throughput_reports_the_whole_jobs_samples_and_the_per_device_flops(two_ranks):
    flops = two_ranks["ranks"][0]["flops_per_step"]
    assert flops == 2 * flops_of_tiny_model(4)  # this rank's two micro-batches of 4
    assert two_ranks["ranks"][1]["flops_per_step"] == flops
    records = two_ranks["metrics"]
    assert [r["step"] for r in records] == [2, 4]  # 64 samples, 2 ranks x 4, windows of 2: 4 steps
    for record in records:
        # Samples/s summed over 2 ranks of 8 samples a step; FLOP/s per device: ratio 2 x 8 / flops.
        ratio = record["throughput/samples_per_sec"] / record["throughput/tflops_per_sec"]
        assert ratio == pytest.approx(2 * 8 * 1e12 / flops, rel=1e-6)
        assert record["throughput/mfu"] == pytest.approx(record["throughput/tflops_per_sec"], rel=1e-6)
        assert "loss" in record


@pytest.mark.multiprocess
def test_profile_traces_on_the_main_process_only(two_ranks):
    files = two_ranks["ranks"][0]["profile_files"]
    assert len(files) == 1 and files[0].endswith(".pt.trace.json"), files


def test_throughput_does_not_guess_flops_under_torch_compile():
    state = tl.init(compile=True)
    throughput = Throughput()
    state = tl.attach(state, throughput)
    with pytest.warns(UserWarning, match="FLOPs cannot be counted under torch.compile"):
        tl.prepare(state, tiny_model())
    assert throughput.flops_per_step is None and throughput._hooks == []

"""Precision policies, loss scaling, clipping and torch.compile, checked against plain PyTorch.

The references are the loops PyTorch documents: `torch.autocast` around forward and loss,
`torch.amp.GradScaler` for fp16 (`scaler.unscale_` then `clip_grad_norm_` for clipping), the
loss divided by k for accumulation. trainloop normalises the accumulated gradients after the
backward instead, so results with k > 1 agree to rounding, not bit for bit.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainloop as tl
from tests.core.precision_workers import ACCUMULATE, CLIP, SCALER, micro_batches, sgd, two_rank_checks
from tests.support.paths import SCRIPTS
from tests.support.reference import mse, tiny_model
from trainloop import spawn
from trainloop.callbacks import ClipGradNorm, LossScale

RESUMABLE = SCRIPTS / "resumable.py"


# -- the loops -----------------------------------------------------------------------------------


def raw_fp16_loop(batches, accumulate: int, *, clip: float | None = None):
    """PyTorch's documented AMP loop: autocast, GradScaler, loss / k, unscale_ then clip."""
    model = tiny_model()
    optimizer = sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    record = {"scales": [], "norms": [], "skipped": []}
    for index, (x, y) in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = mse(model, x, y)
        scaler.scale(loss / accumulate).backward()
        if (index + 1) % accumulate:
            continue
        if clip is not None:
            scaler.unscale_(optimizer)
            record["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        skipped = scaler.get_scale() < scale  # GradScaler lowers the scale only when it skipped
        if not skipped:
            scheduler.step()
        record["scales"].append(scaler.get_scale())
        record["skipped"].append(skipped)
    return model, record, scheduler.last_epoch


def prepared_fp16(accumulate: int, callbacks: list):
    """`precision="fp16"`, the model, optimizer and scheduler of `raw_fp16_loop`, prepared."""
    state = tl.init(precision="fp16", accumulate=accumulate, callbacks=callbacks)
    model = tiny_model()
    optimizer = sgd(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    return tl.prepare(state, model, optimizer, scheduler)


def trainloop_fp16_loop(batches, accumulate: int, *, clip: float | None = None):
    """The same training with `precision="fp16"`: the user's loop has no scaler in it."""
    scaler = LossScale(**SCALER)
    clipper = ClipGradNorm(clip) if clip is not None else None
    state, model, optimizer, scheduler = prepared_fp16(accumulate, [scaler] if clipper is None else [scaler, clipper])
    record = {"scales": [], "norms": [], "skipped": []}
    for x, y in batches:
        state = tl.backward(state, mse(model, x, y))
        closes_window = state.window_micro_steps == accumulate
        skipped_before = scaler.skipped_steps
        state = tl.step(state, optimizer)
        if closes_window:
            record["scales"].append(scaler.scale)
            record["skipped"].append(scaler.skipped_steps > skipped_before)
            if clipper is not None:
                record["norms"].append(float(clipper.last_norm))
    return model, record, scheduler.last_epoch, state


def assert_close_weights(ours: nn.Module, reference: nn.Module, atol: float) -> None:
    for (name, p), q in zip(tl.unwrap(ours).named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=f"parameter {name} differs")


# -- fp16 and LossScale -------------------------------------------------------------------------


@pytest.mark.parametrize("accumulate", [1, 4, 3])
def test_fp16_equals_autocast_and_grad_scaler_loop_through_an_overflow(accumulate):
    batches = micro_batches(count=12 * accumulate, overflow_at=4 * accumulate)  # window 4 overflows
    reference, expected, reference_scheduler_steps = raw_fp16_loop(batches, accumulate)
    ours, record, scheduler_steps, state = trainloop_fp16_loop(batches, accumulate)
    assert expected["skipped"].count(True) == 1 and record["skipped"] == expected["skipped"]
    assert record["scales"] == expected["scales"]  # the backoff, then growth every 2 clean steps
    assert max(expected["scales"]) > SCALER["init_scale"]
    assert state.step == scheduler_steps == reference_scheduler_steps == 11  # 12 windows, 1 skipped
    # The raw loop backpropagates scale * loss / k, trainloop scale * loss and divides by k
    # after. The fp16 backward rounds the two differently (11 significant bits: ~5e-4 relative)
    # unless k is a power of two, where dividing by k is exact: then they agree bit for bit.
    exact = accumulate & (accumulate - 1) == 0
    assert_close_weights(ours, reference, atol=0 if exact else 1e-4)


def test_overflow_skips_the_optimizer_and_scheduler_step_and_halves_the_scale():
    scaler = LossScale(init_scale=2.0**10)
    state = tl.init(precision="fp16", accumulate=2, callbacks=[scaler])
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    state, model, optimizer, scheduler = tl.prepare(state, model, optimizer, scheduler)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = micro_batches(count=1, overflow_at=0)[0]
    for micro_batch in (x[:4], x[4:]):  # the inf is in the second micro-batch only
        state = tl.step(tl.backward(state, mse(model, micro_batch, y[:4])), optimizer)
    assert state.step == 0 and state.micro_step == 2 and not state.skip_step
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not optimizer.state and scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 1e-2
    assert all(p.grad is None for p in model.parameters())
    assert scaler.scale == 2.0**9 and scaler.skipped_steps == 1


def test_clip_with_fp16_and_accumulation_equals_unscale_then_clip_grad_norm():
    batches = micro_batches(count=24, overflow_at=7)  # k = 3: window 2 overflows
    reference, expected, _ = raw_fp16_loop(batches, 3, clip=CLIP)
    ours, record, _, _ = trainloop_fp16_loop(batches, 3, clip=CLIP)
    assert record["skipped"] == expected["skipped"] and record["skipped"][2]
    finite = [i for i, norm in enumerate(expected["norms"]) if torch.isfinite(torch.tensor(norm))]
    assert finite == [i for i, skipped in enumerate(expected["skipped"]) if not skipped]
    assert any(expected["norms"][i] > CLIP for i in finite)  # clipping really happened
    # k = 3: equal up to the fp16 backward's rounding of loss / k (see the test above).
    torch.testing.assert_close([record["norms"][i] for i in finite], [expected["norms"][i] for i in finite],
                               atol=0, rtol=1e-3)
    assert not torch.isfinite(torch.tensor(record["norms"][2]))  # the skipped window's norm, for logs
    assert_close_weights(ours, reference, atol=1e-4)


def test_loss_scale_state_round_trips_through_a_checkpoint(tmp_path):
    # Windows: clean, overflow (scale 512), clean, clean (growth: 1024), clean (1 in a row).
    _, _, _, state = trainloop_fp16_loop(micro_batches(count=5, overflow_at=1), 1)
    scaler = state.callbacks[0]
    tl.save(state, tmp_path / "ckpt")
    fresh = LossScale(**SCALER)
    restored, *_ = prepared_fp16(1, [fresh])
    restored = tl.load(restored, tmp_path / "ckpt")
    assert fresh.state_dict() == scaler.state_dict()
    assert scaler.state_dict() == {"scale": 2.0**10, "growth_tracker": 1, "skipped_steps": 1}
    assert restored.step == 4


# -- bf16, bf16-true, output dtypes -------------------------------------------------------------


def classification_batches(count: int = 6):
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(count)]


def test_bf16_equals_a_raw_autocast_loop():
    reference = tiny_model()
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for x, y in classification_batches():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # forward and loss, as PyTorch documents
            loss = F.cross_entropy(reference(x), y)
        loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)

    model = tiny_model()
    state, model, optimizer = tl.prepare(tl.init(precision="bf16"), model,
                                         torch.optim.AdamW(model.parameters(), lr=1e-2))
    for x, y in classification_batches():
        # The loss is computed outside autocast, on the fp32 outputs: the same fp32 loss.
        state = tl.step(tl.backward(state, F.cross_entropy(model(x), y)), optimizer)
    assert_close_weights(model, reference, atol=0)


def test_bf16_true_keeps_bf16_parameters_and_optimizer_state_and_equals_a_raw_bf16_loop():
    reference = tiny_model().bfloat16()
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for x, y in classification_batches():
        F.cross_entropy(reference(x.bfloat16()).float(), y).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)

    model = tiny_model()
    state, model, optimizer = tl.prepare(tl.init(precision="bf16-true"), model,
                                         torch.optim.AdamW(model.parameters(), lr=1e-2))
    for x, y in classification_batches():  # fp32 inputs, as the data comes
        output = model(x)
        state = tl.step(tl.backward(state, F.cross_entropy(output, y)), optimizer)
    assert output.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    moments = [s[key] for s in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.bfloat16}
    assert_close_weights(model, reference, atol=0)


class TwoHeads(nn.Module):
    """Outputs a pytree: a dict with a tuple, an integer tensor and a plain number."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 4)

    def forward(self, x):
        hidden = self.body(x)
        return {"heads": (hidden, hidden.softmax(-1)), "argmax": hidden.argmax(-1), "size": x.shape[0]}


@pytest.mark.parametrize("precision", ["bf16", "fp16", "bf16-true"])
def test_outputs_come_back_fp32_and_the_users_module_is_untouched(precision):
    module = TwoHeads()
    _, model = tl.prepare(tl.init(precision=precision), module)
    x = torch.randn(5, 6)
    out = model(x)
    hidden, probabilities = out["heads"]
    assert hidden.dtype == probabilities.dtype == torch.float32
    assert out["argmax"].dtype == torch.int64 and out["size"] == 5
    low = torch.float16 if precision == "fp16" else torch.bfloat16
    assert torch.equal(hidden, hidden.to(low).float())  # computed in low precision, then widened
    assert tl.unwrap(model) is module and type(module) is TwoHeads and "forward" not in vars(module)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_autocast_policies_refuse_a_half_precision_model(precision):
    with pytest.raises(ValueError, match=r"expects fp32 parameters.*bf16-true"):
        tl.prepare(tl.init(precision=precision), tiny_model().bfloat16())


# -- ClipGradNorm and LossScale: configuration errors ------------------------------------------


def test_bad_clip_and_scale_settings_are_refused():
    with pytest.raises(ValueError, match=r"ClipGradNorm needs max_norm > 0 \(got 0\)"):
        ClipGradNorm(max_norm=0)
    with pytest.raises(ValueError, match="growth_factor > 1"):
        LossScale(growth_factor=1.0)


def test_clipping_before_unscaling_is_refused():
    model = tiny_model()
    state = tl.init(precision="fp16", callbacks=[ClipGradNorm(1.0), LossScale()])
    with pytest.raises(ValueError, match=r"ClipGradNorm comes before LossScale.*put LossScale first"):
        tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_fp16_attaches_loss_scale_first():
    clip = ClipGradNorm(1.0)
    state = tl.init(precision="fp16", callbacks=[clip])
    assert isinstance(state.callbacks[0], LossScale) and state.callbacks[1] is clip


# -- fp8 -----------------------------------------------------------------------------------------


def digits_data() -> tuple[TensorDataset, TensorDataset]:
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # 1797 images of 8x8 = 64 features
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return TensorDataset(x[order[300:]], y[order[300:]]), TensorDataset(x[order[:300]], y[order[:300]])


def digits_mlp() -> nn.Module:
    torch.manual_seed(0)
    # 64 -> 128 -> 64 are float8-eligible; the 10-way head is not (10 is not a multiple of 16).
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def prepared_fp8(model: nn.Module, train: TensorDataset):
    return tl.prepare(tl.init(precision="fp8", seed=0), model, torch.optim.AdamW(model.parameters(), lr=3e-3),
                      DataLoader(train, batch_size=64, shuffle=True))


@pytest.mark.slow  # seconds of training
def test_fp8_converts_eligible_layers_learns_digits_and_round_trips_a_checkpoint(tmp_path):
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    train, held_out = digits_data()
    state, model, optimizer, loader = prepared_fp8(digits_mlp(), train)
    layers = [type(m) for m in tl.unwrap(model) if isinstance(m, nn.Linear)]
    assert layers == [Float8Linear, Float8Linear, nn.Linear]
    epoch_losses = []
    for _ in range(3):
        losses = []
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            state = tl.step(tl.backward(state, loss), optimizer)
            losses.append(loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    x, y = held_out.tensors
    model.eval()
    with torch.no_grad():
        outputs = model(x)
    accuracy = (outputs.argmax(-1) == y).float().mean().item()
    assert epoch_losses[-1] < 0.3 * epoch_losses[0] and accuracy > 0.85, (epoch_losses, accuracy)

    tl.save(state, tmp_path / "ckpt")
    fresh_state, fresh, *_ = prepared_fp8(digits_mlp().apply(_scramble), train)
    tl.load(fresh_state, tmp_path / "ckpt")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), outputs)


def _scramble(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight)


def test_fp8_warns_when_no_layer_is_eligible():
    pytest.importorskip("torchao")
    with pytest.warns(UserWarning, match="no nn.Linear layer with both dimensions divisible by 16"):
        tl.prepare(tl.init(precision="fp8"), tiny_model())  # 6 -> 16 -> 3


def test_fp8_without_torchao_names_the_extra_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without it imports
    with pytest.raises(ImportError, match=re.escape("pip install 'trainloop-torch[fp8]'")):
        tl.prepare(tl.init(precision="fp8"), digits_mlp())


# -- two ranks -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks():
    return spawn.run(two_rank_checks, n=2)


@pytest.mark.multiprocess
def test_two_ranks_fp16_skip_the_same_overflow_and_equal_the_big_batch_loop(two_ranks):
    rank0, rank1 = two_ranks["ddp_fp16"]
    assert rank0["skipped"] == rank1["skipped"] == [False, True, False, False]  # inf on rank 1 only
    assert rank0["scales"] == rank1["scales"] == [1024.0, 512.0, 512.0, 1024.0]
    assert rank0["step"] == rank0["scheduler_steps"] == 3
    assert rank0["norms"][0] == rank1["norms"][0] and rank0["norms"][0] > CLIP
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
    # One process, the same 8-row micro-batches: DDP's average over ranks is the big batch's mean.
    reference, expected, _ = raw_fp16_loop(micro_batches(), ACCUMULATE, clip=CLIP)
    assert expected["skipped"] == rank0["skipped"]
    # Equal up to fp16 rounding: the CPU's fp16 matmuls of 4 and of 8 rows may round differently.
    clean = [0, 2, 3]
    torch.testing.assert_close([rank0["norms"][i] for i in clean], [expected["norms"][i] for i in clean],
                               atol=0, rtol=1e-3)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(rank0["weights"][name], value, atol=1e-4, rtol=0, msg=name)


@pytest.mark.multiprocess
def test_an_overflow_in_one_ranks_fsdp2_shard_skips_the_step_on_every_rank(two_ranks):
    rank0, rank1 = two_ranks["fsdp2"]
    assert rank0["skipped"] == rank1["skipped"] == [False, True, False, False]
    assert rank0["step"] == rank1["step"] == 3
    assert rank0["scale"] == rank1["scale"] == 1024.0  # backed off to 512, then 2 clean steps
    # The clipped DTensor gradients equal one process's clip_grad_norm_ on the whole batch.
    reference = tiny_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    norms = []
    for index, (x, y) in enumerate(micro_batches(count=4, overflow_at=None)):
        mse(reference, x, y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)))
        if index != 1:  # the skipped step
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert rank0["norms"][1] == float("inf")
    torch.testing.assert_close([rank0["norms"][i] for i in (0, 2, 3)], [norms[i] for i in (0, 2, 3)],
                               atol=1e-6, rtol=1e-6)
    for name, value in reference.named_parameters():
        torch.testing.assert_close(rank0["weights"][name], value, atol=1e-6, rtol=0, msg=name)
        assert torch.equal(rank0["weights"][name], rank1["weights"][name])


# -- kill and resume -----------------------------------------------------------------------------


def run_resumable(checkpoints: Path, out: Path, *, kill_after_step: int | None = None) -> str:
    """resumable.py in fp16; SIGKILLed after the given step's line when asked. Returns its output."""
    command = [sys.executable, str(RESUMABLE), str(checkpoints), str(out), "--precision", "fp16"]
    if kill_after_step is None:
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        return done.stdout
    command += ["--slow", "0.5"]  # slow: the kill lands before the next checkpoint
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in job.stdout:
        if line.strip() == f"step {kill_after_step}":
            os.kill(job.pid, signal.SIGKILL)
            break
    job.wait(timeout=240)
    assert job.returncode == -signal.SIGKILL
    return ""


@pytest.mark.slow  # SIGKILLed children
def test_fp16_run_killed_and_resumed_ends_bit_identical_with_its_loss_scale(tmp_path):
    run_resumable(tmp_path / "whole", tmp_path / "whole.pt")
    run_resumable(tmp_path / "ckpt", tmp_path / "out.pt", kill_after_step=5)
    assert not (tmp_path / "out.pt").exists()  # it really died before the end
    assert "resumed_at 4" in run_resumable(tmp_path / "ckpt", tmp_path / "out.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert resumed["step"] == whole["step"] == 12 and resumed["lr"] == whole["lr"]
    for name, value in whole["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name
    for saved, restored in zip(whole["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert all(torch.equal(saved[key], restored[key]) for key in saved)
    assert torch.equal(resumed["draws"], whole["draws"])
    # 12 clean steps in a row: a LossScale not restored at step 4 would have counted 8.
    assert resumed["loss_scale"] == whole["loss_scale"] == {"scale": 2.0**16, "growth_tracker": 12,
                                                             "skipped_steps": 0}


# -- torch.compile -------------------------------------------------------------------------------


@pytest.mark.slow  # inductor's compile workers
def test_compile_gives_the_eager_weights():
    """Slow on a cold cache: inductor compiles C++ for the CPU (~15-30 s), a few seconds warm."""
    batches = micro_batches(count=6, overflow_at=None)
    runs = {}
    try:
        for compiled in (True, False):
            model = tiny_model()
            state, model, optimizer = tl.prepare(tl.init(precision="fp16", accumulate=2, compile=compiled),
                                                 model, torch.optim.AdamW(model.parameters(), lr=1e-2))
            for x, y in batches:
                state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
            runs[compiled] = model
    finally:
        torch._dynamo.reset()
    assert type(runs[True].module).__name__ == "OptimizedModule"  # inside autocast, as documented
    assert type(tl.unwrap(runs[True])) is type(tiny_model())
    assert_close_weights(runs[True], tl.unwrap(runs[False]), atol=1e-6)

"""The promises of the step functions that are not about arithmetic: a stale state never trains
silently, every logged value is reported, late callbacks are prepared, and the hooks act on
exactly the optimizers being stepped (GradScaler's per-optimizer semantics, against raw torch).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trainloop as tl
from tests.core.precision_workers import CLIP, SCALER, sgd
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Callback, Checkpoint, ClipGradNorm, LossScale
from trainloop.state import StaleStateError


def prepared(**settings):
    model = tiny_model()
    state, model, optimizer = tl.prepare(tl.init(**settings), model, torch.optim.SGD(model.parameters(), lr=0.1))
    return state, model, optimizer


class Reports(Callback):
    def __init__(self):
        self.reports = []

    def on_log(self, state, metrics):
        self.reports.append((state.step, metrics))


# -- a stale state raises, never trains nothing ---------------------------------------------------


def test_a_dropped_backward_result_raises_instead_of_silently_training_nothing():
    state, model, optimizer = prepared()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = regression_data(4).tensors
    tl.backward(state, mse(model, x, y))  # the result is dropped: `state` is stale now
    with pytest.raises(StaleStateError, match=r"stale.*did you write `state = tl\.backward\(state, loss\)`"):
        tl.step(state, optimizer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # nothing half-done


def test_every_function_that_moves_the_run_on_refuses_a_superseded_state(tmp_path):
    state, model, optimizer = prepared(log_every=1)
    x, y = regression_data(4).tensors
    new = tl.backward(state, mse(model, x, y))
    checks = {
        "backward": lambda s: tl.backward(s, mse(model, x, y)),
        "step": lambda s: tl.step(s, optimizer),
        "log": lambda s: tl.log(s, loss=1.0),
        "prepare": lambda s: tl.prepare(s, nn.Linear(2, 2)),
        "attach": lambda s: tl.attach(s, Callback()),
        "load": lambda s: tl.load(s, tmp_path / "ckpt"),
    }  # not finish: it is cleanup, and ends the run from its newest state (test_run_end.py)
    tl.save(new, tmp_path / "ckpt")
    for name, call in checks.items():
        with pytest.raises(StaleStateError, match=rf"tl\.{name} was given a state that a later call superseded"):
            call(state)
    # The read-only functions accept any state: an old one is a fine record of where the run was.
    assert tl.gather(state, torch.ones(2)).tolist() == [1.0, 1.0]
    assert tl.reduce(state, {"a": 2.0}) == {"a": 2.0}
    tl.save(state, tmp_path / "old")
    with tl.accumulate(state, model):
        pass
    # Each function's result is current, and supersedes the one before: the message names it.
    new = tl.step(new, optimizer)
    new = tl.log(new, loss=1.0)
    with pytest.raises(StaleStateError, match=r"newest is from tl\.log.*`state = tl\.log\(state, \.\.\.\)`"):
        tl.backward(state, mse(model, x, y))
    tl.finish(new)
    with pytest.raises(StaleStateError, match="tl.finish has ended"):
        tl.log(new, loss=1.0)


def test_a_copy_of_the_current_state_is_current_until_one_of_them_is_passed_on():
    state, model, optimizer = prepared()
    x, y = regression_data(4).tensors
    copy = state.evolve(skip_step=False)  # e.g. a hook's "unchanged" copy
    state = tl.backward(copy, mse(model, x, y))
    state = tl.step(state, optimizer)
    assert state.step == 1
    with pytest.raises(StaleStateError):
        tl.backward(copy, mse(model, x, y))


def test_a_checkpoint_resume_makes_the_restored_state_the_current_one(tmp_path):
    state, model, optimizer = prepared()
    x, y = regression_data(4).tensors
    state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
    tl.save(state, tmp_path / "ckpt")
    fresh, model2, _ = prepared()
    tl.load(fresh, tmp_path / "ckpt")  # dropped: `fresh` still says step 0
    with pytest.raises(StaleStateError, match=r"`state = tl\.load\(state, path\)`"):
        tl.backward(fresh, mse(model2, x, y))


# -- late callbacks and derived hooks -------------------------------------------------------------


def test_a_checkpoint_attached_after_prepare_still_resumes(tmp_path):
    x, y = regression_data(4).tensors
    state, model, optimizer = prepared()
    for _ in range(3):
        state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
    tl.save(state, tmp_path / "step-00000003")
    late, model2, _ = prepared()
    checkpoint = Checkpoint(tmp_path)
    late = tl.attach(late, checkpoint)
    assert late.step == 3 and checkpoint.restored_from == tmp_path / "step-00000003"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    late = tl.step(tl.backward(late, mse(model2, x, y)), late.optimizers[0])  # the restored state trains on
    assert late.step == 4


def test_evolve_with_new_callbacks_never_leaves_the_hooks_stale():
    reports = Reports()
    state, model, optimizer = prepared(log_every=1)
    assert state.hooks.on_log == ()
    state = state.evolve(callbacks=(reports,))
    assert state.hooks.on_log == (reports.on_log,)
    x, y = regression_data(4).tensors
    state = tl.log(tl.step(tl.backward(state, mse(model, x, y)), optimizer), loss=2.0)
    assert reports.reports == [(1, {"loss": 2.0})]
    assert state.evolve(callbacks=()).hooks.on_log == ()


# -- every logged value is reported --------------------------------------------------------------


def test_finish_always_reports_the_values_logged_after_the_last_report():
    reports = Reports()
    state, model, optimizer = prepared(log_every=2)
    state = tl.attach(state, reports)
    x, y = regression_data(4).tensors
    for _ in range(4):
        state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
        state = tl.log(state, loss=1.0)
    state = tl.log(state, val_acc=0.75)  # after the report at step 4, the last step
    tl.finish(state)
    assert reports.reports == [(2, {"loss": 1.0}), (4, {"loss": 1.0}), (4, {"val_acc": 0.75})]


# -- hooks act on exactly the optimizers being stepped -------------------------------------------


def gan_batches(count: int = 8, overflow_d: int = 2, overflow_g: int = 5):
    """(real x, noise z, loss factor of G) per iteration; iteration `overflow_d` has an inf in a
    real input (D's gradients overflow), iteration `overflow_g` a huge G loss (G's overflow, and
    the D gradients it leaves behind)."""
    generator = torch.Generator().manual_seed(11)
    batches = []
    for index in range(count):
        x, z = torch.randn(8, 6, generator=generator), torch.randn(8, 4, generator=generator)
        if index == overflow_d:
            x[-1, 0] = float("inf")
        batches.append((x, z, 1e30 if index == overflow_g else 1.0))
    return batches


def gan_models():
    torch.manual_seed(5)
    return nn.Linear(4, 6), tiny_model(seed=1)  # generator 4 -> 6, discriminator 6 -> 3


# fp32 targets: the loss arithmetic runs in fp32 in both loops (raw autocast leaves it to the
# operands' dtypes; trainloop's prepared models return fp32). One forward of each model per loss:
# raw autocast casts a weight once per region and sums two uses' gradients in fp16, a prepared
# model casts per call, so two calls would round differently (autocast's doing, not scaling's).
REAL = torch.ones(8, 3)
TARGETS = torch.cat([REAL, torch.zeros(8, 3)])


def d_loss(generator, discriminator, x, z):
    fake = generator(z).detach()
    return ((discriminator(torch.cat([x, fake])) - TARGETS) ** 2).mean()


def g_loss(generator, discriminator, z, factor):
    # The discriminator is not frozen: its gradients from this loss stay pending until its own
    # next step (they are not its optimizer's business here), as in the plain loop.
    return ((discriminator(generator(z)) - REAL) ** 2).mean() * factor


def raw_gan(batches, clip):
    """The loop of GradScaler's documentation for several optimizers: each optimizer unscaled and
    stepped by the scaler, one `update()` per iteration after both."""
    generator, discriminator = gan_models()
    opt_g, opt_d = sgd(generator), sgd(discriminator)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=1, gamma=0.9)
    sched_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=1, gamma=0.8)
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    scales, skipped = [], []
    for x, z, factor in batches:
        for loss_fn, model, opt, sched in (
                (lambda: d_loss(generator, discriminator, x, z), discriminator, opt_d, sched_d),
                (lambda: g_loss(generator, discriminator, z, factor), generator, opt_g, sched_g)):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            found_inf = sum(v.item() for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
            if not found_inf:
                sched.step()
            skipped.append(bool(found_inf))
            opt.zero_grad(set_to_none=True)
        scaler.update()
        scales.append(scaler.get_scale())
    return (generator, discriminator), scales, skipped, (sched_g.last_epoch, sched_d.last_epoch)


def trainloop_gan(batches, clip):
    scaler = LossScale(**SCALER)
    callbacks = [scaler] + ([ClipGradNorm(clip)] if clip is not None else [])
    state = tl.init(precision="fp16", callbacks=callbacks)
    generator, discriminator = gan_models()
    opt_g, opt_d = sgd(generator), sgd(discriminator)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, step_size=1, gamma=0.9)
    sched_d = torch.optim.lr_scheduler.StepLR(opt_d, step_size=1, gamma=0.8)
    state, generator, discriminator, *_ = tl.prepare(state, generator, discriminator, opt_g, opt_d, sched_g, sched_d)
    scales, skipped = [], []
    for x, z, factor in batches:
        for loss_fn, opt in ((lambda: d_loss(generator, discriminator, x, z), opt_d),
                             (lambda: g_loss(generator, discriminator, z, factor), opt_g)):
            state = tl.backward(state, loss_fn())
            before = state.step
            state = tl.step(state, opt)  # the scheduler of this optimizer only
            skipped.append(state.step == before)
        scales.append(scaler.scale)
    return (generator, discriminator), scales, skipped, (sched_g.last_epoch, sched_d.last_epoch), state


@pytest.mark.parametrize("clip", [None, CLIP])
def test_a_gan_stepped_by_separate_calls_equals_one_grad_scaler_with_two_optimizers_exactly(clip):
    batches = gan_batches()
    models, scales, skipped, scheduler_steps = raw_gan(batches, clip)
    ours, our_scales, our_skipped, our_scheduler_steps, state = trainloop_gan(batches, clip)
    assert skipped[2 * 2] and skipped[2 * 5 + 1]  # D's overflow, then G's: both really happened
    assert our_skipped == skipped and our_scales == scales and our_scheduler_steps == scheduler_steps
    assert max(scales) > SCALER["init_scale"]  # growth, counted in iterations, happened too
    assert state.step == 2 * len(batches) - skipped.count(True)
    for ours_model, raw_model in zip(ours, models):
        for p, q in zip(tl.unwrap(ours_model).parameters(), raw_model.parameters()):
            assert torch.equal(p, q)


def test_an_overflow_skips_only_the_optimizer_whose_gradients_overflowed():
    """Two optimizers in one `tl.step`: GradScaler steps the clean one and skips the other."""
    def models():
        torch.manual_seed(2)
        return nn.Linear(6, 3), nn.Linear(6, 3)

    def loss(a, b, x, y, poisoned):
        return mse(a, x, y) + mse(b, poisoned, y)

    generator = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)) for _ in range(4)]
    poisoned = [x.clone() for x, _ in batches]
    poisoned[1][0, 0] = float("inf")

    raw = models()
    raw_opts = [sgd(raw[0]), sgd(raw[1])]
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    for (x, y), bad in zip(batches, poisoned):
        with torch.autocast("cpu", dtype=torch.float16):
            scaled = scaler.scale(loss(*raw, x, y, bad))
        scaled.backward()
        for opt in raw_opts:
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()

    a, b = models()
    loss_scale = LossScale(**SCALER)
    state = tl.init(precision="fp16", callbacks=[loss_scale])
    state, a, b, opt_a, opt_b = tl.prepare(state, a, b, sgd(a), sgd(b))
    steps = []
    for (x, y), bad in zip(batches, poisoned):
        state = tl.step(tl.backward(state, loss(a, b, x, y, bad)))
        steps.append(state.step)
    assert steps == [1, 2, 3, 4]  # one optimizer stepped on the overflow: the run moved on
    assert loss_scale.scale == scaler.get_scale() and loss_scale.skipped_steps == 1
    assert len(opt_a.state) and len(opt_b.state)
    for ours, reference in zip((a, b), raw):
        for p, q in zip(tl.unwrap(ours).parameters(), reference.parameters()):
            assert torch.equal(p, q)


def test_hooks_see_the_optimizers_being_stepped_and_may_only_narrow_them():
    seen = []

    class Watch(Callback):
        def on_before_step(self, state):
            seen.append(("before", state.stepping))

        def on_step(self, state):
            seen.append(("step", state.stepping))

    class Widen(Callback):
        def on_before_step(self, state):
            return state.evolve(stepping=state.optimizers)

    a, b = nn.Linear(6, 3), nn.Linear(6, 3)
    state = tl.init(callbacks=[Watch()])
    state, a, b, opt_a, opt_b = tl.prepare(state, a, b, sgd(a), sgd(b))
    x, y = regression_data(4).tensors
    state = tl.step(tl.backward(state, mse(a, x, y)), opt_a)
    assert seen == [("before", (opt_a,)), ("step", (opt_a,))] and state.stepping == ()
    state = tl.attach(state, Widen())
    with pytest.raises(ValueError, match="hooks may only remove optimizers"):
        tl.step(tl.backward(state, mse(a, x, y)), opt_a)


def test_a_scheduler_passed_with_another_optimizer_is_refused():
    a, b = nn.Linear(6, 3), nn.Linear(6, 3)
    opt_a, opt_b = sgd(a), sgd(b)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1)
    state, a, b, *_ = tl.prepare(tl.init(), a, b, opt_a, opt_b, sched_b)
    x, y = regression_data(4).tensors
    with pytest.raises(ValueError, match="schedules an optimizer that this tl.step call does not step"):
        tl.step(tl.backward(state, mse(a, x, y)), opt_a, sched_b)


# -- README promises about the loop ---------------------------------------------------------------


def test_backward_never_divides_the_loss_gradients_accumulate_unnormalised_until_step():
    """README: "The loss is never divided inside `backward`"; `step` normalises once per window."""
    x, y = regression_data(12).tensors
    reference = tiny_model()
    for start in (0, 4):
        mse(reference, x[start:start + 4], y[start:start + 4]).backward()  # summed, not divided
    state, model, optimizer = prepared(accumulate=3)
    for start in (0, 4):
        state = tl.backward(state, mse(model, x[start:start + 4], y[start:start + 4]))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    seen = []

    class Spy(Callback):
        def on_before_step(self, state):
            seen.extend(p.grad.clone() for p in model.parameters())

    state = tl.attach(state, Spy())
    state = tl.step(tl.backward(state, mse(model, x[8:], y[8:])), optimizer)
    mse(reference, x[8:], y[8:]).backward()
    for grad, q in zip(seen, reference.parameters()):
        torch.testing.assert_close(grad, q.grad / 3, atol=1e-7, rtol=0)  # normalised once, by 3


def test_a_checkpoint_between_a_gans_two_steps_keeps_the_unfinished_iteration(tmp_path):
    """An overflow in D's step, saved before G's: the resumed run backs off after G, as GradScaler would."""
    batches = gan_batches(count=3, overflow_d=2, overflow_g=99)
    _, scales, _, _ = raw_gan(batches, None)
    scaler = LossScale(**SCALER)
    state = tl.init(precision="fp16", callbacks=[scaler])
    generator, discriminator = gan_models()
    opt_g, opt_d = sgd(generator), sgd(discriminator)
    state, generator, discriminator, *_ = tl.prepare(state, generator, discriminator, opt_g, opt_d)
    for index, (x, z, factor) in enumerate(batches):
        state = tl.step(tl.backward(state, d_loss(generator, discriminator, x, z)), opt_d)
        if index == 2:
            break
        state = tl.step(tl.backward(state, g_loss(generator, discriminator, z, factor)), opt_g)
    assert scaler.state_dict()["iteration"] == {"stepped": [1], "found_inf": True}  # D overflowed
    tl.save(state, tmp_path / "ckpt")
    resumed_scaler = LossScale(**SCALER)
    resumed = tl.init(precision="fp16", callbacks=[resumed_scaler])
    g2, d2 = gan_models()
    resumed, g2, d2, opt_g2, _ = tl.prepare(resumed, g2, d2, sgd(g2), sgd(d2))
    resumed = tl.load(resumed, tmp_path / "ckpt")
    assert resumed_scaler.state_dict() == scaler.state_dict()
    x, z, factor = batches[2]
    resumed = tl.step(tl.backward(resumed, g_loss(g2, d2, z, factor)), opt_g2)
    assert resumed_scaler.scale == scales[2] and "iteration" not in resumed_scaler.state_dict()

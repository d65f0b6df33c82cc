"""The loop's contract, on one process (issue 21): every backward counted as plain autograd
would, nothing stepped or synchronised behind trainloop's back, the prepared model and loader
behaving as the user's own, and the small features Fabric users reach for first.

Each test compares against plain PyTorch. The 2-rank half is tests/test_contract_multiprocess.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler, TensorDataset

import trainloop as tl
from tests.support.reference import WithTrainingStep, mse, plain_lbfgs, regression_data, tiny_model
from trainloop.callbacks import ClipGradNorm


def ones_linear() -> nn.Linear:
    layer = nn.Linear(3, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(0.0)
    return layer


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tl.unwrap(model).state_dict().items()}


# -- 1. several backward calls in one micro-step give plain autograd gradients ------------------


def test_two_models_two_losses_before_one_step_move_as_plain_autograd():
    x = torch.ones(2, 3)
    a, b = ones_linear(), ones_linear()
    state = tl.init()
    params = [*a.parameters(), *b.parameters()]
    state, a, b, optimizer = tl.prepare(state, a, b, torch.optim.SGD(params, lr=1.0))
    state = tl.backward(state, a(x).mean())
    state = tl.backward(state, b(x).mean())
    state = tl.step(state, optimizer)
    # d mean(w . 1) / dw = 1: SGD with lr 1 moves each weight by -1.0 (not -0.5).
    assert torch.equal(a.weight, torch.zeros(1, 3)) and torch.equal(b.weight, torch.zeros(1, 3))
    assert state.step == 1 and state.micro_step == 1


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_losses_per_micro_step_inside_accumulate_equal_plain_autograd(accumulate):
    data = regression_data(8)
    reference = tiny_model()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    batches = list(DataLoader(data, batch_size=2))
    for start in range(0, len(batches), accumulate):
        for x, y in batches[start:start + accumulate]:
            (mse(reference, x, y) / accumulate).backward()
            (reference(x).pow(2).mean() / accumulate).backward()
        plain.step()
        plain.zero_grad()

    model = tiny_model()
    state = tl.init(accumulate=accumulate)
    state, model, optimizer, loader = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                 DataLoader(data, batch_size=2))
    for x, y in loader:
        with tl.accumulate(state, model):
            state = tl.backward(state, mse(model, x, y))
            state = tl.backward(state, model(x).pow(2).mean())
        state = tl.step(state, optimizer)
    assert state.step == 4 // accumulate and state.micro_step == 4
    expected = weights(reference)
    assert all(torch.allclose(expected[k], v, atol=1e-6) for k, v in weights(model).items())


def test_without_accumulate_each_backward_is_a_micro_step_when_accumulate_is_above_one():
    # The documented rule's third case (and the old behaviour, kept): two micro-batches, one
    # backward each, one step call: the window of 2 closes, its gradients are the mean.
    batches = list(DataLoader(regression_data(8), batch_size=4))
    reference = tiny_model()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in batches:
        (mse(reference, x, y) / 2).backward()
    plain.step()

    model = tiny_model()
    state = tl.init(accumulate=2)
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    for x, y in batches:
        state = tl.backward(state, mse(model, x, y))
    state = tl.step(state, optimizer)
    assert state.step == 1 and state.micro_step == 2
    expected = weights(reference)
    assert all(torch.allclose(expected[k], v, atol=1e-6) for k, v in weights(model).items())


def test_num_items_sums_over_every_backward_call_of_the_window():
    # Two sums of squared errors per micro-step, each with its own item count; two micro-steps.
    data = regression_data(8)
    batches = list(DataLoader(data, batch_size=4))
    reference = tiny_model()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    total = 0
    for x, y in batches:
        ((reference(x[:3]) - y[:3]) ** 2).sum().backward()
        ((reference(x[3:]) - y[3:]) ** 2).sum().backward()
        total += 4
    for p in reference.parameters():
        p.grad /= total
    plain.step()

    model = tiny_model()
    state = tl.init(accumulate=2)
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    for x, y in batches:
        with tl.accumulate(state, model):
            state = tl.backward(state, ((model(x[:3]) - y[:3]) ** 2).sum(), num_items=3)
            state = tl.backward(state, ((model(x[3:]) - y[3:]) ** 2).sum(), num_items=1)
        state = tl.step(state, optimizer)
    assert state.step == 1
    expected = weights(reference)
    assert all(torch.allclose(expected[k], v, atol=1e-6) for k, v in weights(model).items())


# -- 2. nothing stepped behind tl.step's back -----------------------------------------------------


def test_step_after_a_plain_loss_backward_raises_naming_tl_backward():
    model = tiny_model()
    state = tl.init()
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = regression_data(4).tensors
    mse(model, x, y).backward()  # not tl.backward: the window does not know of it
    with pytest.raises(RuntimeError, match=r"tl\.backward"):
        tl.step(state, optimizer)


def test_a_prepared_optimizer_stepped_by_hand_raises_naming_tl_step():
    model = tiny_model()
    state = tl.init()
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = regression_data(4).tensors
    state = tl.backward(state, mse(model, x, y))
    before = weights(model)
    with pytest.raises(RuntimeError, match=r"tl\.step"):
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())  # refused before it ran
    state = tl.step(state, optimizer)  # the loop's own step still works
    assert state.step == 1
    tl.finish(state)
    optimizer.step()  # after finish the optimizer is the user's again


# -- 3. methods through the strategy's forward ---------------------------------------------------


def test_mark_forward_method_runs_the_method_through_the_prepared_forward():
    model = WithTrainingStep()
    state = tl.init(precision="bf16")
    state, prepared = tl.prepare(state, model)
    tl.mark_forward_method(prepared, "training_step")
    x, y = regression_data(4).tensors
    loss = prepared.training_step(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = mse(model, x, y)
    assert loss.dtype == torch.float32 and torch.equal(loss, expected.float())
    with pytest.raises(AttributeError, match="no method 'nope'"):
        tl.mark_forward_method(prepared, "nope")


# -- 5. set_epoch reaches the sampler inside a batch sampler -------------------------------------


class EpochSampler(Sampler):
    """Epoch-aware order: a rotation by the epoch."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([(i + self.epoch) % self.n for i in range(self.n)])


class PairsBatchSampler(BatchSampler):
    """A custom batch sampler (not a plain BatchSampler) over an epoch-aware sampler."""

    def __iter__(self):
        return iter([[i] for i in self.sampler])


def test_set_epoch_reaches_a_sampler_inside_a_custom_batch_sampler():
    data = TensorDataset(torch.arange(4))
    loader = DataLoader(data, batch_sampler=PairsBatchSampler(EpochSampler(4), 1, False))
    _, loader = tl.prepare(tl.init(), loader)
    epochs = [[int(b[0]) for b in loader] for _ in range(2)]
    assert epochs == [[0, 1, 2, 3], [1, 2, 3, 0]]


# -- 6. a DataLoader subclass keeps its behaviour or is refused ----------------------------------


class DoublingLoader(DataLoader):
    def __iter__(self):
        for (x,) in super().__iter__():
            yield (x * 2,)


def test_a_dataloader_subclass_that_overrides_iteration_is_refused_naming_the_way_out():
    loader = DoublingLoader(TensorDataset(torch.arange(4.0)), batch_size=2)
    with pytest.raises(TypeError, match=r"DoublingLoader.*__iter__.*shard=False"):
        tl.prepare(tl.init(), loader)


def test_a_dataloader_subclass_kept_as_it_is_with_shard_false():
    loader = DoublingLoader(TensorDataset(torch.arange(4.0)), batch_size=2)
    _, prepared = tl.prepare(tl.init(), loader, shard=False)
    assert [b[0].tolist() for b in prepared] == [[0.0, 2.0], [4.0, 6.0]]


# -- 7, 8, 13. the prepared model: assignments, double preparation, state_dict keys ------------


def test_a_submodule_assigned_on_the_prepared_model_lands_on_the_users_module(tmp_path):
    model = tiny_model()
    _, prepared = tl.prepare(tl.init(precision="bf16"), model)
    prepared.head = nn.Linear(3, 2)
    assert tl.unwrap(prepared).head is prepared.head and model.head is prepared.head
    assert "head.weight" in prepared.state_dict()


def test_preparing_a_prepared_model_again_is_refused_naming_it():
    _, prepared = tl.prepare(tl.init(precision="bf16"), tiny_model())
    with pytest.raises(ValueError, match=r"already prepared.*Autocast"):
        tl.prepare(tl.init(precision="bf16"), prepared)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-true"])
def test_the_prepared_models_state_dict_has_the_users_keys(precision):
    model = tiny_model()
    keys = list(model.state_dict())
    _, prepared = tl.prepare(tl.init(precision=precision), model)
    assert list(prepared.state_dict()) == keys
    plain = tiny_model(seed=3)
    plain.load_state_dict({k: v.float() for k, v in prepared.state_dict().items()})  # strict: every key
    prepared.load_state_dict(tiny_model(seed=4).state_dict())
    assert torch.equal(tl.unwrap(prepared)[0].weight.float(), tiny_model(seed=4)[0].weight.to(
        tl.unwrap(prepared)[0].weight.dtype).float())


# -- 9. accumulate with the user's own module ----------------------------------------------------


def test_accumulate_with_an_unprepared_module_is_refused():
    state, _ = tl.prepare(tl.init(accumulate=2), tiny_model())
    with pytest.raises(ValueError, match=r"not prepared.*tl\.prepare"):
        tl.accumulate(state, tiny_model(seed=5))


def test_accumulate_with_the_users_module_of_a_prepared_model_resolves_to_it():
    model = tiny_model()
    state, _ = tl.prepare(tl.init(accumulate=2, precision="bf16"), model)
    with tl.accumulate(state, model):  # the user's module, not the prepared wrapper: accepted
        pass


# -- 14. reduce: the same results at every world size --------------------------------------------


def test_reduce_refuses_a_non_tensor_leaf_on_one_process_too():
    with pytest.raises(TypeError, match="reduce needs tensors or numbers"):
        tl.reduce(tl.init(), {"loss": torch.tensor(1.0), "name": "run"})


def test_reduce_mean_of_integers_is_a_float_on_one_process_too():
    state = tl.init()
    assert tl.reduce(state, torch.tensor([1, 2]), op="mean").dtype == torch.float32
    assert isinstance(tl.reduce(state, 3, op="sum"), float)


# -- 15. an optimizer whose zero_grad takes other arguments --------------------------------------


class OldStyleSGD(torch.optim.SGD):
    def zero_grad(self, set_grads_to_None=False):  # apex's spelling
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def test_an_optimizer_with_another_zero_grad_signature_steps():
    model = tiny_model()
    state, model, optimizer = tl.prepare(tl.init(), model, OldStyleSGD(model.parameters(), lr=0.1))
    x, y = regression_data(4).tensors
    state = tl.step(tl.backward(state, mse(model, x, y)), optimizer)
    assert state.step == 1 and all(p.grad is None for p in model.parameters())


# -- features: clipping by value, error_if_nonfinite ----------------------------------------------


def test_clip_grad_value_equals_torchs_clip_grad_value():
    from trainloop.callbacks import ClipGradValue

    x, y = regression_data(8).tensors
    reference = tiny_model()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    (mse(reference, x, y) * 100).backward()
    torch.nn.utils.clip_grad_value_(reference.parameters(), 0.01)
    plain.step()

    model = tiny_model()
    state = tl.init(callbacks=[ClipGradValue(0.01)])
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    state = tl.step(tl.backward(state, mse(model, x, y) * 100), optimizer)
    expected = weights(reference)
    assert all(torch.equal(expected[k], v) for k, v in weights(model).items())


def test_clip_grad_norm_error_if_nonfinite_raises_and_skips_nothing_silently():
    model = tiny_model()
    state = tl.init(callbacks=[ClipGradNorm(1.0, error_if_nonfinite=True)])
    state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = regression_data(4).tensors
    state = tl.backward(state, mse(model, x * float("inf"), y))
    with pytest.raises(RuntimeError, match="non-finite"):
        tl.step(state, optimizer)


# -- features: move_to_device=False, closure optimizers, print, main_first(local=True) ----------


def test_move_to_device_false_keeps_batches_where_the_loader_put_them():
    _, loader = tl.prepare(tl.init(), DataLoader(TensorDataset(torch.arange(4.0)), batch_size=2),
                               move_to_device=False)
    assert [b[0].tolist() for b in loader] == [[0.0, 1.0], [2.0, 3.0]]


def test_lbfgs_through_step_with_a_closure_equals_plain_torch_lbfgs():
    x, y = regression_data(16).tensors
    reference = plain_lbfgs(x, y, steps=3)
    model = tiny_model()
    state = tl.init()
    state, model, optimizer = tl.prepare(state, model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5))
    for _ in range(3):
        state = tl.step(state, optimizer, closure=lambda: mse(model, x, y))
    assert state.step == 3
    expected = weights(reference)
    assert all(torch.equal(expected[k], v) for k, v in weights(model).items())


def test_print_and_main_first_local(capsys):
    state = tl.init()
    tl.print(state, "hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
    with tl.main_first(state, local=True):
        ran = True
    assert ran


# -- features: 16-true and 64-true ----------------------------------------------------------------


@pytest.mark.parametrize(("precision", "dtype"), [("fp16-true", torch.float16), ("fp64-true", torch.float64)])
def test_true_precisions_train_in_their_dtype(precision, dtype):
    x, y = regression_data(4).tensors
    reference = tiny_model().to(dtype)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    out = reference(x.to(dtype))
    out = out.float() if dtype == torch.float16 else out  # fp16 outputs leave the model as fp32
    ((out - y) ** 2).mean().backward()
    plain.step()

    model = tiny_model()
    state, model, optimizer = tl.prepare(tl.init(precision=precision), model,
                                         torch.optim.SGD(model.parameters(), lr=0.1))
    out = model(x)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    state = tl.step(tl.backward(state, ((out - y) ** 2).mean()), optimizer)
    assert all(p.dtype == dtype for p in model.parameters())
    expected = weights(reference)
    assert all(torch.equal(expected[k], v) for k, v in weights(model).items())


def test_bf16_true_makes_tensors_created_inside_forward_bf16():
    class AddsZeros(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x) + torch.zeros(4))

    _, model = tl.prepare(tl.init(precision="bf16-true"), AddsZeros())
    assert model(torch.randn(2, 4)).shape == (2, 4)
    assert torch.get_default_dtype() == torch.float32  # restored after the forward

"""The loop's contract on 2 ranks (gloo, CPU): one `spawn.run` start-up for every check.

`contract_checks` runs each check in turn on both ranks and returns what rank 0 saw, as plain
data (each check's own result, or the error it raised); tests/test_contract_multiprocess.py
asserts on it. Every check compares with plain PyTorch on one process over the global batch.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import trainloop as tl
from tests.support.reference import WithTrainingStep, mse, plain_lbfgs, regression_data, tiny_model
from trainloop import forwarding
from trainloop.strategies import ddp as ddp_strategy


def _everyone(value):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _ones_linear() -> nn.Linear:
    layer = nn.Linear(3, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(0.0)
    return layer


def _same_on_every_rank(tensors) -> bool:
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    return all(torch.equal(flat, other) for other in _everyone(flat))


def _two_losses(state):
    """Item 1: two DDP models, two losses, one step: the plain (rank-averaged) gradient."""
    a, b = _ones_linear(), _ones_linear()
    state, a, b, optimizer = tl.prepare(state, a, b, torch.optim.SGD([*a.parameters(), *b.parameters()], lr=1.0))
    x = torch.ones(2, 3) * (state.rank + 1)  # d mean(w . x) / dw = rank + 1; DDP averages: 1.5
    state = tl.backward(state, a(x).mean())
    state = tl.backward(state, b(x).mean())
    state = tl.step(state, optimizer)
    return [tl.unwrap(a).weight.tolist(), tl.unwrap(b).weight.tolist()]


def _forward_methods(state):
    """Item 3: a method through DDP's forward, marked; unmarked and training: refused."""
    x, y = regression_data(8).tensors
    mine = slice(4 * state.rank, 4 * state.rank + 4)
    reference = WithTrainingStep()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference.training_step(x, y).backward()
    plain.step()

    results = {}
    model = WithTrainingStep()
    state, prepared, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    try:
        prepared.training_step(x[mine], y[mine])
        results["unmarked"] = None
    except RuntimeError as error:
        results["unmarked"] = str(error)
    with torch.no_grad():  # inference methods keep working unmarked
        results["no_grad"] = float(prepared.training_step(x[mine], y[mine]))
    tl.mark_forward_method(prepared, "training_step")
    state = tl.step(tl.backward(state, prepared.training_step(x[mine], y[mine])), optimizer)
    expected = reference.state_dict()
    results["marked_equals_reference"] = all(
        torch.allclose(expected[k], v, atol=1e-6) for k, v in tl.unwrap(prepared).state_dict().items())
    return results


def _broadcasts(state):
    """Item 4: a placeholder of another shape or dtype raises on every rank; None receives."""
    results = {}
    value = torch.tensor([1.5, 2.5, 3.5])
    for name, placeholder in (("dtype", torch.zeros(3, dtype=torch.int64)), ("shape", torch.zeros(2))):
        try:
            tl.broadcast(state, value if state.rank == 0 else placeholder)
            results[name] = None
        except ValueError as error:
            results[name] = str(error)
    got = tl.broadcast(state, {"x": value} if state.rank == 0 else None)
    results["none_placeholder"] = got["x"].tolist()
    results["same"] = tl.broadcast(state, value if state.rank == 0 else torch.zeros(3)).tolist()
    return results


def _accumulate_raw_module(state):
    """Item 9: tl.accumulate with the user's module still turns off the sync."""
    state = tl.init(accumulate=2, timeout=60)  # the process group is joined: a second run beside the first
    model = tiny_model()
    state, prepared, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = regression_data(8).tensors
    mine = slice(4 * state.rank, 4 * state.rank + 4)
    with tl.accumulate(state, model):  # `model`: the user's module; the window's first micro-step
        state = tl.backward(state, mse(prepared, x[mine], y[mine]))
    local = not _same_on_every_rank([p.grad for p in model.parameters()])
    with tl.accumulate(state, model):
        state = tl.backward(state, mse(prepared, x[mine], y[mine]))
    synced = _same_on_every_rank([p.grad for p in model.parameters()])
    tl.step(state, optimizer)
    return {"first_local": local, "last_synced": synced}


def _state_dict_keys(state):
    """Item 13: DDP's prepared model has the user's keys; 7: a submodule assigned is refused."""
    model = tiny_model()
    keys = list(model.state_dict())
    state, prepared = tl.prepare(state, model)
    plain = tiny_model(seed=9)
    plain.load_state_dict(prepared.state_dict())
    try:
        prepared.head = nn.Linear(3, 2)
        assigned = None
    except (ValueError, AttributeError) as error:
        assigned = str(error)
    return {"keys": list(prepared.state_dict()) == keys, "assigned": assigned}


def _reduces(state):
    """Item 14: the same results as on one process."""
    results = {"int_mean_dtype": str(tl.reduce(state, torch.tensor([1, 2]) * (state.rank + 1), op="mean").dtype)}
    try:
        tl.reduce(state, {"loss": torch.tensor(1.0), "name": "run"})
        results["non_tensor"] = None
    except TypeError as error:
        results["non_tensor"] = str(error)
    return results


def _gather_sync_grads(state):
    """tl.gather(sync_grads=True): a loss over every rank's rows gives one process's gradients."""
    torch.manual_seed(0)
    reference = nn.Linear(6, 4)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    targets = [torch.randn(5, 4, generator=torch.Generator().manual_seed(2 + k)) for k in range(2)]
    rows = [slice(0, 2), slice(2, 5)]  # rank 0 has 2 rows, rank 1 has 3

    def loss_of(embeddings, k):  # each rank's loss over the global batch's embeddings
        return ((embeddings.tanh() - targets[k]) ** 2).sum() * (k + 1)

    embeddings = reference(x)
    (sum(loss_of(embeddings, k) for k in range(2)) / 2).backward()  # DDP averages the ranks' losses
    expected = [p.grad.clone() for p in reference.parameters()]

    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    state, prepared = tl.prepare(state, model)
    gathered = tl.gather(state, prepared(x[rows[state.rank]]), sync_grads=True)
    loss_of(gathered, state.rank).backward()
    return all(torch.allclose(e, p.grad, atol=1e-5) for e, p in zip(expected, model.parameters()))


def _no_sync(state):
    """tl.no_sync: gradients stay local inside, sync with enabled=False; the plain sum at the step."""
    x, y = regression_data(16).tensors
    reference = tiny_model()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    for half in (slice(0, 8), slice(8, 16)):
        (mse(reference, x[half], y[half]) / 2).backward()
    plain.step()

    model = tiny_model()
    state, prepared, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
    results = {}
    for micro, half in enumerate((slice(0, 8), slice(8, 16))):
        mine = x[half][4 * state.rank:4 * state.rank + 4], y[half][4 * state.rank:4 * state.rank + 4]
        with tl.no_sync(state, prepared, enabled=micro == 0):
            state = tl.backward(state, mse(prepared, *mine) / 2)
        results[f"synced_{micro}"] = _same_on_every_rank([p.grad for p in model.parameters()])
    state = tl.step(state, optimizer)
    expected = reference.state_dict()
    results["equals_reference"] = all(torch.allclose(expected[k], v, atol=1e-6)
                                      for k, v in model.state_dict().items())
    return results


def _shard_false(state):
    """prepare(shard=False): a DistributedSampler's own shards, set_epoch called every epoch."""
    data = TensorDataset(torch.arange(10))
    sampler = DistributedSampler(data, num_replicas=2, rank=state.rank, shuffle=True, seed=3)
    state, loader = tl.prepare(state, DataLoader(data, batch_size=2, sampler=sampler), shard=False)
    seen = [[int(i) for batch in loader for i in batch[0]] for _ in range(2)]
    expected = []
    for epoch in range(2):
        own = DistributedSampler(data, num_replicas=2, rank=state.rank, shuffle=True, seed=3)
        own.set_epoch(epoch)
        expected.append(list(own))
    return {"equal": seen == expected, "epochs_differ": seen[0] != seen[1], "epoch": loader.epoch}


def _lbfgs(state):
    """A closure optimizer on 2 ranks: one process's LBFGS over the global batch."""
    x, y = regression_data(16).tensors
    reference = plain_lbfgs(x, y, steps=2)
    model = tiny_model()
    state, prepared, optimizer = tl.prepare(state, model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5))
    mine = slice(8 * state.rank, 8 * state.rank + 8)
    for _ in range(2):
        state = tl.step(state, optimizer, closure=lambda: mse(prepared, x[mine], y[mine]))
    expected = reference.state_dict()
    return {"step": state.step, "close": all(torch.allclose(expected[k], v, atol=1e-5)
                                             for k, v in model.state_dict().items()),
            "same": _same_on_every_rank(list(model.parameters()))}


def _python_calls(run) -> list[tuple[str, str]]:
    """(file, function) of every Python call while `run()` runs, in this thread (where DDP's
    forward, its no_sync and the autograd engine's Python hooks run on the CPU)."""
    calls: list[tuple[str, str]] = []

    def note(frame, event, arg):
        if event == "call":
            calls.append((frame.f_code.co_filename, frame.f_code.co_name))

    sys.setprofile(note)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def _ddp_hot_path(state):
    """Issue 22: DDP's per-step path (forward, no_sync, the flags DDP sets) runs no Python of
    trainloop.forwarding, and no more Python calls than a plain DDP; what it forwards still works."""
    state = tl.init(accumulate=2, timeout=60)  # so that tl.accumulate enters no_sync
    x, y = regression_data(8).tensors
    plain = nn.parallel.DistributedDataParallel(WithTrainingStep())  # the same model, by torch alone
    model = WithTrainingStep()
    model.label = "mine"
    state, prepared, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))

    def micro_steps(ddp):
        def run():
            with ddp.no_sync():
                mse(ddp, x, y).backward()
            mse(ddp, x, y).backward()
            ddp.require_backward_grad_sync = True  # a flag DDP owns: stays DDP's
        return run

    for ddp in (plain, prepared):
        micro_steps(ddp)()  # DDP's lazy first-forward set-up, outside the counts
    results = {"is_ddp": isinstance(prepared, nn.parallel.DistributedDataParallel)}
    plain_calls, prepared_calls = _python_calls(micro_steps(plain)), _python_calls(micro_steps(prepared))
    results["forwarding_calls"] = sorted({name for file, name in prepared_calls if file == forwarding.__file__})
    results["calls"] = {"plain": len(plain_calls), "prepared": len(prepared_calls)}

    def micro_step():
        nonlocal state
        with tl.accumulate(state, prepared):  # off the window's end: the strategy's no_sync
            state = tl.backward(state, mse(prepared, x, y))

    micro_step()  # the first window: the strategy finds the model's DDP layer, once
    with tl.accumulate(state, prepared):
        state = tl.backward(state, mse(prepared, x, y))
    state = tl.step(state, optimizer)
    results["accumulate_calls"] = sorted({name for file, name in _python_calls(micro_step)
                                          if file in (forwarding.__file__, ddp_strategy.__file__)})
    # What forwards still does: the user's attribute read and written through DDP, DDP's own
    # flag kept on DDP, a marked method run inside DDP's forward and nothing of it left behind.
    prepared.label = "changed"
    inside = []
    model.probe = lambda: inside.append(nn.parallel.DistributedDataParallel._active_ddp_module is prepared)
    tl.mark_forward_method(prepared, "training_step")
    original_forward = model.forward

    def forward(x):
        model.probe()
        return original_forward(x)

    model.forward = forward
    prepared.training_step(x, y).backward()
    results["passthrough"] = {
        "label": (model.label, prepared.label), "flag_is_ddps": "require_backward_grad_sync" in vars(prepared)
        and "require_backward_grad_sync" not in vars(model), "inside_ddp_forward": inside,
        "routing_left": "_run_ddp_forward" in vars(prepared)}
    tl.finish(state)
    return results


def _rank_helpers(state, tmp_dir):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        tl.print(state, "from", state.rank)
    marker = os.path.join(tmp_dir, "local-main-was-first")
    with tl.main_first(state, local=True):
        first = os.path.exists(marker)
        if state.is_local_main:
            with open(marker, "w"):
                pass
    return {"printed": out.getvalue(), "saw_marker": first}


CHECKS = {
    "two_losses": _two_losses, "forward_methods": _forward_methods, "broadcast": _broadcasts,
    "accumulate_raw": _accumulate_raw_module, "state_dict": _state_dict_keys, "reduce": _reduces,
    "gather_sync_grads": _gather_sync_grads, "no_sync": _no_sync, "shard_false": _shard_false,
    "lbfgs": _lbfgs, "ddp_hot_path": _ddp_hot_path,
}


def contract_checks(tmp_dir: str) -> dict:
    base = tl.init(timeout=60)
    results = {}
    for name, check in CHECKS.items():
        try:
            results[name] = check(base)
        except Exception as error:  # one check's failure is its result; the others still run
            results[name] = f"error: {type(error).__name__}: {error}"
    try:
        results["rank_helpers"] = _everyone(_rank_helpers(base, tmp_dir))
    except Exception as error:
        results["rank_helpers"] = f"error: {type(error).__name__}: {error}"
    everyone = _everyone(results)
    tl.finish(base)
    return {"rank0": everyone[0], "rank1": everyone[1]}

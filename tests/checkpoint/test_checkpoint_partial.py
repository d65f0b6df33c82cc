"""Partial and non-strict loads, the user's own objects, and filtered saves (what Fabric users
reach for: `fabric.save(path, state, filter=)`, `fabric.load(path, state, strict=)`)."""

from __future__ import annotations

import numpy
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

import trainloop as tl
from tests.support.reference import mse, regression_data, tiny_model


def trained(tmp_path, steps: int = 2, model=None, **save_kwargs):
    """A run trained `steps` steps and saved to tmp_path / "ckpt"; its state, model and optimizer."""
    model = model if model is not None else tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = tl.init(seed=0)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, DataLoader(regression_data(32), batch_size=4))
    batches = iter(loader)
    for _ in range(steps):
        state = tl.step(tl.backward(state, mse(model, *next(batches))), optimizer)
    tl.save(state, tmp_path / "ckpt", **save_kwargs)
    return state, model, optimizer


def fresh(model=None, seed: int = 7):
    model = model if model is not None else tiny_model(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = tl.init(seed=seed)
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, DataLoader(regression_data(32), batch_size=4))
    return state, model, optimizer, loader


def test_extra_objects_are_saved_and_restored_by_name(tmp_path):
    ema = tiny_model(seed=3)
    plain = {"config": {"lr": 0.01, "layers": [16, 3]}, "best": 0.25}
    trained(tmp_path, extra={"ema": ema, **plain})
    state, *_ = fresh()
    ema_again, wanted = tiny_model(seed=4), {"ema": None, "config": None, "best": None}
    wanted["ema"] = ema_again
    state = tl.load(state, tmp_path / "ckpt", extra=wanted)
    assert state.step == 2
    assert all(torch.equal(a, b) for a, b in zip(ema_again.state_dict().values(), ema.state_dict().values()))
    assert wanted["config"] == plain["config"] and wanted["best"] == 0.25  # plain data, put back
    state, *_ = fresh()
    with pytest.raises(ValueError, match=r"no extra object named 'missing'"):
        tl.load(state, tmp_path / "ckpt", extra={"missing": {}})


def test_an_extra_value_a_safe_load_refuses_is_refused_at_save(tmp_path):
    with pytest.raises(tl.CheckpointError, match=r"extra 'best'.*numpy.float64"):
        trained(tmp_path, extra={"best": numpy.float64(0.5)})
    with pytest.raises(ValueError, match="filter= names 'optimizer'"):
        trained(tmp_path, filter={"optimizer": lambda k, v: True})


def test_non_strict_load_restores_what_fits_and_returns_what_did_not(tmp_path):
    _, model, _ = trained(tmp_path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    wider_head = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.0), nn.Linear(16, 5))
    state, wider_head, optimizer, _ = fresh(wider_head)
    with pytest.raises(ValueError, match=r"3.weight: checkpoint \(3, 16\), model \(5, 16\)"):
        tl.load(state, tmp_path / "ckpt")  # strict: nothing restored
    head_before = wider_head[3].weight.detach().clone()
    state, not_restored = tl.load(state, tmp_path / "ckpt", strict=False)
    # What fits is the checkpoint's, bit for bit, as torch's own load_state_dict(strict=False) would give.
    assert torch.equal(wider_head[0].weight, saved["0.weight"]) and torch.equal(wider_head[0].bias, saved["0.bias"])
    assert torch.equal(wider_head[3].weight, head_before)  # what does not fit is left as it was
    assert any("3.weight: checkpoint (3, 16), model (5, 16)" in item for item in not_restored), not_restored
    assert any("optimizer 0" in item for item in not_restored), not_restored  # its moments have other shapes
    assert state.step == 2
    state = tl.step(tl.backward(state, wider_head(torch.ones(2, 6)).sum()), optimizer)  # and it trains on
    assert state.step == 3


def test_only_models_loads_the_weights_and_leaves_the_rest(tmp_path):
    _, model, _ = trained(tmp_path)
    state, fresh_model, optimizer, loader = fresh()
    state = tl.load(state, tmp_path / "ckpt", only=("models",))
    assert all(torch.equal(a, b) for a, b in zip(fresh_model.state_dict().values(), model.state_dict().values()))
    assert state.step == 0 and loader.samples_seen == 0  # counters and positions are this run's
    assert optimizer.state_dict()["state"] == {}  # a new optimizer, as for fine-tuning
    with pytest.raises(ValueError, match="only= takes"):
        tl.load(state, tmp_path / "ckpt", only=("weights",))


def test_a_filtered_save_holds_only_what_the_filter_kept(tmp_path):
    _, model, _ = trained(tmp_path, filter={"model": lambda name, tensor: name.startswith("0.")})
    assert sorted(load_file(tmp_path / "ckpt" / "model.safetensors")) == ["0.bias", "0.weight"]
    state, fresh_model, _, _ = fresh()
    with pytest.raises(ValueError, match="3.weight: in the model, not in the checkpoint"):
        tl.load(state, tmp_path / "ckpt")
    last_layer = fresh_model[3].weight.detach().clone()
    state, not_restored = tl.load(state, tmp_path / "ckpt", strict=False)
    assert torch.equal(fresh_model[0].weight, model[0].weight) and torch.equal(fresh_model[3].weight, last_layer)
    assert sorted(item.split(": ")[1] for item in not_restored if item.startswith("model 0")) == ["3.bias", "3.weight"]


def test_the_docs_snippets_run_as_written(tmp_path, monkeypatch):
    """docs/checkpoints.md, block by block, in one namespace (a prepared run as the page assumes)."""
    from tests.docs.docs_snippets import python_blocks

    monkeypatch.chdir(tmp_path)
    state, model, optimizer, loader = fresh()
    namespace = {"tl": tl, "torch": torch, "state": state, "model": model, "optimizer": optimizer, "loader": loader}
    for heading in ("## Your own objects: `extra=`", "## A part of a state dict: `filter=`",
                    "## Partial and non-strict loads", "## The end of a run"):
        blocks = python_blocks("docs/checkpoints.md", heading)
        assert blocks, heading
        for block in blocks:
            exec(compile(block, f"docs/checkpoints.md {heading}", "exec"), namespace)
    assert namespace["wanted"]["best"] == 0.91 and isinstance(namespace["not_restored"], list)
    assert namespace["state"].lineage.finished

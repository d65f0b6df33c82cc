"""fp8 under FSDP2 on 2 worker processes (gloo, CPU: torchao's emulation): the weights gathered in
bf16 (the default) and in float8 (`fp8_all_gather=True`, also of a model built on the meta
device), each for two SGD steps. Started once by
`trainloop.spawn.run(fsdp_all_gather_checks, n=2)`; tests/core/test_fp8_recipes.py asserts on it.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import trainloop as tl


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 32, generator=generator), torch.randn(8, 32, generator=generator)) for _ in range(2)]


def _run(all_gather: bool, on_meta: bool = False) -> list[dict]:
    state = tl.init(strategy="fsdp", precision="fp8", fp8_all_gather=all_gather, seed=0)
    if on_meta:  # initialised by materialize from the run's seed, 0: net()'s own values
        with tl.empty_weights():
            model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    else:
        model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's and FSDP's notes on the CPU
        state, model, optimizer = tl.prepare(state, model, optimizer)
    user = tl.unwrap(model)
    weight_types = [type(m.weight.to_local()).__name__ for m in user if isinstance(m, nn.Linear)]
    configs = [m.config.enable_fsdp_float8_all_gather for m in user if hasattr(m, "config")]
    losses = []
    for x, y in batches():
        loss = F.mse_loss(model(x[state.rank::2]), y[state.rank::2])
        state = tl.step(tl.backward(state, loss), optimizer)
        losses.append(loss.item())
    weights = {name: p.full_tensor().detach().clone() for name, p in user.named_parameters()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"weight_types": weight_types, "configs": configs, "losses": losses,
                                      "weights": weights})
    tl.finish(state)
    return everyone


def fsdp_all_gather_checks() -> dict[str, list[dict]]:
    """Each run's results from every rank (rank 0's list of both ranks' dicts)."""
    return {"bf16_gather": _run(False), "fp8_gather": _run(True), "meta_fp8_gather": _run(True, on_meta=True)}

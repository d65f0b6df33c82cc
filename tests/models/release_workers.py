"""Meta-init of tensors of 1 MiB and more on 2 FSDP2 ranks (gloo, CPU): the path where each module's
whole tensor gets a mapping of its own, whose pages go back to the kernel as this rank's rows are
copied out (`trainloop.models.meta._copy_releasing`). Started by tests/models/test_meta_release.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import trainloop as tl

ROWS = 515  # uneven over 2 ranks (258 + 257 rows); 515 x 512 fp32 is just over 1 MiB


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(512, ROWS), nn.ReLU(), nn.Linear(ROWS, 512))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(8, 512, generator=generator), torch.randn(8, 512, generator=generator)


def meta_init_checks() -> list[dict]:
    state = tl.init(strategy="fsdp", seed=3)
    with tl.empty_weights():
        built = model()
    optimizer = torch.optim.SGD(built.parameters(), lr=0.5)
    state, prepared, optimizer = tl.prepare(state, built, optimizer)
    user = tl.unwrap(prepared)
    initial = {name: p.full_tensor().detach().clone() for name, p in user.named_parameters()}
    x, y = batch()
    state = tl.step(tl.backward(state, F.mse_loss(prepared(x[state.rank::2]), y[state.rank::2])), optimizer)
    trained = {name: p.full_tensor().detach().clone() for name, p in user.named_parameters()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"initial": initial, "trained": trained})
    tl.finish(state)
    return everyone

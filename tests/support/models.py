"""A block-structured model that FSDP shards per block, shared by the strategy, FSDP and weights tests."""

from __future__ import annotations

import torch
from torch import nn

import trainloop as tl


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class BlockModel(nn.Module):
    """An input layer, a ModuleList of Linear+Tanh blocks, a head: what FSDP shards per block."""

    def __init__(self, seed: int = 0, width: int = 8, depth: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)  # 3 rows over 2 ranks: uneven shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def probe_input() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(7))


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters and buffers on every rank (a collective under FSDP)."""
    weights = {}
    for name, value in tl.unwrap(model).state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        weights[name] = value.detach().clone()
    return weights

"""Small models, data and plain-PyTorch reference loops shared by the tests.

Everything is tiny and deterministic so that trainloop's results can be compared with a loop
written in plain PyTorch, to atol 1e-6 or bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def tiny_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))


def regression_data(n: int, seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = torch.randn(n, 3, generator=generator)
    return TensorDataset(x, y)


class TokenData(Dataset):
    """Sequences with ragged lengths: (inputs [L, 6], targets [L, 3], mask [L])."""

    def __init__(self, n: int, max_len: int = 5, seed: int = 2):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, max_len, 6, generator=generator)
        self.y = torch.randn(n, max_len, 3, generator=generator)
        lengths = torch.randint(1, max_len + 1, (n,), generator=generator)
        self.mask = torch.arange(max_len)[None, :] < lengths[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], self.mask[i]


class CountingDataset(Dataset):
    """Counts `__getitem__` calls, to prove what a loader did not read."""

    def __init__(self, n: int):
        self.n = n
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads.append(i)
        return torch.tensor(i)


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def plain_lbfgs(x: torch.Tensor, y: torch.Tensor, steps: int, *, lr: float = 0.5, max_iter: int = 5) -> nn.Module:
    """`tiny_model()` after `steps` plain `torch.optim.LBFGS` steps on (x, y): the closure
    optimizer's reference, as torch's docs write its loop."""
    reference = tiny_model()
    plain = torch.optim.LBFGS(reference.parameters(), lr=lr, max_iter=max_iter)

    def closure() -> torch.Tensor:
        plain.zero_grad()
        loss = mse(reference, x, y)
        loss.backward()
        return loss

    for _ in range(steps):
        plain.step(closure)
    return reference


def token_loss_sum(model: nn.Module, x, y, mask) -> torch.Tensor:
    """Sum of per-token squared errors over the real (unmasked) tokens."""
    return (((model(x) - y) ** 2).sum(-1) * mask).sum()


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """trainloop's documented shuffle: a permutation from a generator seeded seed + epoch."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def big_batch_reference(model: nn.Module, optimizer, dataset, *, big_batch: int, epochs: int,
                        seed: int, shuffle: bool, loss: str = "mse", scheduler=None) -> None:
    """Plain PyTorch: one process, one optimizer step per big batch, same sample order."""
    n = len(dataset)
    for epoch in range(epochs):
        order = epoch_order(n, seed, epoch, shuffle)
        for start in range(0, n, big_batch):
            batch = [dataset[i] for i in order[start:start + big_batch].tolist()]
            tensors = [torch.stack(column) for column in zip(*batch)]
            if loss == "mse":
                value = mse(model, *tensors)
            else:
                value = token_loss_sum(model, *tensors) / tensors[2].sum()
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()


class WithTrainingStep(nn.Module):
    """The tiny model with a method of its own that runs the forward (`mark_forward_method`'s case)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_model()

    def forward(self, x):
        return self.net(x)

    def training_step(self, x, y):
        return mse(self, x, y)

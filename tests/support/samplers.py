"""A real length-bucketing batch sampler, as text pipelines build them, and the token lengths it buckets."""

from __future__ import annotations

import torch

from tests.support.reference import TokenData


class LengthBucketing:
    """Batches of samples of similar length, as text pipelines build them.

    Each epoch: shuffle the indices, sort them by length within buckets of `batch_size * bucket`
    samples, cut each bucket into batches of `batch_size` (the bucket's last batch may be
    shorter), and shuffle the batches. Draws from torch's global RNG; remembers `set_epoch`.
    """

    def __init__(self, lengths: list[int], batch_size: int, bucket: int = 4):
        self.lengths, self.batch_size, self.bucket = list(lengths), batch_size, bucket
        self.epochs_set: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_set.append(epoch)

    def _batches(self) -> list[list[int]]:
        order = torch.randperm(len(self.lengths)).tolist()
        size = self.batch_size * self.bucket
        batches = []
        for start in range(0, len(order), size):
            bucket = sorted(order[start:start + size], key=lambda i: self.lengths[i])
            batches += [bucket[i:i + self.batch_size] for i in range(0, len(bucket), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches)).tolist()]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        size = self.batch_size * self.bucket
        full, rest = divmod(len(self.lengths), size)
        return full * self.bucket + -(-rest // self.batch_size)


def token_lengths(n: int) -> list[int]:
    return TokenData(n).mask.sum(1).tolist()

"""Data for a run: loaders sharded across ranks and resumable, and the batch-size search.

`plans` deals an epoch's samples (or a batch sampler's batches) to the ranks; `stream` does the
same for an IterableDataset; `loader` is the `PreparedLoader` that `prepare` returns;
`batch_size` is `find_batch_size`.
"""

from trainloop.data.loader import PreparedLoader

__all__ = ["PreparedLoader"]

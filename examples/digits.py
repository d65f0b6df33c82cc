"""Train a small CNN on scikit-learn's bundled 8x8 digits (1797 images, no download).

    python examples/digits.py
    python -m trainloop.spawn -n 2 examples/digits.py             # the same script, two processes
    python -m trainloop.spawn -n 2 --accumulate 4 examples/digits.py

Prints the held-out accuracy after every epoch and at the end (about 97% after 10 epochs).
Metrics go to runs/digits/metrics.jsonl (and TensorBoard event files when tensorboard is
installed); a checkpoint is kept every epoch, so an interrupted run continues where it stopped.
"""

import argparse
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainloop as tl
from trainloop.callbacks import Checkpoint, JSONLines, TensorBoard


def digits_split(num_held_out: int = 360) -> tuple[TensorDataset, TensorDataset]:
    """(train, held-out): the same split on every run and every rank (its own fixed seed)."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    held_out, train = order[:num_held_out], order[num_held_out:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[held_out], labels[held_out])


def small_cnn() -> nn.Module:
    # Two 3x3 convolutions keep the 8x8 size; one 2x2 pool halves it to 4x4 before the classifier.
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


@torch.no_grad()
def evaluate(state: tl.RunState, model: nn.Module, loader: tl.PreparedLoader) -> tuple[int, int]:
    """(correct, total) over the whole held-out set, however many processes share it."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        predictions = model(images).argmax(dim=1)
        # Every rank gets every rank's predictions. With loader= gather drops the images that
        # sharding repeated on the last batch to even out the ranks: each is counted exactly once.
        predictions, labels = tl.gather(state, (predictions, labels), loader=loader)
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training images")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="images per micro-batch per process")
    parser.add_argument("--run-dir", default="runs/digits", help="metrics, event files and checkpoints")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    args = parser.parse_args()

    train_set, held_out_set = digits_split()
    # 23 optimizer steps per epoch on one process: a checkpoint about once per epoch.
    callbacks = [JSONLines(os.path.join(args.run_dir, "metrics.jsonl")),
                 Checkpoint(os.path.join(args.run_dir, "checkpoints"), every=25, keep=2,
                            resume=not args.fresh)]
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(TensorBoard(os.path.join(args.run_dir, "tensorboard")))
    # accumulate=2: one optimizer step per two micro-batches, the same update as one batch twice the
    # size. `spawn --accumulate 4` overrides it, so read the window from state.config from here on.
    state = tl.init(accumulate=2, seed=0, log_every=10, callbacks=callbacks)
    model = small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    # The scheduler counts optimizer steps: this rank's share of the batches, one step per window
    # (a window also closes at an epoch's end, hence the ceil).
    batches_per_epoch = math.ceil(len(train_set) / (args.batch_size * state.world_size))
    steps_per_epoch = math.ceil(batches_per_epoch / state.config.accumulate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                    total_steps=args.epochs * steps_per_epoch)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    held_out_loader = DataLoader(held_out_set, batch_size=128)
    state, model, optimizer, train_loader, held_out_loader, scheduler = tl.prepare(
        state, model, optimizer, train_loader, held_out_loader, scheduler)
    if state.step and state.is_main:
        print(f"resumed from {callbacks[1].restored_from} at step {state.step}", flush=True)

    for epoch in range(train_loader.epoch, args.epochs):  # a resumed run starts at its epoch
        for images, labels in train_loader:
            with tl.accumulate(state, model):  # gradients sync across processes once per window
                loss = F.cross_entropy(model(images), labels)
                state = tl.backward(state, loss)
            state = tl.step(state, optimizer)  # optimizer and scheduler, at the window's end only
            state = tl.log(state, loss=loss)  # buffered on the device; the trackers get the means
        correct, total = evaluate(state, model, held_out_loader)
        if state.is_main:
            print(f"epoch {epoch + 1}/{args.epochs}: step {state.step}, "
                  f"held-out accuracy {correct / total:.4f}", flush=True)

    correct, total = evaluate(state, model, held_out_loader)
    if state.is_main:
        print(f"held-out accuracy: {correct / total:.4f} ({correct}/{total} images)")
    tl.finish(state)


if __name__ == "__main__":
    main()

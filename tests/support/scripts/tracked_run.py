"""A short run tracked by TensorBoard, MLflow and JSONLines, checkpointing as it goes.

argv: RUN_DIR. Prints "step N" after every optimizer step (one write per line) and sleeps
`--slow` seconds so a test can SIGKILL it mid-run and start it again.
"""

import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the repository root: tests.support
import trainloop as tl
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Checkpoint, JSONLines, MLflow, TensorBoard

parser = argparse.ArgumentParser()
parser.add_argument("run_dir")
parser.add_argument("--slow", type=float, default=0.0)
args = parser.parse_args()

state = tl.init(log_every=2, seed=1, callbacks=[
    TensorBoard(os.path.join(args.run_dir, "tb")),
    MLflow(experiment="killed", dir=os.path.join(args.run_dir, "ml")),
    JSONLines(os.path.join(args.run_dir, "metrics.jsonl")),
    Checkpoint(os.path.join(args.run_dir, "ckpt"), every=3),
])
model = tiny_model()
state, model, optimizer, loader = tl.prepare(
    state, model, torch.optim.SGD(model.parameters(), lr=0.05),
    DataLoader(regression_data(64), batch_size=4, shuffle=True))
for _epoch in range(loader.epoch, 1):
    for x, y in loader:
        loss = mse(model, x, y)
        state = tl.step(tl.backward(state, loss), optimizer)
        state = tl.log(state, loss=loss)
        print(f"step {state.step}\n", end="", flush=True)
        time.sleep(args.slow)
tl.finish(state)

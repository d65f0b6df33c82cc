"""A tiny DDP training run for the launcher tests: writes rank 0's final weights to argv[1].

`--die-once DIR`: the first attempt's rank 1 kills itself (SIGKILL) mid-run; the marker file in
DIR makes the restarted attempt run through.
`--then-reduce DIR`: after saving, each worker writes its pid to DIR/<rank>.pid and all-reduces
with the others until something stops the job (a test kills one machine).
"""

import argparse
import os
import signal
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the repository root: tests.support
import trainloop as tl
from tests.support.reference import mse, regression_data, tiny_model

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--die-once", default=None)
parser.add_argument("--then-reduce", default=None)
args = parser.parse_args()

state = tl.init(seed=3)
model = tiny_model()
state, model, optimizer, loader = tl.prepare(
    state, model, torch.optim.AdamW(model.parameters(), lr=1e-2),
    DataLoader(regression_data(40), batch_size=4, shuffle=True))
for _epoch in range(loader.epoch, 2):
    for x, y in loader:
        with tl.accumulate(state, model):
            state = tl.backward(state, mse(model, x, y))
        state = tl.step(state, optimizer)
        marker = args.die_once and os.path.join(args.die_once, "died")
        if marker and state.rank == 1 and state.step == 3 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
if state.is_main:
    torch.save({"weights": tl.unwrap(model).state_dict(), "world_size": state.world_size,
                "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))}, args.out)
if args.then_reduce:
    with open(os.path.join(args.then_reduce, f"{state.rank}.pid"), "w") as file:
        file.write(str(os.getpid()))
    while True:
        tl.reduce(state, torch.ones(1))
        time.sleep(0.05)
tl.finish(state)

"""A run with everything that makes exact resumption hard, checkpointing as it goes.

Shuffling, dropout, AdamW, an LR scheduler, and accumulation with a short last window. Writes
rank 0's final weights, optimizer state, LR, step and loss scale (fp16), and every rank's next
RNG draws, to `out`.

`--kill-in-save STEP` SIGKILLs the process in the middle of writing the checkpoint of STEP (all
files written, not yet renamed into place). `--kill-in-prune` SIGKILLs it in the middle of the
first prune (`keep`), after one of the old checkpoint's files is deleted. `--slow-write` makes
every write of a checkpoint file slower, so that background saves are in flight most of the time.
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
import trainloop.checkpoint
import trainloop.checkpoint.files
from tests.support.reference import mse, regression_data, tiny_model
from trainloop.callbacks import Checkpoint, LossScale

parser = argparse.ArgumentParser()
parser.add_argument("checkpoints")
parser.add_argument("out")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--every", type=int, default=2)
parser.add_argument("--slow", type=float, default=0.0, help="seconds to sleep per optimizer step")
parser.add_argument("--keep", type=int, default=3)
parser.add_argument("--slow-write", type=float, default=0.0,
                    help="seconds each write of a checkpoint file takes longer (a slow disk)")
parser.add_argument("--kill-in-save", type=int, default=None)
parser.add_argument("--kill-in-prune", action="store_true")
parser.add_argument("--precision", default="fp32")
args = parser.parse_args()

if args.kill_in_save is not None:
    replace_dir = trainloop.checkpoint.writing._replace_dir

    def replace_dir_or_die(source, target):
        if target.name == f"step-{args.kill_in_save:08d}":
            os.kill(os.getpid(), signal.SIGKILL)
        replace_dir(source, target)

    trainloop.checkpoint.writing._replace_dir = replace_dir_or_die

if args.slow_write:  # the background saves then span several steps: kills land mid-write
    write = trainloop.checkpoint.files.HashingFile.write

    def slow_write(self, data):
        time.sleep(args.slow_write)
        return write(self, data)

    trainloop.checkpoint.files.HashingFile.write = slow_write

if args.kill_in_prune:  # the run's first deletions are a prune's (it starts in a fresh directory)
    unlink, unlinked = os.unlink, []

    def unlink_or_die(*unlink_args, **kwargs):
        unlink(*unlink_args, **kwargs)
        unlinked.append(1)
        if len(unlinked) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    os.unlink = unlink_or_die

state = tl.init(accumulate=3, seed=11, precision=args.precision,
                callbacks=[Checkpoint(args.checkpoints, every=args.every, keep=args.keep)])
model = tiny_model(dropout=0.2)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
loader = DataLoader(regression_data(44), batch_size=4, shuffle=True)
state, model, optimizer, loader, scheduler = tl.prepare(state, model, optimizer, loader, scheduler)
# One write per line (end=""), so that the ranks' lines never interleave mid-line.
print(f"pid {state.rank} {os.getpid()} resumed_at {state.step}\n", end="", flush=True)

for _epoch in range(loader.epoch, args.epochs):
    for x, y in loader:
        with tl.accumulate(state, model):
            state = tl.backward(state, mse(model, x, y))
        before = state.step
        state = tl.step(state, optimizer)
        if state.step != before:
            print(f"step {state.step}\n", end="", flush=True)
            time.sleep(args.slow)

draws = tl.gather(state, torch.rand(1, 3))
if state.is_main:
    torch.save({"weights": tl.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "lr": scheduler.get_last_lr(), "step": state.step, "draws": draws,
                "restarts": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
                "loss_scale": next((c.state_dict() for c in state.callbacks if isinstance(c, LossScale)), None)},
               args.out)
tl.finish(state)

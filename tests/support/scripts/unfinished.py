"""A run that ends without `tl.finish`.

Trains `--steps` steps with `Checkpoint(every=5)` and a JSONLines tracker (log_every=1), then the
script simply ends. `--slow-write` makes every checkpoint write slower, so the last periodic save
is still in flight when the interpreter exits. `--direct` instead makes one `tl.save(...,
background=True)` of a prepared model and ends at once. `--fail-last-save` fills the "disk"
(RLIMIT_FSIZE) just before the last periodic save, so the save in flight at exit fails.
"""

import argparse
import os
import resource
import signal
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reference import mse, regression_data, tiny_model

import trainloop as tl
from trainloop.callbacks import Checkpoint, JSONLines

parser = argparse.ArgumentParser()
parser.add_argument("directory")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--slow-write", type=float, default=0.0)
parser.add_argument("--direct", action="store_true")
parser.add_argument("--fail-last-save", action="store_true")
args = parser.parse_args()

if args.slow_write:
    from trainloop.checkpoint.files import HashingFile

    write = HashingFile.write

    def slow_write(self, data):
        time.sleep(args.slow_write)
        return write(self, data)

    HashingFile.write = slow_write

if args.direct:
    state = tl.init(seed=0)
    state, model = tl.prepare(state, tiny_model())
    future = tl.save(state, os.path.join(args.directory, "step-1"), background=True)
    print("saving in the background\n", end="", flush=True)
    sys.exit(0)  # an ordinary end; nothing waits for the Future

state = tl.init(seed=0, log_every=1, callbacks=[Checkpoint(args.directory, every=5),
                                                JSONLines(os.path.join(args.directory, "metrics.jsonl"))])
model = tiny_model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
state, model, optimizer, loader = tl.prepare(state, model, optimizer,
                                             DataLoader(regression_data(64), batch_size=2))
batches = iter(loader)
last_save = args.steps // 5 * 5
for _ in range(args.steps):
    if args.fail_last_save and state.step + 1 == last_save and state.is_main:
        time.sleep(1.0)  # the saves before it are committed (a tiny run steps in microseconds)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    loss = mse(model, *next(batches))
    state = tl.step(tl.backward(state, loss), optimizer)
    state = tl.log(state, loss=loss)
print(f"trained to step {state.step}\n", end="", flush=True)
# No tl.finish(state): the script ends here.

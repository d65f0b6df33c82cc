"""The FSDP run of tests/multiprocess/fsdp_workers.py `resumable_training`, checkpointing every 2
steps in the background (the Checkpoint callback's default: async sharded saves).

Run under `python -m trainloop.spawn -n 2`. Resumes from the newest good checkpoint in
`checkpoints`; writes rank 0's final full weights and step to `out`.

`--kill-in-save STEP` SIGKILLs rank 1 in the middle of the background save of STEP, after the
loop went on: DCP's write of rank 1's shards (on DCP's thread) waits until the loop has finished
step STEP + 1, writes the shard file, and the process is killed before the metadata, the
manifest and the rename.
"""

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the repository root: tests.support
import trainloop as tl
from tests.multiprocess.fsdp_workers import resumable_training
from tests.support.models import full_weights

parser = argparse.ArgumentParser()
parser.add_argument("checkpoints")
parser.add_argument("out")
parser.add_argument("--kill-in-save", type=int, default=None)
args = parser.parse_args()
went_on = threading.Event()  # the loop finished the step after the killed save's

if args.kill_in_save is not None and int(os.environ.get("RANK", "0")) == 1:
    write_data = FileSystemWriter.write_data

    def write_data_then_die(self, plan, planner):
        name = Path(self.path).name  # the save's own temporary directory: .step-N.<host>-<pid>-<n>.partial
        if not (name.startswith(f".step-{args.kill_in_save:08d}.") and name.endswith(".partial")):
            return write_data(self, plan, planner)
        if not went_on.wait(timeout=120):
            print("the loop did not go on while the save was in flight\n", end="", flush=True)
        written = write_data(self, plan, planner)
        written.wait()
        print(f"killed in the save of step {args.kill_in_save}\n", end="", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        return written

    FileSystemWriter.write_data = write_data_then_die


def report(state):
    print(f"rank {state.rank} step {state.step}\n", end="", flush=True)
    if args.kill_in_save is not None and state.step == args.kill_in_save + 1:
        went_on.set()


state, model = resumable_training(args.checkpoints, on_step=report)
weights = full_weights(model)
if state.is_main:
    print(f"resumed_from {state.callbacks[0].restored_from}\n", end="", flush=True)
    torch.save({"weights": weights, "step": state.step}, args.out)
tl.finish(state)

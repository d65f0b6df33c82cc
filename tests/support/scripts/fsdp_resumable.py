"""The FSDP run of tests/multiprocess/fsdp_workers.py `resumable_training`, checkpointing every 2 steps.

Run under `python -m trainloop.spawn -n N` at any N in (1, 2, 4): the global batch is the same.
Resumes from the newest good checkpoint in `checkpoints`; writes rank 0's final full weights and
step to `out`.

`--kill-in-save STEP` SIGKILLs rank `--kill-rank` inside the sharded save of STEP: right after
torch.distributed.checkpoint wrote that rank's shard file, before the metadata, the manifest and
the rename.
"""

import argparse
import os
import signal
import sys
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
parser.add_argument("--kill-rank", type=int, default=1)
args = parser.parse_args()

if args.kill_in_save is not None and int(os.environ.get("RANK", "0")) == args.kill_rank:
    write_data = FileSystemWriter.write_data

    def write_data_then_die(self, plan, planner):
        written = write_data(self, plan, planner)
        name = Path(self.path).name  # the save's own temporary directory: .step-N.<host>-<pid>-<n>.partial
        if name.startswith(f".step-{args.kill_in_save:08d}.") and name.endswith(".partial"):
            os.kill(os.getpid(), signal.SIGKILL)
        return written

    FileSystemWriter.write_data = write_data_then_die


def report(state):
    print(f"step {state.step}\n", end="", flush=True)


state, model = resumable_training(args.checkpoints, on_step=report)
weights = full_weights(model)
if state.is_main:
    print(f"resumed_from {state.callbacks[0].restored_from}\n", end="", flush=True)
    torch.save({"weights": weights, "step": state.step}, args.out)
tl.finish(state)

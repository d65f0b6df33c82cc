"""Write tests/support/data/v1-checkpoint: a format-1 (SHA-256) checkpoint, made by trainloop's own code
of that format (commit 2974358), for the test that today's trainloop still loads it.

    git worktree add /tmp/v1 2974358    # or any checkout of that commit
    PYTHONPATH=/tmp/v1 python tests/support/data/make_v1_checkpoint.py tests/support/data/v1-checkpoint

The run is `v1_run()` in tests/checkpoint/test_checkpoint_background.py, trained two optimizer steps.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

old = Path(os.environ["PYTHONPATH"].split(os.pathsep)[0])
# An editable install maps trainloop.callbacks to the working tree's callbacks/: use the old
# checkout's instead, so that every module of the run is that commit's.
spec = importlib.util.spec_from_file_location("trainloop.callbacks", old / "callbacks" / "__init__.py",
                                              submodule_search_locations=[str(old / "callbacks")])
callbacks = importlib.util.module_from_spec(spec)
sys.modules["trainloop.callbacks"] = callbacks
spec.loader.exec_module(callbacks)

import trainloop as tl  # noqa: E402
import trainloop.checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[3]))  # the repository root: tests.support
from tests.support.reference import mse, regression_data, tiny_model  # noqa: E402

assert trainloop.checkpoint.FORMAT_VERSION == 1 and Path(tl.__file__).is_relative_to(old), tl.__file__
model = tiny_model(seed=5)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
state = tl.init(seed=3)
state, model, optimizer, loader, scheduler = tl.prepare(
    state, model, optimizer, DataLoader(regression_data(16), batch_size=4, shuffle=True), scheduler)
batches = iter(loader)
for _ in range(2):
    state = tl.step(tl.backward(state, mse(model, *next(batches))), optimizer)
tl.save(state, Path(sys.argv[1]))
print("wrote", sys.argv[1], "with", tl.__file__)

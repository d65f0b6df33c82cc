"""One of two jobs saving the same checkpoint path at once.

Every weight of the model and the callback's state hold `marker`; saves `times` times to `path`
(synchronously) and prints how many saves succeeded and how many were refused.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import trainloop as tl
from trainloop.callbacks import Callback
from trainloop.checkpoint import CheckpointError


class Marker(Callback):
    def __init__(self, marker: float):
        self.marker = marker

    def state_dict(self):
        return {"marker": self.marker}


path, marker, times = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
model = torch.nn.Linear(256, 256)
torch.nn.init.constant_(model.weight, marker)
torch.nn.init.constant_(model.bias, marker)
state = tl.init(callbacks=[Marker(marker)])
state, model = tl.prepare(state, model)
saved, refused = 0, 0
for _ in range(times):
    try:
        tl.save(state, path)
        saved += 1
    except CheckpointError as error:
        refused += 1
        last = str(error)
print(f"saved {saved} refused {refused}\n", end="", flush=True)
if refused:
    print(last)

"""A job that checkpoints into a directory and waits there until it is killed."""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import trainloop as tl
from trainloop.callbacks import Checkpoint

state = tl.init(callbacks=[Checkpoint(sys.argv[1], every=1, resume=False)])
model = torch.nn.Linear(2, 2)
state, model, optimizer = tl.prepare(state, model, torch.optim.SGD(model.parameters(), lr=0.1))
print("holding", flush=True)
time.sleep(600)

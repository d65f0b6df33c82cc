"""Rank argv[1] hangs (sleeps); the others wait for it in a collective with a 3 s timeout."""

import sys
import time

import torch

import trainloop as tl

state = tl.init(timeout=3)
if state.rank == int(sys.argv[1]):
    time.sleep(600)
tl.reduce(state, torch.zeros(1))
tl.finish(state)

"""Rank argv[1] raises; the others wait in a collective for it."""

import sys

import trainloop as tl

state = tl.init()
if state.rank == int(sys.argv[1]):
    raise RuntimeError(f"deliberate failure on rank {state.rank}")
tl.barrier(state)
tl.finish(state)

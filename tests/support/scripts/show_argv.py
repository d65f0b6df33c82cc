"""Prints one line `seen {json}`: the arguments, path, name and settings this script sees.

Runs as a script (`spawn show_argv.py ...`) or as a module (`spawn -m show_argv ...` from this
directory).
"""

import json
import sys

import trainloop as tl

state = tl.init()
seen = {"argv": sys.argv, "path0": sys.path[0], "name": __name__, "file": __file__,
        "world_size": state.world_size, "precision": state.config.precision}
print("seen " + json.dumps(seen), flush=True)
tl.finish(state)

"""Each worker writes its pid to argv[1]/<rank>.pid, then waits to be stopped."""

import os
import sys
import time

import trainloop as tl

state = tl.init()
with open(os.path.join(sys.argv[1], f"{state.rank}.pid"), "w") as file:
    file.write(str(os.getpid()))
while True:
    time.sleep(0.1)

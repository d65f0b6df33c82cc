"""`python -m trainloop.spawn ...`: the command line (trainloop.spawn.command_line)."""

import sys

from trainloop.spawn.command_line import main

sys.exit(main())

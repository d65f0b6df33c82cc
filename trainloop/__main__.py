"""`python -m trainloop COMMAND`: trainloop's commands.

    python -m trainloop env [--json]     versions, devices, backends, variables: for bug reports

Processes are started by `python -m trainloop.spawn` (see its --help).
"""

from __future__ import annotations

import sys

COMMANDS = {"env": "versions, devices, distributed backends and the variables that matter: for bug reports"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<6} {text}" for name, text in COMMANDS.items())
        usage = f"usage: python -m trainloop COMMAND [options]\n\ncommands:\n{listing}\n\n" \
                "To start processes: python -m trainloop.spawn --help"
        known = not argv or argv[0] in ("-h", "--help")
        print(usage if known else f"unknown command {argv[0]!r}\n\n{usage}", file=sys.stdout if known else sys.stderr)
        return 0 if known else 2
    from trainloop import env

    return env.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

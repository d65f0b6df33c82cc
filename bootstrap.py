"""Set up a development environment and run something in it. Needs only Python 3.10+.

    python3 bootstrap.py train      # set up, then train the digits example (a real job)
    python3 bootstrap.py test       # set up, then run the whole test suite
    python3 bootstrap.py test --fast    # only the fast tier: no process start-ups, under a minute
    python3 bootstrap.py test -- -k checkpoint -x     # arguments after -- go to pytest

Set-up: a virtual environment in .venv (or --venv), torch (kept if the environment already has
torch >= 2.10; otherwise installed from --torch, default `torch==2.13.0`; pass e.g.
`--torch "torch==2.13.0" --torch-index https://download.pytorch.org/whl/cpu` for a CPU-only
build), then trainloop itself, editable, with the `dev` extra (pytest and the trackers).
Running it again reuses what is there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH_FLOOR = (2, 10)


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def python_of(environment: Path) -> Path:
    return environment / ("Scripts" if os.name == "nt" else "bin") / "python"


def installed_torch(python: Path) -> tuple[int, ...] | None:
    probe = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    release = probe.stdout.strip().split("+")[0]
    return tuple(int(part) for part in release.split(".")[:2] if part.isdigit())


def set_up(environment: Path, torch_spec: str, torch_index: str | None) -> Path:
    python = python_of(environment)
    if not python.exists():
        print(f"creating a virtual environment in {environment}", flush=True)
        venv.EnvBuilder(with_pip=True).create(environment)
    version = installed_torch(python)
    if version is not None and version >= TORCH_FLOOR:
        print(f"keeping the installed torch {'.'.join(map(str, version))}", flush=True)
    else:
        index = ["--index-url", torch_index] if torch_index else []
        run(str(python), "-m", "pip", "install", "--quiet", torch_spec, *index)
    run(str(python), "-m", "pip", "install", "--quiet", "-e", ".[dev]")
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("setup", "train", "test"))
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="where the virtual environment lives")
    parser.add_argument("--torch", default=os.environ.get("TORCH_SPEC", "torch==2.13.0"),
                        help="the torch requirement to install when none is present (env TORCH_SPEC)")
    parser.add_argument("--torch-index", default=os.environ.get("TORCH_INDEX_URL"),
                        help="a package index for torch, e.g. PyTorch's CPU-only wheels (env TORCH_INDEX_URL)")
    parser.add_argument("--fast", action="store_true",
                        help='test: only the fast tier, -m "not slow and not bench" (no process start-ups)')
    # Everything after `--` goes to pytest or the example untouched; before it, this script's own
    # flags may stand anywhere (`test --fast`, `--fast test`).
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_args(argv[:split])
    rest = argv[split + 1:]

    python = set_up(Path(options.venv), options.torch, options.torch_index)
    if options.action == "train":
        run(str(python), "examples/digits.py", *rest)
    elif options.action == "test":
        fast = ["-m", "not slow and not bench"] if options.fast else []
        run(str(python), "-m", "pytest", "-q", *fast, *rest)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode)

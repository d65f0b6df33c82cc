"""The package type-checks: pyright, in basic mode, on trainloop/ and callbacks/ (pyrightconfig.json).

The package ships `py.typed`, so users' type checkers read these annotations: they must hold.
pyright is in the `dev` extra (`pyright[nodejs]` brings its own Node.js); without it this skips.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO


def test_the_package_ships_py_typed_and_installs_every_subpackage():
    """`py.typed` is installed beside the code, and every folder of the source is a listed package
    (a package left out of setup.cfg is missing from the wheel, py.typed or not)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    # setuptools reads a value with line breaks one name a line, else as a comma list
    value = config["options"]["packages"].strip()
    listed = {name.strip() for name in (value.splitlines() if "\n" in value else value.split(",")) if name.strip()}
    assert (REPO / "trainloop" / "py.typed").is_file()
    assert "py.typed" in config["options.package_data"]["trainloop"]
    found = {".".join(("trainloop", *path.parent.relative_to(REPO / "trainloop").parts))
             for path in (REPO / "trainloop").rglob("__init__.py") if "callbacks" not in path.parts}
    found |= {".".join(("trainloop.callbacks", *path.parent.relative_to(REPO / "callbacks").parts))
              for path in (REPO / "callbacks").rglob("__init__.py")}
    assert found <= listed, f"setup.cfg [options] packages lacks {sorted(found - listed)}"


@pytest.mark.slow  # a Node.js process, a minute of CPU
@pytest.mark.skipif(importlib.util.find_spec("pyright") is None,
                    reason="pyright is not installed: pip install -e '.[dev]' (it is in the dev extra)")
def test_pyright_finds_no_type_errors_in_trainloop_and_callbacks():
    done = subprocess.run([sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable,
                           "-p", str(REPO)], capture_output=True, text=True, cwd=REPO, timeout=900, check=False,
                          env={**os.environ, "PYRIGHT_PYTHON_IGNORE_WARNINGS": "1"})
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not run (exit code {done.returncode}):\n{done.stdout[-5000:]}{done.stderr[-5000:]}")
    # Errors, and the warnings that are always bugs: pyrightconfig.json demotes their rule (it
    # also reports torch's dynamic attributes) but an import of a name that does not exist is one.
    found = [f"{item['file']}:{item['range']['start']['line'] + 1}: {item['message']} ({item.get('rule', '')})"
             for item in report["generalDiagnostics"]
             if item["severity"] == "error" or "is unknown import symbol" in item["message"]]
    assert not found, f"{len(found)} type errors:\n" + "\n".join(found)
    assert report["summary"]["filesAnalyzed"] > 40  # the config found the package

"""trainloop installs into someone else's project as a release would, under its free name.

One test builds the sdist and, from it, the wheel (`python -m build`, as a release is made),
installs the wheel into a fresh virtual environment and runs a small loop and
`python -m trainloop env` there, outside the source tree. The fresh environment reuses this
one's installed packages (torch above all) through a `.pth` line placed after its own
site-packages, so nothing is downloaded and the installed wheel, not the checkout, is imported.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import venv
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTRIBUTION = "trainloop-torch"  # `trainloop` on the package index is an unrelated project

# What a newcomer runs in their own project: a loop with a tracker and a checkpoint (20 lines).
LOOP = """
import torch
import trainloop as tl
from torch.utils.data import DataLoader, TensorDataset
from trainloop.callbacks import Checkpoint, JSONLines

x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
model = torch.nn.Linear(3, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
state = tl.init(seed=0, log_every=4, callbacks=[JSONLines("metrics.jsonl"), Checkpoint("ckpt")])
state, model, optimizer, loader = tl.prepare(state, model, optimizer, DataLoader(TensorDataset(x, y), batch_size=8))
for epoch in range(loader.epoch, 3):
    for xb, yb in loader:
        with tl.accumulate(state, model):
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            state = tl.backward(state, loss)
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=loss)
tl.finish(state)
print("trained", state.step, tl.__file__)
"""


# Run in the fresh environment: the wheel's requirements that what it can import does not meet.
REQUIREMENTS_MET = f"""
import importlib.metadata as metadata
from packaging.requirements import Requirement
unmet = []
for text in metadata.requires("{DISTRIBUTION}"):
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({{"extra": ""}}):
        continue  # an extra's requirement, or another Python's
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        version = None
    if version is None or not requirement.specifier.contains(version, prereleases=True):
        unmet.append(f"{{text}} (installed: {{version}})")
print(unmet)
"""


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    return parser


@pytest.mark.slow  # git ls-files
def test_the_distribution_name_is_the_free_one_and_every_install_command_uses_it():
    assert _setup_cfg()["metadata"]["name"] == DISTRIBUTION
    # Installing the distribution called plain "trainloop" (with or without extras) installs the
    # unrelated project of that name: no doc, message or script may tell a user to.
    wrong = re.compile(r"pip install [\"']?trainloop(\[|[\"'`\s)]|$)")
    found = []
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if not name.endswith((".py", ".md", ".cfg", ".toml", ".txt")) or not os.path.isfile(os.path.join(REPO, name)):
            continue
        with open(os.path.join(REPO, name), encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if wrong.search(line):
                    found.append(f"{name}:{number}: {line.strip()}")
    assert found == [], "install commands naming the wrong distribution:\n" + "\n".join(found)


def _copy_source(destination: str) -> None:
    """The files a release is built from (what git tracks), without build outputs or the venv."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in tracked.stdout.split("\0"):
        source = os.path.join(REPO, name)
        if not name or not os.path.lexists(source) or name.startswith(("tests/", "benchmarks/", "examples/")):
            continue
        target = os.path.join(destination, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)


def _fresh_environment(path: str) -> str:
    """A new venv (no pip of its own) that sees this environment's packages after its own."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = os.path.join(path, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # A .pth line appends to sys.path (after the venv's own site-packages) and, unlike a site
    # directory, runs no .pth file found there: this environment's editable trainloop stays out.
    with open(os.path.join(purelib, "zz_reuse_dev_packages.pth"), "w", encoding="utf-8") as file:
        file.write(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TRAINLOOP_")}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


@pytest.mark.slow  # builds and installs a wheel
@pytest.mark.skipif(sys.platform == "win32", reason="the fresh venv's layout is POSIX's")
def test_the_wheel_built_from_the_sdist_installs_and_trains_outside_the_checkout(tmp_path):
    pytest.importorskip("build", reason="the dev extra installs `build` (pip install -e '.[dev]')")
    source, dist, work = tmp_path / "source", tmp_path / "dist", tmp_path / "work"
    work.mkdir()
    _copy_source(str(source))
    # sdist first, then the wheel from the unpacked sdist: a file the sdist forgets fails here.
    # No isolation: setuptools comes from this environment, so nothing is downloaded.
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
                   check=True, capture_output=True, text=True, env=_clean_env())
    wheels = list(dist.glob("*.whl"))
    sdists = list(dist.glob("*.tar.gz"))
    assert [w.name.split("-")[0] for w in wheels] == ["trainloop_torch"] and len(sdists) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # The callbacks live in callbacks/ in the tree and install as trainloop.callbacks.
    assert "trainloop/callbacks/trackers.py" in names and "trainloop/__init__.py" in names
    assert not any(n.startswith(("callbacks/", "tests/")) for n in names)
    assert f"Name: {DISTRIBUTION}" in metadata
    assert {"tensorboard", "wandb", "mlflow", "fp8", "all", "dev"} <= set(re.findall(r"Provides-Extra: (\S+)", metadata))
    with tarfile.open(sdists[0]) as sdist:
        assert any(n.endswith("/callbacks/trackers.py") for n in sdist.getnames())

    python = _fresh_environment(str(tmp_path / "venv"))
    # --force-reinstall: where this environment has trainloop-torch installed editable (CI's
    # bootstrap), pip would otherwise call the wheel installed already. --no-deps: reinstalling
    # torch would need the index; the requirements are checked against what is installed below.
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index",
                                "--no-deps", "--force-reinstall", "--no-cache-dir", str(wheels[0])],
                               capture_output=True, text=True, env=_clean_env(PIP_NO_INPUT="1"))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    unmet = subprocess.run([python, "-c", REQUIREMENTS_MET], capture_output=True, text=True, env=_clean_env())
    assert unmet.returncode == 0 and unmet.stdout.strip() == "[]", unmet.stdout + unmet.stderr

    (work / "train.py").write_text(textwrap.dedent(LOOP))
    run = subprocess.run([python, "train.py"], cwd=work, capture_output=True, text=True, env=_clean_env())
    assert run.returncode == 0, run.stderr
    steps, where = run.stdout.split()[-2:]
    assert steps == "24" and where.startswith(str(tmp_path / "venv")), run.stdout  # the wheel, not the checkout
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 6
    assert (work / "ckpt" / "latest").read_text().strip() == "step-00000024"

    report = subprocess.run([python, "-m", "trainloop", "env"], cwd=work, capture_output=True, text=True,
                            env=_clean_env())
    assert report.returncode == 0, report.stderr
    assert re.search(r"^  trainloop \d", report.stdout, re.MULTILINE), report.stdout
    assert re.search(r"^  torch \d", report.stdout, re.MULTILINE), report.stdout

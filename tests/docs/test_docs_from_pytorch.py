"""docs/from-pytorch.md runs as a newcomer follows it, and docs/run.toml is what spawn reads.

Each step's diff is applied to the step before (it must apply exactly: the page shows whole
files) and the result is run as a script would be, in a directory of its own. The last step
runs under `python -m trainloop.spawn --config docs/run.toml`: one job checks both the page's
multi-process step and that the example config's values reach `tl.init`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

from tests.docs.docs_snippets import REPO, python_blocks
from trainloop.config import SETTINGS
from trainloop.spawn import checks
from trainloop.spawn import command_line as spawn

PAGE = os.path.join(REPO, "docs", "from-pytorch.md")
RUN_TOML = os.path.join(REPO, "docs", "run.toml")
LEARNED = "y = 3.00x + 1.00"


def _sections() -> list[str]:
    with open(PAGE, encoding="utf-8") as file:
        text = file.read()
    return re.split(r"^## \d\. ", text, flags=re.MULTILINE)[1:]


def _apply(diff: str, before: str) -> str:
    """The file after a whole-file diff; the diff's context and removed lines must be `before`."""
    old, new = [], []
    for line in diff.splitlines():
        mark, text = line[:1], line[1:]
        assert mark in "+- " or line == "", f"not a diff line: {line!r}"
        if mark in (" ", "-", ""):
            old.append(text)
        if mark in (" ", "+", ""):
            new.append(text)
    assert old == before.splitlines(), "the diff does not apply to the step before it"
    return "\n".join(new) + "\n"


def programs() -> list[str]:
    """The page's six programs: the plain loop, then each step's diff applied to the one before."""
    sections = _sections()
    assert len(sections) == 6, "the page has steps 0 to 5"
    code = [re.findall(r"```python\n(.*?)```", sections[0], re.DOTALL)[0]]
    for section in sections[1:]:
        diff = re.findall(r"```diff\n(.*?)```", section, re.DOTALL)
        assert len(diff) == 1, section[:60]
        code.append(_apply(diff[0], code[-1]))
    return code


def _run(code: str, directory) -> tuple[str, dict]:
    before = os.getcwd()
    os.chdir(directory)
    printed = io.StringIO()
    namespace: dict = {"__name__": "__main__"}
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "from-pytorch.md", "exec"), namespace)
    finally:
        os.chdir(before)
    return printed.getvalue(), namespace


def test_every_step_of_from_pytorch_applies_and_learns(tmp_path):
    code = programs()
    for number, program in enumerate(code[:5]):
        directory = tmp_path / f"step{number}"
        directory.mkdir()
        printed, namespace = _run(program, directory)
        assert printed.strip() == LEARNED, f"step {number} printed {printed!r}"
        if number >= 1:
            assert namespace["state"].step == (80 if number == 1 else 40)  # accumulate=2 from step 2 on
    reports = [json.loads(line) for line in (tmp_path / "step4/runs/hello/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == [10, 20, 30, 40]
    assert (tmp_path / "step4/runs/hello/ckpt/latest").read_text().strip() == "step-00000040"
    # Step 4 run again resumes: the finished run trains no further and ends with the same weights.
    first = {k: v.clone() for k, v in namespace["model"].state_dict().items()}
    printed, again = _run(code[4], tmp_path / "step4")
    assert printed.strip() == LEARNED and again["state"].step == 40 and again["loader"].epoch == 10
    assert all((again["model"].state_dict()[k] == v).all() for k, v in first.items())


def test_the_readme_hello_world_is_the_first_step_of_from_pytorch():
    readme = python_blocks("README.md", "## Hello world")
    assert readme == [programs()[1]], "README's hello world and docs/from-pytorch.md step 1 differ"


def _documented_keys() -> dict[str, str]:
    """Each key docs/run.toml shows (set or commented out) -> its line, uncommented."""
    keys = {}
    with open(RUN_TOML, encoding="utf-8") as file:
        for line in file:
            match = re.match(r"(?:# )?(\w+) = (.*?)(?:\s+#.*)?$", line.rstrip("\n"))
            if match:
                keys[match.group(1)] = f"{match.group(1)} = {match.group(2)}"
    return keys


def test_run_toml_documents_every_key_spawn_reads_and_each_is_accepted(tmp_path):
    documented = _documented_keys()
    known = set(spawn._LAUNCH_FLAGS) | {field.name for field in SETTINGS}
    assert set(documented) == known, "docs/run.toml lacks or invents keys"
    # Every example value, commented out or not, is one spawn accepts.
    everything = tmp_path / "all.toml"
    everything.write_text("\n".join(documented.values()) + "\n")
    values = spawn._read_toml(str(everything))
    launch = spawn.launch_values({k: v for k, v in values.items() if k in spawn._LAUNCH_FLAGS})
    assert launch["nproc"] == 2 and launch["master"] == "10.0.0.1:29500"
    settings = {k: v for k, v in values.items() if k not in spawn._LAUNCH_FLAGS}
    settings["device"] = "cpu"  # the example's "cuda" is valid, but this machine may have none
    settings["precision"] = "fp8"  # the fp8_* examples need it (the file's own run is fp32)
    assert checks.validated_settings(settings, {})["tp_plan"] == {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


LAST_STEP_UNDER_SPAWN = """
import json, runpy, attrs
namespace = runpy.run_path("train.py", run_name="__main__")
state = namespace["state"]
print(f"config {state.rank} {state.world_size} " + json.dumps(attrs.asdict(state.config)) + "\\n", end="", flush=True)
"""


@pytest.mark.multiprocess
def test_the_last_step_runs_under_spawn_with_docs_run_toml(tmp_path):
    (tmp_path / "train.py").write_text(programs()[5])
    (tmp_path / "wrapper.py").write_text(LAST_STEP_UNDER_SPAWN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINLOOP_")}
    job = subprocess.run([sys.executable, "-m", "trainloop.spawn", "--config", RUN_TOML, "wrapper.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert job.returncode == 0, job.stdout + job.stderr
    assert job.stdout.count(LEARNED) == 1, job.stdout  # printed by the main process only
    with open(RUN_TOML, "rb") as file:
        documented = tomllib.load(file)
    for rank in (0, 1):
        line = next(x for x in job.stdout.splitlines() if x.startswith(f"config {rank} "))
        world_size, config = line.split(" ", 3)[2:]
        assert int(world_size) == documented["nproc"]
        received = json.loads(config)
        for key, value in documented.items():
            if key not in spawn._LAUNCH_FLAGS:
                assert received[key] == value, f"{key}: run.toml says {value!r}, init got {received[key]!r}"
    reports = (tmp_path / "runs/hello/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in reports] == [10, 20]  # 2 processes: 2 steps an epoch

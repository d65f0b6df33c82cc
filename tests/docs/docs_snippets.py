"""The code blocks of README.md and docs/*.md, read as a user copies them, and the objects they assume.

tests/docs/test_docs.py runs them in one process; `readme_loop_on_ranks` runs the README's loop in the
workers of one `spawn.run`. A snippet is taken from the file every time, so editing the docs edits
the test: a snippet that stops working fails here.
"""

from __future__ import annotations

import os
import re
import textwrap
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.support.paths import REPO

EVAL_SAMPLES = 9  # odd: two ranks with batch 4 pad the last global batch (8 + 1)


def python_blocks(doc: str, heading: str) -> list[str]:
    """The ```python blocks of the section of `doc` (a path from the repository root) under `heading`."""
    with open(os.path.join(REPO, doc), encoding="utf-8") as file:
        lines = file.read().splitlines(keepends=True)
    start = lines.index(heading + "\n")
    section, fenced = [], False
    for line in lines[start + 1:]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,%d} " % heading.index(" "), line):
            break  # the next heading of the same or a higher level (not a comment inside a block)
        section.append(line)
    return re.findall(r"```python\n(.*?)```", "".join(section), re.DOTALL)


def right_column(block: str, column: int = 54) -> str:
    """The right-hand side of a side-by-side block (Accelerate | trainloop): from `column` on."""
    lines = [line[column:] if line[column - 4:column].strip() == "" else "" for line in block.splitlines()]
    return textwrap.dedent("\n".join(lines))


def readme_loop_objects() -> dict[str, Any]:
    """What the README's loop expects the user to have built: a model, an optimizer, a scheduler,
    a training loader and an evaluation loader whose labels are the sample's index (so that
    gathering shows which samples were counted)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64 + EVAL_SAMPLES, 8, generator=generator)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 5),
        "loader": DataLoader(TensorDataset(x[:64], y[:64]), batch_size=4, shuffle=True),
        "eval_loader": DataLoader(TensorDataset(x[64:], torch.arange(EVAL_SAMPLES)), batch_size=4),
    }


def run_readme_loop(directory: str) -> dict[str, Any]:
    """Run the README's loop as written, in `directory` (its paths are relative); its namespace."""
    namespace = readme_loop_objects()
    before = os.getcwd()
    os.chdir(directory)
    try:
        exec(compile(python_blocks("README.md", "## The loop")[0], "README.md: The loop", "exec"), namespace)
    finally:
        os.chdir(before)
    return namespace


def readme_loop_on_ranks(directory: str) -> dict[str, Any]:
    """The README's loop in a worker of `spawn.run`; what rank 0 saw, as plain data."""
    namespace = run_readme_loop(directory)
    state = namespace["state"]
    return {
        "world_size": state.world_size,
        "step": state.step,
        "gathered_labels": namespace["labels"].tolist(),
        "gathered_predictions": len(namespace["preds"]),
    }


def collectives_on_ranks() -> dict[str, Any]:
    """The small collectives as README.md and docs/migrating-from-accelerate.md describe them."""
    import trainloop as tl

    state = tl.init()
    rank = state.rank

    def probe(batch_size: int) -> int:
        if batch_size > (8 if rank == 1 else 32):  # only rank 1 runs out of memory above 8
            raise torch.OutOfMemoryError(f"pretend: {batch_size} does not fit")
        return batch_size * 10

    padded = tl.pad(state, torch.full((1, rank + 1), float(rank + 1)), dim=1, value=-1.0)
    results = {
        "any": tl.any(state, rank == 1),
        "all": tl.all(state, rank == 1),
        "all_true": tl.all(state, torch.tensor([True, True])),
        "gather_object": tl.gather_object(state, {"rank": rank}),
        "padded_shape": tuple(padded.shape),
        "gathered_padded": tl.gather(state, padded).tolist(),
        "split": tl.split(state, list(range(5))),
        "split_gathered": tl.gather_object(state, tl.split(state, list(range(5)))),
        "broadcast": tl.broadcast(state, {"from": rank}),
        "reduce": tl.reduce(state, torch.tensor(float(rank)), op="mean").item(),
        "find_batch_size": tl.find_batch_size(probe, 32, state=state),
    }
    tl.finish(state)
    return results


def docs_on_two_ranks(directory: str) -> dict[str, Any]:
    """One start-up, two runs in sequence: the README's loop, then the collectives."""
    return {"loop": readme_loop_on_ranks(directory), "collectives": collectives_on_ranks()}

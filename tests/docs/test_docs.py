"""The documentation's code runs as written, and its tables name what the code has.

Snippets are read from README.md and docs/*.md each time (tests/docs/docs_snippets.py), so a doc edit
that breaks one fails here. One process, except one `spawn.run` start-up for the multi-process
snippets.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import types

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import trainloop as tl
import trainloop.callbacks
from tests.docs.docs_snippets import EVAL_SAMPLES, REPO, docs_on_two_ranks, python_blocks, right_column, run_readme_loop
from trainloop import spawn
from trainloop.callbacks import Checkpoint
from trainloop.config import SETTINGS


def _readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as file:
        return file.read()


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tl.unwrap(model).state_dict().items()}


# -- README.md: the loop ------------------------------------------------------------------------


def test_readme_loop_trains_evaluates_each_sample_once_and_resumes(tmp_path):
    first = run_readme_loop(str(tmp_path))
    # 64 samples, batch 4, accumulate=4: 4 optimizer steps per epoch, 10 epochs.
    assert first["state"].step == 40
    assert first["labels"].tolist() == list(range(EVAL_SAMPLES))  # one process: in dataset order
    assert first["preds"].shape == (EVAL_SAMPLES,) and 0.0 <= float(first["accuracy"]) <= 1.0
    reports = [json.loads(line) for line in (tmp_path / "runs/exp1/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in reports] == [10, 20, 30, 40] and all("loss" in r for r in reports)
    assert (tmp_path / "runs/exp1/ckpt/latest").read_text().strip() == "step-00000040"

    # "resume-aware": the same script again continues from the checkpoint finish saved, so
    # it trains no further and its model is the first run's, not the freshly built one.
    second = run_readme_loop(str(tmp_path))
    assert second["state"].step == 40 and second["loader"].epoch == 10
    trained = _weights(first["model"])
    assert all(torch.equal(trained[k], v) for k, v in _weights(second["model"]).items())


@pytest.mark.multiprocess
def test_readme_loop_and_collectives_on_two_processes(tmp_path):
    result = spawn.run(docs_on_two_ranks, str(tmp_path), n=2)
    loop, collectives = result["loop"], result["collectives"]
    assert loop["world_size"] == 2 and loop["step"] == 20  # global batch 8: 2 steps per epoch
    # Every evaluation sample counted exactly once: gather(loader=) dropped the padding (9 = 8 + 1).
    assert loop["gathered_predictions"] == EVAL_SAMPLES
    assert sorted(loop["gathered_labels"]) == list(range(EVAL_SAMPLES))
    assert collectives["any"] is True and collectives["all"] is False and collectives["all_true"] is True
    assert collectives["gather_object"] == [{"rank": 0}, {"rank": 1}]
    assert collectives["padded_shape"] == (1, 2)  # padded to the longest rank's dim 1
    assert collectives["gathered_padded"] == [[1.0, -1.0], [2.0, 2.0]]
    assert collectives["split"] == [0, 1, 2] and collectives["split_gathered"] == [[0, 1, 2], [3, 4]]
    assert collectives["broadcast"] == {"from": 0}
    assert collectives["reduce"] == pytest.approx(0.5)
    # Rank 1 ran out of memory at 32 and 16: both ranks agree on 8, with fn's result.
    assert collectives["find_batch_size"] == (8, 80)


def test_find_batch_size_halves_and_returns_the_result():
    tried = []

    def probe(batch_size):
        tried.append(batch_size)
        if batch_size > 10:
            raise torch.OutOfMemoryError("pretend")
        return f"ran {batch_size}"

    assert tl.find_batch_size(probe, 64) == (8, "ran 8")
    assert tried == [64, 32, 16, 8]


# -- README.md: callbacks attached late, several optimizers --------------------------------------


def _regression(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=generator)
    return TensorDataset(x, x @ torch.arange(1.0, 5.0).unsqueeze(1))


def _train_steps(state, model, optimizer, loader):
    for x, y in loader:
        with tl.accumulate(state, model):
            state = tl.backward(state, torch.nn.functional.mse_loss(model(x), y))
        state = tl.step(state, optimizer)
    return state


def test_a_checkpoint_attached_after_prepare_saves_and_resumes(tmp_path):
    def run():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        state = tl.init(seed=0)
        state, model, optimizer, loader = tl.prepare(state, model, optimizer,
                                                      DataLoader(_regression(), batch_size=8, shuffle=True))
        state = tl.attach(state, Checkpoint(tmp_path / "ckpt"))  # late: its on_prepare runs now
        return state, model, optimizer, loader

    state, model, optimizer, loader = run()
    assert state.step == 0
    state = _train_steps(state, model, optimizer, loader)
    trained = _weights(model)
    tl.finish(state)  # Checkpoint saves at finish

    state, model, _, loader = run()  # the late Checkpoint resumes the run
    assert state.step == 4 and loader.epoch == 1
    assert all(torch.equal(trained[k], v) for k, v in _weights(model).items())
    tl.finish(state)


class _Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.g, self.d = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)


def _two_optimizers(pair):
    opt_g = torch.optim.SGD(pair.g.parameters(), lr=0.1)
    opt_d = torch.optim.Adam(pair.d.parameters(), lr=0.01)
    sched_g = torch.optim.lr_scheduler.StepLR(opt_g, 1, gamma=0.5)
    sched_d = torch.optim.lr_scheduler.StepLR(opt_d, 1, gamma=0.9)
    return opt_g, opt_d, sched_g, sched_d


def _gan_losses(g, d, x):
    d_loss = d(g(x).detach()).pow(2).mean() + (d(x) - 1).pow(2).mean()
    return d_loss, lambda: (d(g(x)) - 1).pow(2).mean()


@pytest.mark.parametrize("one_call", [True, False], ids=["one_call", "gan_separate_calls"])
def test_two_optimizers_step_as_a_plain_loop(one_call):
    data = _regression(1)
    # Plain PyTorch.
    pair = _Pair()
    opt_g, opt_d, sched_g, sched_d = _two_optimizers(pair)
    for x, _ in DataLoader(data, batch_size=8):
        d_loss, g_loss = _gan_losses(pair.g, pair.d, x)
        if one_call:
            (d_loss + g_loss()).backward()
            opt_g.step(), opt_d.step(), sched_g.step(), sched_d.step()
            opt_g.zero_grad(), opt_d.zero_grad()
        else:
            d_loss.backward()
            opt_d.step(), sched_d.step(), opt_d.zero_grad()
            g_loss().backward()
            opt_g.step(), sched_g.step(), opt_g.zero_grad(), opt_d.zero_grad()
    expected = _weights(pair)

    # trainloop: `tl.step(state, (opt_g, opt_d))`, or each optimizer by its own call.
    pair = _Pair()
    opt_g, opt_d, sched_g, sched_d = _two_optimizers(pair)
    state = tl.init(seed=0)
    state, pair, opt_g, opt_d, sched_g, sched_d, loader = tl.prepare(
        state, pair, opt_g, opt_d, sched_g, sched_d, DataLoader(data, batch_size=8))
    g, d = tl.unwrap(pair).g, tl.unwrap(pair).d
    for x, _ in loader:
        d_loss, g_loss = _gan_losses(g, d, x)
        if one_call:
            state = tl.backward(state, d_loss + g_loss())
            state = tl.step(state, (opt_g, opt_d))
        else:
            state = tl.backward(state, d_loss)
            state = tl.step(state, opt_d)
            state = tl.backward(state, g_loss())
            state = tl.step(state, opt_g)
            opt_d.zero_grad()  # the generator's loss leaves gradients on d, as in the plain loop
    assert all(torch.equal(expected[k], v) for k, v in _weights(pair).items())
    assert sched_g.last_epoch == sched_d.last_epoch == 4  # each once per real step of its optimizer
    assert state.step == (4 if one_call else 8)  # every tl.step call that steps counts
    tl.finish(state)


# -- docs/migrating-from-accelerate.md: the trainloop column of the side-by-side loop -------------


class _Pairs(Dataset):
    """Dict samples, as a Hugging Face dataset gives them."""

    def __init__(self):
        self.x = torch.randn(48, 6, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.x[i].sum(0, keepdim=True)}


class _ModelWithLoss(torch.nn.Module):
    """`model(**batch).loss`, as a Hugging Face model answers."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 1)

    def forward(self, inputs, labels):
        return types.SimpleNamespace(loss=torch.nn.functional.mse_loss(self.linear(inputs), labels))


def test_migration_guide_loop_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    block = python_blocks("docs/migrating-from-accelerate.md", "## The same loop, side by side")[0]
    torch.manual_seed(0)
    model = _ModelWithLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    namespace = {"model": model, "opt": opt, "sched": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                 "loader": DataLoader(_Pairs(), batch_size=4, shuffle=True), "epochs": 3}
    monkeypatch.chdir(tmp_path)
    exec(compile(right_column(block), "migrating-from-accelerate.md", "exec"), namespace)
    # 12 batches per epoch, accumulate=4: 3 steps per epoch; the scheduler once per step.
    assert namespace["state"].step == 9 and namespace["sched"].last_epoch == 9
    assert (tmp_path / "ckpt/latest").read_text().strip() == "step-00000009"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "runs/x"))


# -- docs/coming-from-fabric.md: the Fabric-style loop ---------------------------------------------


class _WithTrainingStep(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 1)

    def forward(self, x):
        return self.linear(x)

    def training_step(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)


def test_fabric_guide_loop_runs_as_written_and_equals_the_plain_loop(capsys):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 6, generator=generator), torch.randn(40, 1, generator=generator))
    torch.manual_seed(0)
    reference = _WithTrainingStep()
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    for i, batch in enumerate(DataLoader(data, batch_size=4)):
        (reference.training_step(batch) / 4).backward()
        if (i + 1) % 4 == 0:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            plain.step()
            plain.zero_grad()

    torch.manual_seed(0)
    model = _WithTrainingStep()
    namespace = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
                 "loader": DataLoader(data, batch_size=4)}
    block = python_blocks("docs/coming-from-fabric.md", "## A Fabric loop in trainloop")[0]
    exec(compile(block, "coming-from-fabric.md", "exec"), namespace)
    assert namespace["state"].step == 2  # 10 batches, a step every 4
    assert capsys.readouterr().out.splitlines()[0].startswith("step 1: loss ")
    expected = reference.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


# -- docs/trackers.md: the tracker written in the guide -------------------------------------------


def test_trackers_guide_csv_tracker_works(tmp_path):
    namespace: dict = {}
    exec(compile(python_blocks("docs/trackers.md", "## Writing your own tracker")[0], "trackers.md", "exec"),
         namespace)
    tracker = namespace["CSVMetrics"](tmp_path / "metrics.csv", columns=("loss",))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    state = tl.init(log_every=2, callbacks=[tracker])
    state, model, optimizer, loader = tl.prepare(state, model, optimizer, DataLoader(_regression(), batch_size=8))
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        state = tl.backward(state, loss)
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=loss)
    tl.finish(state)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and [row.split(",")[0] for row in rows[1:]] == ["2", "4"]


# -- README.md: the tables name everything public --------------------------------------------------


def _table_rows(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return "\n".join(line for line in text[start:end].splitlines() if line.startswith("| `"))


def _written_arguments(rows: str, name: str) -> list[str]:
    """The argument names of `name(...)` as a table writes it: `save(state, path, background=False, *, x=None)`."""
    signature = re.search(rf"`{name}\(([^`]*)\)", rows).group(1)
    return [re.match(r"\**(\w*)", part.strip()).group(1) for part in signature.split(",")]


def test_readme_api_table_lists_every_public_function_with_its_arguments():
    rows = _table_rows(_readme(), "## API")
    documented = set(re.findall(r"`(\w+)\(", rows))
    public = {name for name in (*tl.__all__, "any", "all")
              if inspect.isfunction(getattr(tl, name))}
    assert public - documented == set(), "functions missing from README's API table"
    for name in public:  # the signature written in the table names each argument
        written = _written_arguments(rows, name)
        for parameter in inspect.signature(getattr(tl, name)).parameters.values():
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) and name != "init":
                assert parameter.name in written, f"README API table: {name}({', '.join(written)}) lacks {parameter.name}"


def test_readme_callbacks_table_lists_every_callback_with_its_arguments():
    rows = _table_rows(_readme(), "### Callbacks")
    bases = {"Callback", "Tracker", "CheckpointWarning"}
    for name in set(trainloop.callbacks.__all__) - bases:
        assert f"`{name}(" in rows, f"README callbacks table lacks {name}"
        written = _written_arguments(rows, name)
        for parameter in inspect.signature(getattr(trainloop.callbacks, name)).parameters.values():
            if parameter.kind != parameter.VAR_KEYWORD:
                assert parameter.name in written, f"README callbacks table: {name}({', '.join(written)}) lacks {parameter.name}"


def test_readme_lists_every_setting_with_its_default_and_flag():
    text = _readme()
    settings = _table_rows(text, "## Settings and precedence").splitlines()
    flags_row = next(line for line in text.splitlines() if line.startswith("| `--precision`"))
    for field in SETTINGS:
        row = next((line for line in settings if line.startswith(f"| `{field.name}` |")), None)
        assert row is not None, f"README's settings table lacks {field.name}"
        assert row.split("|")[2].strip().strip("`").strip('"') == str(field.default), f"default of {row}"
        assert f"`--{field.name.replace('_', '-')}`" in flags_row, f"README's flags lack --{field.name}"


def test_init_docstring_names_every_setting_and_points_at_the_settings_table():
    doc = tl.init.__doc__
    assert "Settings and precedence" in doc and "Settings and precedence" in _readme()
    missing = [field.name for field in SETTINGS if f"`{field.name}`" not in doc]
    assert missing == [], f"tl.init's docstring lacks the settings {missing}"


def test_readme_layout_names_every_module():
    text = _readme()
    layout = text[text.index("## Layout"):]
    for folder in ("trainloop", "callbacks"):
        for name in os.listdir(os.path.join(REPO, folder)):
            if name.endswith(".py") and not name.startswith("_"):
                assert name.removesuffix(".py") in layout, f"README's Layout lacks {folder}/{name}"
    for name in os.listdir(os.path.join(REPO, "docs")):
        assert name.removesuffix(".md") in layout, f"README's Layout lacks docs/{name}"

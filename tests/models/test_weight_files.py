"""Weight files read only from where they say, as they were: HF indexes, hostile shards, files changed mid-load.

Both readers of safetensors checkpoints, `tl.load_weights` and bigmodel's `load_and_dispatch`,
share one resolver of Hugging Face checkpoints (`model.safetensors`, `*.index.json`): an index
names shards inside its own directory only, a tensor lives in exactly one shard, and every
malformed index or hostile shard is refused with a CheckpointError naming the file and the entry.
`load_weights` holds each file open for the whole load and refuses a file that changed meanwhile
(the concurrent writers here are real processes).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import trainloop as tl
from tests.support.paths import REPO
from trainloop.bigmodel import load_and_dispatch
from trainloop.errors import CheckpointError

INDEX = "model.safetensors.index.json"


class Pair(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}


def _write_index(directory: Path, weight_map: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _sharded(directory: Path, source: nn.Module) -> dict[str, str]:
    """`source`'s weights as two shards in `directory` ("first.*" and "second.*"); the weight map."""
    weights = _contiguous(source.state_dict())
    weight_map = {}
    for part in ("first", "second"):
        file = f"{part}.safetensors"
        save_file({k: v for k, v in weights.items() if k.startswith(part)}, directory / file)
        weight_map.update({k: file for k in weights if k.startswith(part)})
    return weight_map


def _load_weights(path: Path) -> nn.Module:
    model = Pair(seed=5)
    tl.load_weights(tl.init(), model, path)
    return model


def _load_and_dispatch(path: Path) -> nn.Module:
    return load_and_dispatch(Pair(seed=5), path, "cpu")


LOADERS = {"load_weights": _load_weights, "load_and_dispatch": _load_and_dispatch}


# -- item 4: an index names shards inside its own directory only ---------------------------------


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("entry", ["parent", "absolute", "symlink out", "symlinked directory"])
def test_an_index_naming_a_file_outside_its_directory_is_refused(tmp_path, loader, entry):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    weight_map = _sharded(checkpoint, Pair(seed=1))
    outside = tmp_path / "outside"
    outside.mkdir()
    (checkpoint / "second.safetensors").rename(outside / "second.safetensors")
    named = {"parent": "../outside/second.safetensors", "absolute": str(outside / "second.safetensors"),
             "symlink out": "link.safetensors", "symlinked directory": "sub/second.safetensors"}[entry]
    if entry == "symlink out":
        (checkpoint / "link.safetensors").symlink_to(outside / "second.safetensors")
    if entry == "symlinked directory":
        (checkpoint / "sub").symlink_to(outside)
    _write_index(checkpoint, {k: (named if v == "second.safetensors" else v) for k, v in weight_map.items()})
    with pytest.raises(CheckpointError, match=rf"second\.weight.*{named}.*outside the index's directory") as info:
        LOADERS[loader](checkpoint)
    assert INDEX in str(info.value)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_symlink_inside_the_directory_is_followed(tmp_path, loader):
    # Hugging Face's cache links each file to a blob under the same repository folder: allowed.
    checkpoint = tmp_path / "snapshot"
    checkpoint.mkdir()
    weight_map = _sharded(checkpoint, Pair(seed=1))
    (checkpoint / "blobs").mkdir()
    (checkpoint / "second.safetensors").rename(checkpoint / "blobs" / "abc123")
    (checkpoint / "second.safetensors").symlink_to(checkpoint / "blobs" / "abc123")
    _write_index(checkpoint, weight_map)
    model = LOADERS[loader](checkpoint)
    assert torch.equal(model.second.weight, Pair(seed=1).second.weight)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_the_hugging_face_hub_cache_layout_loads(tmp_path, loader):
    # The hub cache: snapshots/<rev>/<file> are symlinks to ../../blobs/<hash>, the index too.
    repository = tmp_path / "models--org--tiny"
    (repository / "blobs").mkdir(parents=True)
    snapshot = repository / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    weight_map = _sharded(repository / "blobs", Pair(seed=1))
    _write_index(repository / "blobs", weight_map)
    for name in (*set(weight_map.values()), INDEX):
        (repository / "blobs" / name).rename(repository / "blobs" / f"hash-{name}")
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / f"hash-{name}")
    model = LOADERS[loader](snapshot)
    assert torch.equal(model.second.weight, Pair(seed=1).second.weight)


# -- item 5: the index's weight_map decides; a tensor in two shards is an error -------------------


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_tensor_in_two_shards_is_refused_naming_both(tmp_path, loader):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    weight_map = _sharded(checkpoint, Pair(seed=1))
    stale = _contiguous(Pair(seed=2).state_dict())  # an older copy of first.weight left in the second shard
    save_file({**{k: v for k, v in _contiguous(Pair(seed=1).state_dict()).items() if k.startswith("second")},
               "first.weight": stale["first.weight"]}, checkpoint / "second.safetensors")
    _write_index(checkpoint, weight_map)
    with pytest.raises(CheckpointError, match=r"first\.weight.*first\.safetensors.*second\.safetensors"):
        LOADERS[loader](checkpoint)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_tensor_the_index_puts_in_the_wrong_shard_is_refused(tmp_path, loader):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    weight_map = _sharded(checkpoint, Pair(seed=1))
    weight_map["first.bias"] = "second.safetensors"  # the file lacks it
    (checkpoint / "first.safetensors").unlink()
    weights = _contiguous(Pair(seed=1).state_dict())
    save_file({k: v for k, v in weights.items() if k != "first.bias" and k.startswith("first")},
              checkpoint / "first.safetensors")
    _write_index(checkpoint, weight_map)
    with pytest.raises(CheckpointError, match=r"first\.bias.*second\.safetensors.*does not hold it"):
        LOADERS[loader](checkpoint)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_an_index_checkpoint_loads_as_its_weight_map_says(tmp_path, loader):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    _write_index(checkpoint, _sharded(checkpoint, Pair(seed=1)))
    model = LOADERS[loader](checkpoint)
    expected = Pair(seed=1).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


# -- item 10: malformed indexes and hostile shards name the file and the entry --------------------


MALFORMED_INDEXES = {
    "not json": ("{", r"not valid JSON"),
    "no weight_map": ("{}", r"no 'weight_map'"),
    "weight_map a list": ('{"weight_map": []}', r"'weight_map' must map tensor names to file names"),
    "file not a string": ('{"weight_map": {"first.weight": 3}}', r"first\.weight.*3.*not a file name"),
    "not an object": ("[1, 2]", r"no 'weight_map'"),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(MALFORMED_INDEXES))
def test_a_malformed_index_is_refused_naming_the_file(tmp_path, loader, case):
    text, match = MALFORMED_INDEXES[case]
    (tmp_path / INDEX).write_text(text)
    with pytest.raises(CheckpointError, match=match) as info:
        LOADERS[loader](tmp_path)
    assert str(tmp_path / INDEX) in str(info.value)


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _hostile(path: Path, case: str) -> str:
    """Write a hostile `first.safetensors` at `path`; return what the error must say."""
    good = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    data = bytes(64)
    if case == "header too large":
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
        return r"header of 1099511627776 bytes.*file of \d+ bytes"
    if case == "header not json":
        path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
        return r"header is not valid JSON"
    if case == "extents past the end":
        path.write_bytes(_safetensors_bytes({"first.weight": {**good, "data_offsets": [0, 4096]},
                                             "first.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                            data))
        return r"first\.weight.*bytes 0-4096.*data holds 64 bytes"
    if case == "size disagrees with shape":
        path.write_bytes(_safetensors_bytes({"first.weight": {**good, "data_offsets": [0, 32]}}, data))
        return r"first\.weight.*32 bytes.*\[4, 4\] F32 take 64"
    if case == "unknown dtype":
        path.write_bytes(_safetensors_bytes({"first.weight": {**good, "dtype": "Q7"}}, data))
        return r"first\.weight.*dtype 'Q7'"
    if case == "entry not an object":
        path.write_bytes(_safetensors_bytes({"first.weight": [1, 2]}, data))
        return r"first\.weight.*dtype, shape and data_offsets"
    raise AssertionError(case)


HOSTILE = ("header too large", "header not json", "extents past the end", "size disagrees with shape",
           "unknown dtype", "entry not an object")


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_shard_is_refused_naming_the_file_and_entry(tmp_path, loader, case):
    match = _hostile(tmp_path / "first.safetensors", case)
    with pytest.raises(CheckpointError, match=match) as info:
        LOADERS[loader](tmp_path / "first.safetensors")
    assert str(tmp_path / "first.safetensors") in str(info.value)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_hostile_shard_of_an_index_is_named(tmp_path, loader):
    weight_map = _sharded(tmp_path, Pair(seed=1))
    _write_index(tmp_path, weight_map)
    _hostile(tmp_path / "first.safetensors", "extents past the end")
    with pytest.raises(CheckpointError, match=r"first\.safetensors.*first\.weight"):
        LOADERS[loader](tmp_path)


def test_a_header_whose_length_reads_like_a_pickle_still_loads(tmp_path):
    # The first bytes of a safetensors file are its header's length: 0x0280 starts b"\\x80\\x02",
    # as a pickle of protocol 2 does. Only a file that is not valid safetensors is taken for torch's.
    weights = _contiguous(Pair(seed=1).state_dict())
    header, data, offset = {}, b"", 0
    for name, tensor in weights.items():
        raw = tensor.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    encoded = json.dumps(header).encode().ljust(0x280)
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    for loader in LOADERS.values():
        model = loader(tmp_path / "w.safetensors")
        assert torch.equal(model.first.weight, weights["first.weight"])


# -- issue 21 item 16: a torch.save file is not a safetensors checkpoint ---------------------------


@pytest.mark.parametrize("where", ["file", "directory"])
def test_load_weights_of_a_torch_file_says_how_to_convert(tmp_path, where):
    torch.save(Pair(seed=1).state_dict(), tmp_path / "pytorch_model.bin")
    path = tmp_path / "pytorch_model.bin" if where == "file" else tmp_path
    with pytest.raises(CheckpointError, match=r"torch\.save.*only safetensors files.*save_file") as info:
        tl.load_weights(tl.init(), Pair(), path)
    assert "pytorch_model.bin" in str(info.value)


# -- item 6: a file changed while load_weights reads it ---------------------------------------------


class Wide(nn.Module):
    """Eight 4 MiB weights: a 32 MiB file, so a load reads it over several windows."""

    def __init__(self, fill: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(1024, 1024, bias=False) for _ in range(8))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.fill_(fill)


WRITER = textwrap.dedent("""
    import os, sys, time
    mode, target, first, second, ready, loader = sys.argv[1:]
    versions = [open(first, "rb").read(), open(second, "rb").read()] if mode != "replace" else [first, second]

    def loader_has_it_open():
        fds = f"/proc/{loader}/fd"
        try:
            return any(os.readlink(os.path.join(fds, fd)) == target for fd in os.listdir(fds))
        except OSError:
            return False

    turn = 0
    while True:
        turn += 1
        version = versions[turn % 2]
        if mode == "replace":  # a new file renamed over the old one, as a save would do
            os.link(version, target + ".tmp")
            os.replace(target + ".tmp", target)
        elif mode == "rewrite":  # the same file overwritten in place, once the loader has opened it
            while not loader_has_it_open():
                time.sleep(0.0005)
            with open(target, "r+b") as f:
                f.write(version)
            while loader_has_it_open():
                time.sleep(0.0005)
        else:  # truncated in place, then written back whole
            with open(target, "r+b") as f:
                f.truncate(len(version) // 3)
                time.sleep(0.001)
                f.seek(0)
                f.write(version)
        if turn == 4 or mode == "rewrite":
            open(ready, "w").close()
""")


@pytest.fixture
def writer(tmp_path):
    """Start a process changing `target` between two versions (all ones / all twos) until the test ends."""
    started = []

    def start(mode: str) -> Path:
        target = tmp_path / "model.safetensors"
        versions = [tmp_path / "ones.safetensors", tmp_path / "twos.safetensors"]
        for path, fill in zip(versions, (1.0, 2.0)):
            save_file(_contiguous(Wide(fill).state_dict()), path)
        target.write_bytes(versions[0].read_bytes())
        ready = tmp_path / "ready"
        process = subprocess.Popen([sys.executable, "-c", WRITER, mode, str(target), *map(str, versions), str(ready),
                                    str(os.getpid())])
        started.append(process)
        deadline = time.monotonic() + 60
        while not ready.exists() and mode != "rewrite":
            assert process.poll() is None and time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.01)
        return target

    yield start
    for process in started:
        process.kill()
        process.wait()


def _one_version(model: nn.Module) -> float | None:
    """The fill value if every weight holds the same one, else None (a mix of versions)."""
    values = {v.item() for layer in model.layers for v in layer.weight.unique()}
    return values.pop() if len(values) == 1 else None


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("mode", ["replace", "rewrite"])
def test_a_file_changed_during_load_weights_is_refused_never_mixed(writer, mode):
    # "replace": a new file renamed over the old one all the time (the inode moves). "rewrite": the
    # file written in place while a load holds it open (its modification time moves; a write that
    # began before the load opened the file, or within one tick of the clock timestamps come
    # from, is beyond what size, mtime and inode can show).
    target = writer(mode)
    outcomes = []
    for _ in range(8):
        time.sleep(0.02)  # a new clock tick: each in-place write gets a modification time of its own
        model = Wide()
        try:
            tl.load_weights(tl.init(), model, target)
        except CheckpointError as error:
            assert "changed while it was being loaded" in str(error) and str(target) in str(error)
            outcomes.append("refused")
            continue
        outcomes.append(_one_version(model))
        assert outcomes[-1] in (1.0, 2.0), f"a load mixed two versions of the file: {outcomes}"
    if mode == "rewrite":  # the writer waits for each load to open the file: it is always caught
        assert "refused" in outcomes, outcomes


TRUNCATION_LOAD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    import trainloop as tl
    from trainloop.errors import CheckpointError
    from tests.models.test_weight_files import Wide
    for _ in range(8):
        try:
            tl.load_weights(tl.init(), Wide(), sys.argv[1])
        except (CheckpointError, FileNotFoundError) as error:
            print("refused:", str(error)[:200])
""")


@pytest.mark.slow  # starts a process
def test_a_file_truncated_during_load_weights_is_an_error_never_a_crash(writer):
    target = writer("truncate")
    done = subprocess.run([sys.executable, "-c", TRUNCATION_LOAD, str(target), str(REPO)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"the loading process died (returncode {done.returncode}): {done.stderr[-2000:]}"


def test_a_truncated_file_is_refused_before_reading(tmp_path):
    save_file(_contiguous(Pair(seed=1).state_dict()), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*past the end.*truncated"):
        tl.load_weights(tl.init(), Pair(), tmp_path / "w.safetensors")

"""Worker and models for tests/checkpoint/test_export_hf.py: one 2-rank FSDP2 start-up trains a tiny
Llama a step and exports it (fp32 and bf16), then measures rank 0's peak memory while it exports
a wider model. Returns plain data; the tests assert."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
from pathlib import Path

import torch
from torch import nn

import trainloop as tl
from tests.support.checks import WorkerResults
from tests.support.hf_models import prompt, tiny_llama


class TitanBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.wq = nn.Linear(width, width, bias=False)
        self.feed_forward = nn.Module()
        self.feed_forward.w2 = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.feed_forward.w2(torch.tanh(self.attention.wq(x)))


class TitanStyle(nn.Module):
    """A model named as torchtitan names Llama: tok_embeddings, layers.N.attention.wq, norm, output."""

    def __init__(self, vocab: int = 16, width: int = 8) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(TitanBlock(width) for _ in range(2))
        self.norm = nn.RMSNorm(width)
        self.output = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def titan_to_hf() -> dict[str, str]:
    """torchtitan's Llama `from_hf_map`, inverted (as its adapter's to_hf does), for TitanStyle's tensors."""
    from_hf_map = {"model.embed_tokens.weight": "tok_embeddings.weight",
                   "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
                   "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
                   "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    return {titan: hf for hf, titan in from_hf_map.items()}


class Wide(nn.Module):
    """16 blocks of a 1024² Linear (4 MiB each in fp32): a model whose whole size RSS shows clearly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(1024, 1024, bias=False)) for _ in range(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@contextlib.contextmanager
def disk_full(room: int = 4096):
    """RLIMIT_FSIZE: writing past `room` bytes of a file fails with EFBIG, like a full disk."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (room, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def _gathered_whole(model: nn.Module) -> dict:
    """The model's whole state dict on rank 0's CPU, gathered by torch's own DCP helper: what an
    export that gathers everything first holds (the reference for the memory check)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_above_baseline(work) -> int:
    """VmHWM minus VmRSS before `work` (clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status("VmRSS")
    kept = work()
    peak = _status("VmHWM") - baseline
    del kept
    return peak


def export_checks(directory: str) -> dict:
    out = Path(directory)
    results = WorkerResults()
    state = tl.init(strategy="fsdp", seed=0)
    with results.check("llama"):
        model = tiny_llama(tied=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state, model, optimizer = tl.prepare(state, model, optimizer)
        ids = prompt(seed=2 + state.rank, batch=4)
        model.train()
        state = tl.step(tl.backward(state, model(ids, labels=ids).loss), optimizer)
        model.eval()
        with torch.no_grad():
            results["llama_logits"] = model(prompt()).logits
        llama_dir = tl.export(state, out / "llama", hf_index=True, max_shard_size="20KB")
        bf16_dir = tl.export(state, out / "bf16", hf_index=True, dtype=torch.bfloat16)
        full = _gathered_whole(model)  # the old gather: to compare with
        if state.is_main:
            index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
            results["llama_dir"] = str(llama_dir)
            results["llama_files"] = len(set(index["weight_map"].values()))
            results["llama_tied_left_out"] = "lm_head.weight" not in index["weight_map"]
            results["bf16_files"] = sorted(str(p) for p in bf16_dir.glob("*.safetensors"))
            results["trained"] = {k: v for k, v in full.items() if k != "lm_head.weight"}
    with results.check("tp"):
        tp_state = tl.init(strategy="fsdp", tp=2, dp_shard=1, seed=0)  # the model's own base_model_tp_plan
        tp_model = tiny_llama(seed=3)
        tp_optimizer = torch.optim.AdamW(tp_model.parameters(), lr=1e-2)
        tp_state, tp_model, tp_optimizer = tl.prepare(tp_state, tp_model, tp_optimizer)
        ids = prompt(seed=4, batch=4)
        tp_state = tl.step(tl.backward(tp_state, tp_model(ids, labels=ids).loss), tp_optimizer)
        tp_model.eval()
        with torch.no_grad():
            results["tp_logits"] = tp_model(prompt()).logits
        results["tp_dir"] = str(tl.export(tp_state, out / "tp", hf_index=True, max_shard_size="20KB"))
        results["tp_sharded"] = type(tl.unwrap(tp_model).model.layers[0].self_attn.q_proj.weight).__name__
        tl.finish(tp_state)
    with results.check("disk full"):
        before = sorted(p.name for p in (out / "llama").iterdir())
        failed = None
        with disk_full() if state.is_main else contextlib.nullcontext():
            try:
                tl.export(state, out / "llama", hf_index=True, max_shard_size="20KB")
            except tl.CheckpointError as error:
                failed = str(error)
        everyone: list = [None] * state.world_size
        torch.distributed.all_gather_object(everyone, failed)
        results["disk_full_errors"] = everyone
        results["disk_full_after"] = (before, sorted(p.name for p in (out / "llama").iterdir()))
        results["disk_full_left"] = sorted(p.name for p in out.iterdir() if p.name != "tp")
    with results.check("memory"):
        wide_state = tl.init(strategy="fsdp", seed=0)
        wide_state, wide = tl.prepare(wide_state, Wide())
        results["peak"] = _peak_above_baseline(
            lambda: tl.export(wide_state, out / "wide", hf_index=True, max_shard_size="8MB"))
        results["old_peak"] = _peak_above_baseline(lambda: _gathered_whole(wide))
        results["model_bytes"] = 16 * 1024 * 1024 * 4
        results["largest"] = 1024 * 1024 * 4
        tl.finish(wide_state)
    tl.finish(state)
    return results

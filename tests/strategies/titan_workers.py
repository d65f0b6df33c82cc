"""What runs inside the worker processes of tests/test_titan.py (the torchtitan recipe, issue 20).

`titan_checks` is started once on 4 ranks and trains each combination the tests name, one after
the other in the same processes; each returns plain data (whole weights, or the refusal's
message) that the tests compare with one process over the same global batch (titan_models).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch.utils.data import DataLoader

import trainloop as tl
from tests.strategies.titan_models import Transformer, lm_loss, token_data

LLAMA_SEQUENCE_PARALLEL = {"model.layers.*.input_layernorm": "sequence_parallel",
                           "model.layers.*.post_attention_layernorm": "sequence_parallel"}
BATCH = 2  # samples per micro-batch on each data-parallel rank
STEPS = 2


def whole_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole parameters and buffers on every rank (a collective under FSDP and TP)."""
    found = {}
    for name, value in tl.unwrap(model).state_dict().items():
        full = getattr(value, "full_tensor", None)
        found[name] = (full() if full is not None else value).detach().clone()
    return found


def layout(model: torch.nn.Module) -> dict[str, list[str]]:
    """Which modules are FSDP units, checkpoint wrappers, compiled (names without the wrappers)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    def named(test) -> list[str]:
        return [name.replace("._checkpoint_wrapped_module", "") for name, module in model.named_modules()
                if test(module)]

    return {"units": named(lambda m: isinstance(m, FSDPModule)),
            "checkpointed": named(lambda m: isinstance(m, CheckpointWrapper)),
            "compiled": named(lambda m: getattr(m, "_compiled_call_impl", None) is not None)}


def build(kind: str) -> torch.nn.Module:
    """The model of a case, the same on every rank and in the one-process reference."""
    if kind == "titan":
        return Transformer()
    from transformers import GPT2LMHeadModel

    from tests.support.hf_models import gpt2_config, tiny_llama

    if kind == "llama":
        return tiny_llama().train()
    torch.manual_seed(0)  # without dropout: ranks draw other masks than one process would
    config = gpt2_config()
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config).train()


def train_run(settings: dict, kind: str = "titan", options: dict | None = None) -> dict:
    """AdamW, STEPS optimizer steps of BATCH per data-parallel rank x accumulate; whole weights.

    `options`: "steps" (other than STEPS), "sgd" (SGD at lr 0.1 instead of AdamW), "throughput" (a Throughput's arguments: it reports
    every step to a JSONLines file, whose records rank 0 returns as "metrics").
    A refusal (ValueError at init or prepare) is returned as {"refused": message}.
    """
    options = options or {}
    if settings.get("tp_plan") == "llama+sp":  # Hugging Face Llama's own plan, its norms sequence-parallel
        from trainloop.strategies.tensor_parallel import hugging_face_plan

        settings = settings | {"tp_plan": hugging_face_plan(build("llama")) | LLAMA_SEQUENCE_PARALLEL}
    steps = options.get("steps", STEPS)
    callbacks, metrics = [], None
    if "throughput" in options:
        from trainloop.callbacks import JSONLines, Throughput

        metrics = os.path.join(tempfile.mkdtemp(prefix="titan-metrics-"), "metrics.jsonl")
        callbacks = [Throughput(**options["throughput"]), JSONLines(metrics)]
    try:
        state = tl.init(seed=3, callbacks=callbacks, **settings)
    except ValueError as error:
        return {"refused": str(error)}
    model = build(kind)
    try:
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.1) if options.get("sgd")
                     else torch.optim.AdamW(model.parameters(), lr=1e-2))
        state, model, optimizer, loader = tl.prepare(
            state, model, optimizer,
            DataLoader(token_data(), batch_size=BATCH, shuffle=False))
    except ValueError as error:
        tl.finish(state)
        return {"refused": str(error)}
    for inputs, targets in loader:
        with tl.accumulate(state, model):
            loss = lm_loss(model, inputs, targets)
            state = tl.backward(state, loss)
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=loss.detach())
        if state.step == steps:
            break
    found = {"weights": whole_weights(model), "steps": state.step, **layout(tl.unwrap(model))}
    tl.finish(state)
    if metrics is not None and state.rank == 0:
        with open(metrics) as lines:
            found["metrics"] = [json.loads(line) for line in lines]
    return found


def titan_checks(cases: dict) -> dict:
    """Train every case ({name: (settings, model kind[, options])}); rank 0's results by name."""
    return {name: train_run(*case) for name, case in cases.items()}

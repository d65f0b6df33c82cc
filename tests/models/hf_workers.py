"""Worker for the 2-process Hugging Face tests: one start-up checks the prepared model through DDP
and pipeline inference of tiny GPT-2 and Llama models. Returns plain data; the tests assert."""

from __future__ import annotations

import torch
from torch import nn

import trainloop as tl
from tests.support.hf_models import CLASSES, CONFIGS, greedy, prompt, tiny_gpt2
from trainloop.bigmodel import empty_weights, pipeline


def _prepared_model_checks(state) -> dict:
    """generate, config and a DDP attribute on what prepare returns on 2 ranks."""
    _, model = tl.prepare(state, tiny_gpt2())
    users = tl.unwrap(model)
    ddp = model.module if state.config.precision == "bf16" else model
    ids = prompt()
    if state.config.precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = greedy(users, ids)
    else:
        expected = greedy(users, ids)
    config = users.config.__class__.from_dict(users.config.to_dict())
    model.config = config  # through DDP (and Autocast): generate must see the new one
    return {"config_set_reaches_users": users.config is config,
            "wrappers": [type(layer).__name__ for layer in (model, ddp)],
            "is_ddp": isinstance(ddp, nn.parallel.DistributedDataParallel),
            "generate_equal": bool(torch.equal(greedy(model, ids), expected)),
            "config_is_users": model.config is users.config,
            "ddp_keeps_its_own": ddp.require_backward_grad_sync is True}


def _pipelined_logits(state, name: str, checkpoint: str) -> dict:
    """Logits of `name` pipelined over the ranks: a meta model from the checkpoint, with an
    attention mask; and the same model with real weights (no checkpoint), cut by hand."""
    ids = prompt(batch=4)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row: the mask really changes the logits
    with empty_weights():
        meta_model = CLASSES[name](CONFIGS[name]())
    runner = pipeline(state, meta_model, (ids,), {"attention_mask": mask}, checkpoint=checkpoint, broadcast=True)
    from_checkpoint = runner(ids, attention_mask=mask)
    real = CLASSES[name](CONFIGS[name]()).eval()
    real.load_state_dict(_full_state_dict(name))
    cut = "transformer.h.1" if name == "gpt2" else "model.layers.1"
    unmasked = pipeline(state, real, (ids,), split_points=[cut], broadcast=True)(ids)
    return {"type": type(from_checkpoint).__name__, "logits": from_checkpoint.logits,
            "unmasked_type": type(unmasked).__name__, "unmasked": unmasked.logits}


def _full_state_dict(name: str) -> dict[str, torch.Tensor]:
    from tests.support.hf_models import BUILDERS

    return BUILDERS[name]().state_dict()  # seeded: the model the checkpoints were written from


class Scaled(nn.Module):
    """A model with keyword inputs, one a tensor and one a number, and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> dict:
        x = x * mask  # used by the first stage: torch's pipelining feeds inputs to it alone
        for layer in self.layers:
            x = layer(x)
        return {"scaled": x * scale, "total": x.sum(-1)}


def _keyword_inputs(state) -> dict:
    torch.manual_seed(0)
    model = Scaled().eval()
    x, mask = torch.randn(4, 8), (torch.arange(8) % 3 != 0).float().expand(4, 8)
    runner = pipeline(state, model, (x,), {"mask": mask, "scale": 2.0}, broadcast=True)
    output = runner(x, mask=mask, scale=2.0)  # the fixed value may be repeated
    with torch.no_grad():
        expected = model(x, mask=mask, scale=2.0)
    refusals = []
    for bad in ({"mask": mask, "scale": 3.0}, {"mask": mask[:, :4]}):
        try:
            runner(x, **bad)
        except ValueError as error:
            refusals.append(str(error))
    return {"type": type(output).__name__, "equal": all(torch.equal(output[k], expected[k]) for k in expected),
            "refusals": refusals}


def two_rank_hf_checks(checkpoints: dict[str, str]) -> dict:
    bf16 = tl.init(precision="bf16")
    fp32 = tl.init()  # the process group is joined once; two states coexist
    results = {"bf16": _prepared_model_checks(bf16), "fp32": _prepared_model_checks(fp32)}
    results["keywords"] = _keyword_inputs(fp32)
    for name, checkpoint in checkpoints.items():
        results[name] = _pipelined_logits(fp32, name, checkpoint)
    tl.finish(bf16)
    return results

"""What runs inside the worker processes of tests/strategies/test_titan_sp.py (issue 20: loss
parallelism, sequence parallelism between blocks).

`sp_checks` trains every case in the same processes, one after the other: AdamW, gradient
clipping and accumulation over two micro-batches, the loss computed inside `tl.loss_parallel`
(a no-op unless the case sets loss_parallel=True). Each returns plain data: whole weights, the
refusal's message, or what the model's output was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import trainloop as tl
from tests.strategies.titan_models import token_data
from tests.strategies.titan_workers import build, whole_weights

BATCH = 2  # samples per micro-batch on each data-parallel rank
ACCUMULATE = 2
STEPS = 2
MAX_NORM = 0.5  # below the first steps' gradient norms: the clipping is active

# torchtitan's plan, with the residual stream between the blocks sharded on the sequence.
TITAN_SP = {
    "tok_embeddings": "embedding_rowwise_sequence",
    "layers.*.attention_norm": "sequence_parallel", "layers.*.attention": "gather_sequence",
    "layers.*.attention.wq": "colwise", "layers.*.attention.wk": "colwise",
    "layers.*.attention.wv": "colwise", "layers.*.attention.wo": "rowwise_sequence",
    "layers.*.ffn_norm": "sequence_parallel", "layers.*.feed_forward": "gather_sequence",
    "layers.*.feed_forward.w1": "colwise", "layers.*.feed_forward.w3": "colwise",
    "layers.*.feed_forward.w2": "rowwise_sequence",
    "norm": "sequence_parallel",
    "output": "colwise_rep",
}
# The same for a Hugging Face LlamaForCausalLM.
LLAMA_SP = {
    "model.embed_tokens": "embedding_rowwise_sequence",
    "model.layers.*.input_layernorm": "sequence_parallel", "model.layers.*.self_attn": "gather_sequence",
    "model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise_sequence",
    "model.layers.*.post_attention_layernorm": "sequence_parallel", "model.layers.*.mlp": "gather_sequence",
    "model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise_sequence",
    "model.norm": "sequence_parallel",
    "lm_head": "colwise_rep",
}


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    logits = getattr(logits, "logits", logits)  # a Hugging Face model's output
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def sp_run(settings: dict, kind: str = "titan", options: dict | None = None) -> dict:
    """STEPS optimizer steps of ACCUMULATE x BATCH per data-parallel rank; whole weights, or a refusal.

    `options`: "sgd" (SGD at lr 0.1 instead of AdamW, for fp8: see tests/strategies/test_titan.py).
    """
    from trainloop.callbacks import ClipGradNorm

    options = options or {}
    try:
        state = tl.init(seed=3, callbacks=[ClipGradNorm(MAX_NORM)], **({"accumulate": ACCUMULATE} | settings))
    except ValueError as error:
        return {"refused": str(error)}
    model = build(kind)
    try:
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.1) if options.get("sgd")
                     else torch.optim.AdamW(model.parameters(), lr=1e-2))
        state, model, optimizer, loader = tl.prepare(
            state, model, optimizer, DataLoader(token_data(), batch_size=BATCH, shuffle=False))
    except ValueError as error:
        tl.finish(state)
        return {"refused": str(error)}
    found: dict = {}
    for inputs, targets in loader:
        with tl.accumulate(state, model), tl.loss_parallel(state):
            if "logits" not in found:
                with torch.no_grad():
                    logits = model(inputs)
                logits = getattr(logits, "logits", logits)
                found["logits"] = type(logits).__name__ + str(list(getattr(logits, "placements", [])))
            loss = lm_loss(model, inputs, targets)
            found["loss"] = type(loss).__name__
            state = tl.backward(state, loss)
        state = tl.step(state, optimizer)
        state = tl.log(state, loss=loss.detach())
        if state.step == STEPS:
            break
    found |= {"weights": whole_weights(model), "steps": state.step}
    tl.finish(state)
    return found


def sp_checks(cases: dict) -> dict:
    """Train every case ({name: (settings, model kind[, options])}); rank 0's results by name."""
    return {name: sp_run(*case) for name, case in cases.items()}

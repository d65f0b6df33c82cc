"""A tiny Llama-3 in torchtitan's layout, and its one-process reference loop.

torchtitan's `Transformer`: `tok_embeddings`, `layers` (an `nn.ModuleDict` keyed "0", "1", ...),
`norm`, `output`; each `TransformerBlock` holds `attention_norm`, `attention` (wq, wk, wv, wo,
grouped-query heads, rotary positions), `ffn_norm`, `feed_forward` (SwiGLU: w1, w2, w3). Heads
are viewed with -1 as torchtitan does, so a column-sharded wq gives each rank its own heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, WIDTH, HEADS, KV_HEADS, HIDDEN, LENGTH = 64, 32, 4, 2, 64, 8

# torchtitan's tensor-parallel plan in Hugging Face's style names (trainloop's tp_plan).
TP_PLAN = {
    "tok_embeddings": "embedding_rowwise",
    "layers.*.attention.wq": "colwise", "layers.*.attention.wk": "colwise",
    "layers.*.attention.wv": "colwise", "layers.*.attention.wo": "rowwise",
    "layers.*.feed_forward.w1": "colwise", "layers.*.feed_forward.w3": "colwise",
    "layers.*.feed_forward.w2": "rowwise",
    "output": "colwise_rep",
}
SP_PLAN = TP_PLAN | {"layers.*.attention_norm": "sequence_parallel", "layers.*.ffn_norm": "sequence_parallel"}


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.head_dim = WIDTH // HEADS
        self.repeats = HEADS // KV_HEADS
        self.wq = nn.Linear(WIDTH, HEADS * self.head_dim, bias=False)
        self.wk = nn.Linear(WIDTH, KV_HEADS * self.head_dim, bias=False)
        self.wv = nn.Linear(WIDTH, KV_HEADS * self.head_dim, bias=False)
        self.wo = nn.Linear(HEADS * self.head_dim, WIDTH, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.wq(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = k.repeat_interleave(self.repeats, dim=1), v.repeat_interleave(self.repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(WIDTH, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, WIDTH, bias=False)
        self.w3 = nn.Linear(WIDTH, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm = RMSNorm(WIDTH)
        self.attention = Attention()
        self.ffn_norm = RMSNorm(WIDTH)
        self.feed_forward = FeedForward()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """torchtitan's Llama-3, tiny: its blocks live in an nn.ModuleDict."""

    def __init__(self, seed: int = 0, layers: int = 2):
        super().__init__()
        torch.manual_seed(seed)
        self.tok_embeddings = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleDict({str(i): TransformerBlock() for i in range(layers)})
        self.norm = RMSNorm(WIDTH)
        self.output = nn.Linear(WIDTH, VOCAB, bias=False)
        head_dim = WIDTH // HEADS
        frequencies = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(LENGTH).float(), frequencies).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        cos, sin = self.cos[: tokens.shape[1]], self.sin[: tokens.shape[1]]
        for layer in self.layers.values():
            x = layer(x, cos, sin)
        return self.output(self.norm(x))


def token_data(n: int = 32, seed: int = 5) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH + 1), generator=generator)
    return torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    logits = getattr(logits, "logits", logits)  # a Hugging Face model's output
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def reference_loop(model: nn.Module, dataset, *, big_batch: int, steps: int, lr: float = 1e-2) -> dict:
    """One process, plain PyTorch: AdamW, one step per `big_batch` samples in dataset order."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        inputs, targets = dataset[step * big_batch:(step + 1) * big_batch]
        lm_loss(model, inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_exact(found: dict, expected: dict, *, steps: int, atol: float = 2e-5) -> None:
    """A worker's result (`steps` steps, whole weights) equals the one-process weights `expected`."""
    assert "refused" not in found, found.get("refused")
    assert found["steps"] == steps
    assert set(found["weights"]) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(found["weights"][name], value, atol=atol, rtol=1e-4,
                                   msg=lambda text, name=name: f"{name}: {text}")

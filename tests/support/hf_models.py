"""Tiny Hugging Face models built from configs (never downloaded), for the transformers-based tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests build models from configs: never reach the hub

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# torch caches its list of factory functions (`torch.utils._device._device_constructors`) on the
# first call under a `torch.device(...)` context. transformers' from_pretrained swaps in its own
# `torch.linspace` while it builds on meta: if that is the process's first such call, the cache
# holds the wrapper, and later `torch.device("meta")` blocks create linspace tensors on the CPU
# (empty_weights(include_buffers=True) in test_bigmodel saw it). Fill the cache first.
with torch.device("meta"):
    torch.empty(0)

VOCAB = 64
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # inside the tiny vocabulary


def gpt2_config(layers: int = 2) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=layers, n_head=2, **TOKENS)


def llama_config(layers: int = 2, tied: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=tied, **TOKENS)


def tiny_gpt2(seed: int = 0, layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(layers)).eval()


def tiny_llama(seed: int = 0, layers: int = 2, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(layers, tied)).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
CONFIGS = {"gpt2": gpt2_config, "llama": llama_config}
CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}


def prompt(seed: int = 1, batch: int = 2, length: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def greedy(model, ids: torch.Tensor, new_tokens: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)

"""Meta-initialised models prepare: a model's own init hook is used, and what nothing can fill awaits its load.

A Hugging Face Llama built under `tl.empty_weights()` prepares (its RMSNorms have no
`reset_parameters()`: Hugging Face's `_init_weights` initialises them), and `tl.load_weights`
then gives it a checkpoint's weights, in one process and on 2 FSDP ranks. A module nothing can
initialise holds zeros and the model refuses to run until those tensors are loaded.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaForCausalLM

import trainloop as tl
from tests.support.hf_models import llama_config, prompt, tiny_llama
from trainloop import spawn


def _save(model: nn.Module, path) -> None:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)


def _meta_llama() -> LlamaForCausalLM:
    with tl.empty_weights():
        return LlamaForCausalLM(llama_config())


def test_a_meta_built_hugging_face_llama_prepares_and_loads(tmp_path):
    source = tiny_llama(seed=3)
    _save(source, tmp_path / "model.safetensors")
    state = tl.init()
    state, model = tl.prepare(state, _meta_llama())
    assert tl.load_weights(state, model, tmp_path) == ([], [])
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in tl.unwrap(model).state_dict().items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(prompt()).logits, source(prompt()).logits)


def test_hugging_face_init_weights_initialises_a_meta_llama():
    state = tl.init(seed=7)
    state, model = tl.prepare(state, _meta_llama())
    module = tl.unwrap(model)
    norms = [m.weight for m in module.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)  # HF's init, not zeros
    linear = module.model.layers[0].mlp.up_proj.weight
    assert abs(linear.std().item() - llama_config().initializer_range) < 0.005  # normal(0, 0.02), not kaiming
    model(prompt())  # nothing awaits a load: the model runs
    state, again = tl.prepare(tl.init(seed=7), _meta_llama())
    assert torch.equal(tl.unwrap(again).model.embed_tokens.weight, module.model.embed_tokens.weight)  # seeded


class Scale(nn.Module):
    """A module with a parameter and no reset_parameters(): nothing knows how to initialise it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = Scale(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.linear(x))


def test_a_tensor_nothing_initialises_awaits_its_load(tmp_path):
    torch.manual_seed(0)
    source = Scaled()
    with torch.no_grad():
        source.scale.weight.uniform_()
    _save(source, tmp_path / "full.safetensors")
    save_file({k: v.detach() for k, v in source.state_dict().items() if k != "scale.weight"}, tmp_path / "part.safetensors")
    with tl.empty_weights():
        model = Scaled()
    state, model = tl.prepare(tl.init(), model)
    assert torch.equal(model.scale.weight, torch.zeros(4))  # zeros, not uninitialised memory
    with pytest.raises(RuntimeError, match=r"scale\.weight.*nothing could initialise.*tl\.load_weights"):
        model(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"scale\.weight: not in the checkpoint, and built on the meta device"):
        tl.load_weights(state, model, tmp_path / "part.safetensors", strict=False)
    tl.load_weights(state, model, tmp_path / "full.safetensors")
    assert torch.equal(model(torch.ones(2, 4)), source(torch.ones(2, 4)))


class Titan(nn.Module):
    """torchtitan's convention: a whole-model init_weights(buffer_device=...), no reset_parameters below."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = Scale(4)
        self.register_buffer("freqs", torch.zeros(4), persistent=False)
        self.seen_device = None

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        self.seen_device = buffer_device
        nn.init.constant_(self.scale.weight, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(x)


def test_a_whole_model_init_weights_is_used_with_the_buffer_device():
    with tl.empty_weights():
        model = Titan()
    state, model = tl.prepare(tl.init(), model)
    assert torch.equal(model.scale.weight, torch.full((4,), 3.0))
    assert model.seen_device == state.device
    assert torch.equal(model(torch.ones(4)), torch.full((4,), 3.0))  # filled: nothing awaits a load


# -- two ranks ---------------------------------------------------------------------------------


def meta_llama_on_fsdp(file: str) -> dict:
    """On each rank: a meta Llama under FSDP2, initialised by HF's hook, then loaded from `file`."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    state = tl.init(strategy="fsdp", seed=7)
    state, model = tl.prepare(state, _meta_llama())
    initialised = {k: v.full_tensor() for k, v in tl.unwrap(model).state_dict().items()}
    tl.load_weights(state, model, file)
    expected = load_file(file)
    loaded = {k: v.full_tensor() for k, v in tl.unwrap(model).state_dict().items()}
    report = {"equal": all(torch.equal(loaded[k], expected[k]) for k in expected) and loaded.keys() == expected.keys(),
              "initialised": initialised if state.rank == 0 else None}
    gathered: list = [None] * state.world_size
    dist.all_gather_object(gathered, {"equal": report["equal"]})
    tl.finish(state)
    return {"ranks": gathered, "initialised": report["initialised"]}


@pytest.mark.multiprocess
def test_a_meta_llama_on_two_fsdp_ranks_initialises_as_one_process_and_loads(tmp_path):
    _save(tiny_llama(seed=3), tmp_path / "model.safetensors")
    result = spawn.run(meta_llama_on_fsdp, str(tmp_path / "model.safetensors"), n=2)
    assert all(r["equal"] for r in result["ranks"])
    _, one = tl.prepare(tl.init(seed=7), _meta_llama())
    for name, value in tl.unwrap(one).state_dict().items():  # the same values at any world size
        assert torch.equal(result["initialised"][name], value), name


# -- fp8: the device is the run's, not the meta parameters' ------------------------------------------


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_fp8_prepares_a_meta_built_model_on_the_runs_device(tmp_path):
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    source = Wide()
    _save(source, tmp_path / "model.safetensors")
    with tl.empty_weights():
        model = Wide()
    state, model = tl.prepare(tl.init(precision="fp8"), model)  # the CPU: torchao's emulation
    assert all(isinstance(m, Float8Linear) for m in (tl.unwrap(model).up, tl.unwrap(model).down))
    tl.load_weights(state, model, tmp_path / "model.safetensors")
    assert torch.equal(tl.unwrap(model).up.weight, source.up.weight)
    assert model(torch.randn(4, 16)).shape == (4, 16)


def test_fp8_reads_the_device_of_real_parameters_and_else_the_runs():
    from trainloop.precision import _device_of

    with tl.empty_weights():
        meta_model = Wide()
    assert _device_of(meta_model, torch.device("cuda", 1)) == torch.device("cuda", 1)  # never "meta"
    assert _device_of(Wide(), torch.device("cuda", 1)) == torch.device("cpu")  # a real model's own device

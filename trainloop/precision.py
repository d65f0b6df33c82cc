"""Precision policies: what `init(precision=...)` does to a prepared model.

| policy      | parameters, optimizer state | forward                                    | loss scaling          |
| ----------- | --------------------------- | ------------------------------------------ | --------------------- |
| `fp32`      | fp32                        | fp32                                       | none                  |
| `bf16`      | fp32                        | autocast to bf16                           | none                  |
| `fp16`      | fp32                        | autocast to fp16                           | `LossScale` (dynamic) |
| `bf16-true` | bf16                        | bf16: floating inputs cast to bf16         | none                  |
| `fp16-true` | fp16                        | fp16: floating inputs cast to fp16         | none                  |
| `fp64-true` | fp64                        | fp64: floating inputs cast to fp64         | none                  |
| `fp8`       | fp32                        | torchao `Float8Linear` for the eligible `nn.Linear` layers, autocast to bf16 around the rest | none |

The true precisions (`bf16-true`, `fp16-true`, `fp64-true`) also make their dtype torch's default
dtype while the forward (or a method of the model) runs, as Lightning Fabric's do: a tensor the
model creates itself (`h + torch.zeros(4)`) has the parameters' dtype instead of fp32, which would
fail the next layer's dtype check (or silently promote to fp32). The default is restored after.
fp64 outputs leave the model as they are.

Output dtypes. Inside the forward, autocast's own rules apply: the ops it lowers (matmuls,
linear, convolutions) compute in the low-precision dtype, the ops it keeps in fp32 (on CPU and
CUDA: the losses; on CUDA also softmax, norms) compute in fp32, every other op keeps its inputs'
dtype, so a layer's output is usually bf16/fp16. At the prepared model's boundary, floating-point
outputs in fp16 or bf16 are cast to fp32 (tensors anywhere in a tuple, list, dict or other pytree
of outputs; other dtypes pass unchanged). The loss you compute from them, outside autocast, then
runs in fp32: as it does in PyTorch's recommended loop, where the loss is computed inside the
autocast region and autocast upcasts it. A loss in fp16 would lose precision, or overflow.
Accelerate and Lightning Fabric cast outputs the same way. The cost is one fp32 copy of the
outputs (for a language model's logits: what the loss would have upcast anyway).

Each row is a `Precision` (below), one object with fields, built once by `init` and kept as
`state.precision`: `prepare` calls its `cast` and `wrap`, FSDP shards under its
`fsdp_policy()`, and `init` attaches `LossScale` where it says `loss_scaling`.

The forward's part is done by `Autocast`, a small module wrapped around the prepared model; the user's
class and instance are never patched. The model's public attributes and methods are reachable
on the wrapper, and its methods (`generate`) run under the same policy as the forward
(`trainloop.forwarding`). `tl.unwrap(model)` returns the user's module.

fp8 needs torchao (`pip install "trainloop-torch[fp8]"`). Eligible layers are `nn.Linear` with both
dimensions divisible by 16 (the float8 matmul's requirement). On CUDA with compute capability
>= 8.9 torchao's float8 kernels run; on the CPU it runs in emulation (the same scaling and casts,
matmuls in high precision), so tests cover the path; anywhere else `prepare` raises instead of
silently training in another precision.

fp8's recipe is torchao's own config object (`Float8Options`, from the settings `fp8_recipe`,
`fp8_filter`, `fp8_all_gather`): `Float8LinearConfig.from_recipe_name("tensorwise" | "rowwise")`
or the user's own `Float8LinearConfig`, the layers a filter leaves in bf16, and FSDP2's float8
all-gather (`enable_fsdp_float8_all_gather`, tensorwise only). See docs/precision.md.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from trainloop.forwarding import ForwardsAttributes

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOAT8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with float8 tensor cores
FLOAT8_DIVISOR = 16  # torch._scaled_mm needs both dims of the weight divisible by 16


@attrs.frozen
class Precision:
    """A precision policy: what `init(precision=name)` does to a run, built once in `init`.

    The run keeps it as `state.precision`; `prepare` casts each model with `cast` and wraps it
    with `wrap`, FSDP shards under `fsdp_policy`, and `init` attaches `LossScale` when
    `loss_scaling` is set. A policy is its fields, no subclass: a new precision is one more
    `Precision(...)` in `POLICIES` (`fp16-true` is `param_dtype=torch.float16`).
    """

    #: The `precision` setting's value ("bf16", "bf16-true", ...).
    name: str
    #: The dtype the parameters (and so the optimizer state) are cast to; None: kept as built.
    #: Floating inputs are cast to it at the forward (fp32 data meets the cast weights).
    param_dtype: torch.dtype | None = None
    #: The dtype the forward runs under `torch.autocast` in (fp32 parameters); None: no autocast.
    autocast_dtype: torch.dtype | None = None
    #: Gradients need dynamic loss scaling (fp16's range): `init` attaches `LossScale` first.
    loss_scaling: bool = False
    #: The eligible `nn.Linear` layers train in float8 (torchao's `Float8Linear`).
    float8: bool = False
    #: With `float8`: the recipe, the filter and the all-gather (None: torchao's tensorwise, every eligible layer).
    float8_options: Float8Options | None = None

    def cast(self, model: nn.Module, device: torch.device | None = None) -> nn.Module:
        """Prepare the parameters for the policy: `param_dtype`, float8 layers; return the model.

        `model` is already on its device. The autocast policies need fp32 parameters (autocast
        computes in low precision while the optimizer updates fp32 master weights), so a model
        in fp16 or bf16 raises ValueError. `float8` swaps the eligible layers in place (see
        `_convert_to_float8`). `device` is the run's: the one a model built on the meta device
        will be materialised on (its parameters say "meta" until then).
        """
        if self.autocast_dtype is not None:
            half = next((p.dtype for p in model.parameters() if p.dtype in LOW_PRECISION), None)
            if half is not None:
                raise ValueError(
                    f"precision={self.name!r} expects fp32 parameters (autocast computes in low "
                    f"precision and the optimizer updates fp32 master weights), but the model has "
                    f"{half} parameters: build the model in fp32, or use precision='bf16-true' for "
                    "parameters in bf16"
                )
        if self.param_dtype is not None:
            return model.to(self.param_dtype)
        if self.float8:
            return _convert_to_float8(model, device, self.float8_options or Float8Options())
        return model

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` in `Autocast` for the policy's forward; returned as it is when there is nothing to do."""
        if self.param_dtype is not None:
            return Autocast(model, device.type, self.param_dtype, autocast=False)
        if self.autocast_dtype is not None:
            return Autocast(model, device.type, self.autocast_dtype)
        return model

    def fsdp_policy(self) -> Any:
        """FSDP2's `MixedPrecisionPolicy`: gather parameters and compute in the autocast dtype,
        reduce gradients in fp32. Policies without autocast get FSDP's default (none): their
        parameters already have the compute dtype."""
        from torch.distributed.fsdp import MixedPrecisionPolicy  # only FSDP runs pay for it

        if self.autocast_dtype is None:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.autocast_dtype, reduce_dtype=torch.float32)


POLICIES = (
    Precision("fp32"),
    Precision("bf16", autocast_dtype=torch.bfloat16),
    Precision("fp16", autocast_dtype=torch.float16, loss_scaling=True),
    Precision("bf16-true", param_dtype=torch.bfloat16),
    Precision("fp16-true", param_dtype=torch.float16),
    Precision("fp64-true", param_dtype=torch.float64),
    Precision("fp8", autocast_dtype=torch.bfloat16, float8=True),
)


def policy(name: str, config: Any = None) -> Precision:
    """The policy of the `precision` setting `name` (one of `POLICIES`' names).

    `config` (the run's `Config`) gives fp8 its recipe, filter and all-gather: a policy with
    `float8_options` when they are not the defaults, else the shared policy object itself.
    """
    for candidate in POLICIES:
        if candidate.name == name:
            if candidate.float8 and config is not None:
                options = Float8Options.of(config)
                if options != Float8Options():
                    return attrs.evolve(candidate, float8_options=options)
            return candidate
    raise ValueError(f"precision must be one of {', '.join(repr(p.name) for p in POLICIES)} (got {name!r})")


FLOAT8_RECIPES = ("tensorwise", "rowwise")  # torchao's Float8LinearRecipeName values trainloop names


def _filter_names(value: Any) -> tuple[str, ...]:
    """`fp8_filter` as a tuple of name fragments (a comma-separated string, or a list of them)."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)


@attrs.frozen
class Float8Options:
    """fp8's recipe, as the settings `fp8_recipe`, `fp8_filter` and `fp8_all_gather` give it.

    `recipe` is a torchao recipe name (`FLOAT8_RECIPES`) or a `torchao.float8.Float8LinearConfig`
    used as it is (its own `enable_fsdp_float8_all_gather` then says whether weights are gathered
    in float8); `keep` is the layers left in bf16: fragments of module names (a layer whose name
    contains one is not converted, torchtitan's `filter_fqns`) or a callable `(module, name) -> bool`
    (True: converted, torchao's `module_filter_fn`); `all_gather` is FSDP2's float8 all-gather.
    Layers whose dimensions are not multiples of 16 are never converted, whatever the filter says.
    """

    recipe: Any = "tensorwise"
    keep: Any = attrs.field(default=(), converter=lambda v: v if callable(v) else _filter_names(v))
    all_gather: bool = False

    @classmethod
    def of(cls, config: Any) -> Float8Options:
        return cls(config.fp8_recipe, config.fp8_filter, config.fp8_all_gather)

    def torchao_config(self, emulate: bool) -> Any:
        """torchao's `Float8LinearConfig` for these options; `emulate` on the CPU."""
        import dataclasses

        from torchao.float8 import Float8LinearConfig

        if isinstance(self.recipe, Float8LinearConfig):
            return dataclasses.replace(self.recipe, emulate=emulate) if emulate else self.recipe
        config = Float8LinearConfig.from_recipe_name(self.recipe)
        return dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=self.all_gather)

    def gathers_float8(self) -> bool:
        """Whether FSDP2 gathers the float8 layers' weights in float8 (torchao's all-gather)."""
        return bool(getattr(self.recipe, "enable_fsdp_float8_all_gather", self.all_gather))

    def converts(self, module: nn.Module, fqn: str) -> bool:
        """Whether the layer `fqn` trains in float8: eligible, and not left out by the filter."""
        if not _float8_eligible(module, fqn):
            return False
        if callable(self.keep):
            return bool(self.keep(module, fqn))
        return not any(fragment in fqn for fragment in self.keep)



class Autocast(ForwardsAttributes, nn.Module):
    """The precision policy around a prepared model's forward; the wrapped module is untouched.

    With `autocast=True` (the `bf16`, `fp16` and `fp8` policies) the forward runs under
    `torch.autocast(device_type, dtype=dtype)`. With `autocast=False` (the true policies, whose
    parameters already are `dtype`) floating-point inputs are cast to `dtype` instead, so that
    fp32 data meets bf16 weights without a dtype error, and `dtype` is torch's default dtype
    while the forward runs (tensors created inside it have the parameters' dtype). Either way,
    fp16 and bf16 outputs come back as fp32 (see the module doc).

    The wrapped model's public attributes are reachable on the wrapper (`trainloop.forwarding`),
    and its methods run under the same policy as the forward: `model.generate(...)` computes in
    bf16 under `precision="bf16"`. The policy's own settings are private (`_device_type`,
    `_dtype`, `_autocast`) so that they never hide the model's own (`model.dtype` is the
    model's parameter dtype, as Hugging Face defines it).
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype, *, autocast: bool = True):
        super().__init__()
        self.module = module
        self._device_type = device_type
        self._dtype = dtype
        self._autocast = autocast
        self._forward_writes()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.module, args, kwargs)

    def _run(self, function: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """`function(*args, **kwargs)` under the policy, its low-precision outputs cast to fp32."""
        if self._autocast:
            with torch.autocast(self._device_type, dtype=self._dtype):
                outputs = function(*args, **kwargs)
        else:
            args, kwargs = tree_map_only(torch.Tensor, self._to_dtype, (args, kwargs))
            default = torch.get_default_dtype()
            torch.set_default_dtype(self._dtype)
            try:
                outputs = function(*args, **kwargs)
            finally:
                torch.set_default_dtype(default)
        if isinstance(outputs, torch.Tensor):  # the common case, without a pytree walk
            return _to_fp32(outputs)
        return tree_map_only(torch.Tensor, _to_fp32, outputs)

    def _wrap_method(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def under_policy(*args: Any, **kwargs: Any) -> Any:
            return self._run(method, args, kwargs)

        return under_policy

    def _to_dtype(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self._dtype) if tensor.is_floating_point() else tensor

    def extra_repr(self) -> str:
        return f"device_type={self._device_type!r}, dtype={self._dtype}, autocast={self._autocast}"


def _to_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in LOW_PRECISION else tensor


def _convert_to_float8(model: nn.Module, device: torch.device | None = None,
                       options: Float8Options | None = None) -> nn.Module:
    """Swap the model's eligible `nn.Linear` layers for torchao's `Float8Linear`; return the model.

    Eligible: both dimensions divisible by 16, and kept by `options`' filter; the layers get
    torchao's config for `options`' recipe. The swap is in place, except for a model that is
    itself one eligible Linear, which is replaced (use the returned module). The weights stay
    fp32 parameters with the same names, so checkpoints load into an fp32 model as well.

    Raises ImportError naming the extra to install when torchao is missing, and ValueError on a
    device without float8 support (CUDA below compute capability 8.9, or not CUDA/CPU). On the
    CPU, torchao runs in emulation. Warns when no layer is eligible (the model then trains in bf16).
    """
    emulate = _float8_emulated(_device_of(model, device))
    from trainloop.models import quiet

    try:
        with quiet.torchao_import(cuda_available=torch.cuda.is_available()):
            from torchao.float8 import convert_to_float8_training
            from torchao.float8.float8_linear import Float8Linear
    except ImportError as error:
        raise ImportError(
            "precision='fp8' needs torchao (float8 training): pip install 'trainloop-torch[fp8]'"
        ) from error
    options = options or Float8Options()
    weights = _fresh_weight_objects(model) if options.gathers_float8() else {}
    converted = convert_to_float8_training(model, module_filter_fn=options.converts,
                                           config=options.torchao_config(emulate))
    _keep_weight_objects(converted, weights)
    if not any(isinstance(m, Float8Linear) for m in converted.modules()):
        warnings.warn(
            f"precision='fp8': {type(model).__name__} has no nn.Linear layer with both dimensions "
            f"divisible by {FLOAT8_DIVISOR}{' that fp8_filter keeps' if options.keep else ''}, so nothing "
            "runs in float8 (the rest runs under bf16 autocast); use precision='bf16' to say so",
            stacklevel=5,  # the user's tl.prepare call
        )
    return converted


def _fresh_weight_objects(model: nn.Module) -> dict[str, nn.Parameter]:
    """Each Linear's weight replaced by a new parameter on the same storage; returns the old ones by name.

    torchao's float8 all-gather wraps a weight in a new parameter of its float8-casting subclass,
    which holds the weight it wraps: `_keep_weight_objects` then swaps the wrapper into the old
    object, which must not be the one wrapped (the wrapper would hold itself).
    """
    old = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            old[name] = module.weight
            module.weight = nn.Parameter(module.weight.detach(), requires_grad=module.weight.requires_grad)
    return old


def _keep_weight_objects(model: nn.Module, weights: dict[str, nn.Parameter]) -> None:
    """Give each converted layer's new weight parameter the object of its old one.

    An optimizer built on the model before `prepare` holds the old one and would never step the
    new. Swapping the two in place (`torch.utils.swap_tensors`, as `load_weights` does) keeps the
    optimizer's, and any tied module's, reference valid. Layers left unconverted get their old one back.
    """
    from torchao.float8.float8_linear import Float8Linear

    for name, module in model.named_modules():
        if isinstance(module, Float8Linear):
            old, new = weights.get(name), module.weight
            if old is not None and new is not old:
                torch.utils.swap_tensors(old, new)
                module._parameters["weight"] = old
        elif isinstance(module, nn.Linear) and name in weights:
            module.weight = weights[name]  # not converted: its own object back


def _device_of(model: nn.Module, device: torch.device | None = None) -> torch.device:
    """Where the model computes: its first real parameter's device, else `device` (a meta-built model's)."""
    parameter = next((p for p in model.parameters() if not p.is_meta), None)
    if parameter is not None:
        return parameter.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _float8_emulated(device: torch.device) -> bool:
    """True on the CPU (emulation), False on a GPU with float8 matmuls; raises elsewhere."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability >= FLOAT8_MIN_CAPABILITY:
            return False
        found = f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}"
    else:
        found = f"the device is {device.type}"
    minimum = ".".join(map(str, FLOAT8_MIN_CAPABILITY))
    raise ValueError(
        f"precision='fp8' needs a CUDA GPU with compute capability >= {minimum} (Ada or Hopper: "
        f"L4, L40, RTX 4090, H100, ...), or the CPU (emulated, for tests); {found}. "
        "Use precision='bf16' on this device"
    )


def _float8_eligible(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and module.in_features % FLOAT8_DIVISOR == 0
            and module.out_features % FLOAT8_DIVISOR == 0)

"""Models built on the meta device: `empty_weights()` to build them, `materialize` to give them storage and values.

`empty_weights` is used by training (`tl.empty_weights()`, then `prepare`) and by big-model
inference (`trainloop.bigmodel`) alike.

A strategy calls `materialize` after it has wrapped or sharded the model, so that under FSDP2 a
rank allocates only its own shards, never the whole model. The meta tensors are then
initialised, from a generator seeded with the run's `seed` on every rank (so the values are the
same at any world size), by the first of:

- the model's own init hook: Hugging Face's `_init_weights(module)` (each module with meta
  tensors, after its `reset_parameters()` if it has one: what `post_init` does when the model is
  built whole), or a whole-model `init_weights()` (torchtitan's, given `buffer_device=`);
- each module's own `reset_parameters()` (torch's convention), children before parents (the
  order in which `__init__` ran them): equal to the model built whole after
  `torch.manual_seed(seed)` when its modules initialise in that order.

A tensor that none of them fills (a module without `reset_parameters()` that the model's hook
does not know, such as a custom norm) holds zeros and awaits its load: the model refuses to run
its forward until `tl.load_weights` has loaded every such tensor, and `load_weights` refuses a
checkpoint that lacks one (also with `strict=False`), naming them. ("Fills" is checked, not
assumed: such tensors are set to NaN before the hooks run, and any left all-NaN was not filled.)

A sharded (DTensor) parameter is initialised as a whole tensor, one module's parameters at a
time, and each rank keeps its own slice: DTensor's random ops on a CPU mesh would draw each
shard from the same numbers (duplicated rows), and elsewhere need a seed shared by all ranks.
Transient memory: the largest single module's direct parameters, unsharded. On the CPU a large
one (>= 1 MiB) lives in a mapping of its own whose pages go back to the kernel as this rank's
rows are copied out, so a rank never holds a whole tensor and its shard of it at once: the peak
above the shards is one module's tensor less its shard (issue 20: meta-init + `load_weights` of
a 28M-parameter model on 2 FSDP2 ranks peaks at 1.25x the rank's shard bytes, was 1.40x).

Buffers: `empty_weights()` keeps them real by default (rotary `inv_freq`, position ids and masks
are often computed in `__init__` and not saved, so the meta device would lose them). Built with
`include_buffers=True`, a meta buffer must be recomputed by an initialiser or loaded, as above.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Build modules inside this block with their parameters on the meta device.

    Meta tensors have a shape and a dtype but no storage, so a model of any size is built
    instantly in no memory, and its initialisation (`reset_parameters`) costs nothing.
    `dispatch` or `pipeline(checkpoint=...)` then gives it its real weights.

    Buffers stay real by default: they are often computed in `__init__` (rotary frequencies,
    position ids, masks) and not saved in checkpoints, so the meta device would lose them.
    `include_buffers=True` puts them on meta too; they must then come from the checkpoint.

    Without buffers this patches `nn.Module.register_parameter` for the duration of the block
    (restored on exit, also on an exception), so modules built by other threads meanwhile are
    affected too. With buffers it is torch's own `torch.device("meta")` context.
    """
    if include_buffers:
        with torch.device("meta"):
            yield
        return
    register_parameter = nn.Module.register_parameter

    def register_parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        # Re-registering a parameter that is already on meta is tying weights
        # (`head.weight = embed.weight`): a new object there would untie them.
        if param is not None and not param.is_meta:
            # A freshly built module's parameter is still untouched memory (torch.empty, its
            # init runs after this): moving it to meta frees it before it costs anything.
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]


def has_meta(model: nn.Module) -> bool:
    """True if any parameter or buffer of `model` is on the meta device (no storage yet)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def move_real_tensors(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to(device)` for a model that may hold meta tensors: those stay on meta."""
    if not has_meta(model):
        return model.to(device)
    return model._apply(lambda t: t if t.is_meta else t.to(device))


AWAITING = "_trainloop_awaiting_load"  # on the root module: id(tensor) -> name, of tensors no initialiser filled
_AWAITING_HOOK = "_trainloop_awaiting_hook"


def materialize(model: nn.Module, device: torch.device, seed: int) -> dict[int, nn.Parameter]:
    """Allocate `model`'s meta tensors on `device` and initialise them (see the module doc).

    In place. Returns id(meta parameter) -> the parameter that replaced it (plain meta
    parameters cannot keep their object; DTensor shards do), to re-bind optimizers built on
    the meta parameters. Tensors no initialiser fills are zeros, recorded as awaiting their load.
    """
    pending = [module for module in _post_order(model) if any(t.is_meta for t in _own_tensors(module))]
    if not pending:
        return {}
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    unsure = {id(module) for module in pending if not callable(getattr(module, "reset_parameters", None))}
    # Only what was on meta is initialised here: a module's real buffers (rotary tables) are kept.
    was_meta = {id(module): {name for store in (module._parameters, module._buffers)
                             for name, t in store.items() if t is not None and t.is_meta} for module in pending}
    model._apply(lambda t: _allocate(t, device) if t.is_meta else t)
    owners = _hf_init_owners(model)
    whole_model_init = getattr(model, "init_weights", None) if not owners else None
    accelerator = {} if device.type == "cpu" else {"devices": [device], "device_type": device.type}
    with torch.random.fork_rng(**({"devices": []} | accelerator)), torch.no_grad():
        torch.manual_seed(seed)  # the same numbers on every rank, whatever the rank's own seed
        if callable(whole_model_init):
            with contextlib.ExitStack() as whole:
                tensors = [_only(whole.enter_context(_whole_tensors(module)), was_meta[id(module)])
                           for module in pending]
                _nan_fill(tensors, pending, unsure | {id(module) for module in pending})
                _call_init_weights(whole_model_init, device)
                unfilled = _unfilled(pending, tensors)
        else:
            unfilled = []
            for module in pending:
                with _whole_tensors(module) as own:
                    tensors = _only(own, was_meta[id(module)])
                    _nan_fill([tensors], [module], unsure)
                    if callable(getattr(module, "reset_parameters", None)):
                        module.reset_parameters()  # pyright: ignore[reportCallIssue]  (Module.__getattr__ says Tensor)
                    owner = owners.get(id(module))
                    if owner is not None:
                        owner._init_weights(module)  # pyright: ignore[reportCallIssue]  (Module.__getattr__ says Tensor)
                    unfilled.extend(_unfilled([module], [tensors]))
    _await_load(model, unfilled)
    return {key: model.get_parameter(name) for key, name in names.items()}


def awaiting_load(model: nn.Module) -> dict[int, str]:
    """id(tensor) -> name of the tensors of `model` that materialize could not fill (none: empty)."""
    return getattr(model, AWAITING, {})


def loaded(model: nn.Module, tensors: list[torch.Tensor]) -> None:
    """`load_weights` has loaded `tensors` into `model`: they no longer await it."""
    awaiting = getattr(model, AWAITING, None)
    if not awaiting:
        return
    for tensor in tensors:
        awaiting.pop(id(tensor), None)
    if not awaiting:
        getattr(model, _AWAITING_HOOK).remove()
        delattr(model, AWAITING)
        delattr(model, _AWAITING_HOOK)


def _only(own: list[tuple[str, torch.Tensor]], names: set[str]) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor) for name, tensor in own if name in names]


def _allocate(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_like(tensor, device=device)


def _hf_init_owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(module) -> the nearest enclosing module (itself included) with Hugging Face's `_init_weights`."""
    owners: dict[int, nn.Module] = {}

    def visit(module: nn.Module, owner: nn.Module | None) -> None:
        if callable(getattr(module, "_init_weights", None)):
            owner = module
        if owner is not None:
            owners.setdefault(id(module), owner)
        for child in module.children():
            visit(child, owner)

    visit(model, None)
    return owners


def _call_init_weights(init_weights, device: torch.device) -> None:
    """A whole-model `init_weights`, given torchtitan's `buffer_device=` where it takes one."""
    import inspect

    try:
        takes_device = "buffer_device" in inspect.signature(init_weights).parameters
    except (TypeError, ValueError):
        takes_device = False
    init_weights(buffer_device=device) if takes_device else init_weights()


def _nan_fill(tensors: list[list[tuple[str, torch.Tensor]]], modules: list[nn.Module], unsure: set[int]) -> None:
    """Set the floating tensors of modules no `reset_parameters` covers to NaN (zeros when not floating)."""
    for module, own in zip(modules, tensors):
        if id(module) in unsure:
            for _name, tensor in own:
                tensor.fill_(float("nan") if tensor.is_floating_point() else 0)


def _unfilled(modules: list[nn.Module], tensors: list[list[tuple[str, torch.Tensor]]]) -> list[tuple[nn.Module, str]]:
    """The (module, attribute) of each floating tensor still all NaN, zeroed: nothing initialised it."""
    left = []
    for module, own in zip(modules, tensors):
        for name, tensor in own:
            if tensor.is_floating_point() and tensor.numel() and _all_nan(tensor):
                tensor.zero_()
                left.append((module, name))
            elif not tensor.is_floating_point() and not callable(getattr(module, "reset_parameters", None)):
                left.append((module, name))  # an integer meta tensor: only a load can give its values
    return left


NAN_CHECK_CHUNK = 2**16  # elements: `isnan` of a whole tensor would allocate a bool tensor as large


def _all_nan(tensor: torch.Tensor) -> bool:
    """Whether every element is NaN, a chunk at a time, stopping at the first chunk that is not.

    `torch.isnan(tensor).all()` allocates a bool tensor of the tensor's size (a quarter of an fp32
    tensor: 2.25 MiB for 1536 x 1536); freed, it stays in malloc's heap and raises the rank's resident
    memory for good. An initialised tensor fails on its first chunk.
    """
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isnan(flat[start: start + NAN_CHECK_CHUNK]).all())
               for start in range(0, flat.numel(), NAN_CHECK_CHUNK))


def _await_load(model: nn.Module, unfilled: list[tuple[nn.Module, str]]) -> None:
    """Record the tensors no initialiser filled, and refuse the model's forward until they are loaded."""
    if not unfilled:
        return
    paths = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    awaiting, never_saved = getattr(model, AWAITING, {}), []
    for module, attr in unfilled:
        tensor = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        prefix = paths.get(id(module), "").replace("_checkpoint_wrapped_module.", "")
        name = f"{prefix}.{attr}" if prefix else attr
        awaiting[id(tensor)] = name
        if attr in module._non_persistent_buffers_set:
            never_saved.append(name)
    if never_saved:  # not in any state dict, so no load can ever give them values
        raise ValueError(
            f"{type(model).__name__} was built on the meta device with its buffers "
            f"(tl.empty_weights(include_buffers=True)), but {', '.join(never_saved[:5])} are non-persistent "
            "buffers (never in a checkpoint) of modules without reset_parameters(), so nothing can give them "
            "values: give those modules a reset_parameters() that recomputes them, or build with "
            "tl.empty_weights() (buffers stay real)"
        )
    setattr(model, AWAITING, awaiting)
    if not hasattr(model, _AWAITING_HOOK):
        setattr(model, _AWAITING_HOOK, model.register_forward_pre_hook(_refuse_forward))


def _refuse_forward(module: nn.Module, args: object) -> None:
    names = sorted(awaiting_load(module).values())
    raise RuntimeError(
        f"{type(module).__name__} was built on the meta device (tl.empty_weights()), and "
        f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''} belong to modules that nothing could "
        "initialise (no reset_parameters(), and the model's own init hook did not fill them): they hold "
        "zeros until loaded. Load the weights with tl.load_weights(state, model, path) before running "
        "the model, give those modules a reset_parameters(), or build the model outside empty_weights()"
    )


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _post_order(module: nn.Module, seen: set[int] | None = None) -> Iterator[nn.Module]:
    """Each module once, children before their parent, siblings in registration order."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        yield from _post_order(child, seen)
    yield module


@contextlib.contextmanager
def _whole_tensors(module: nn.Module):
    """Swap the module's own sharded (DTensor) tensors for whole ones; keep each rank's slice."""
    from torch.distributed.tensor import DTensor

    swapped = []
    for store in (module._parameters, module._buffers):
        for name, tensor in store.items():
            if not isinstance(tensor, DTensor):
                continue
            whole, mapping = _transient(tensor.shape, tensor.dtype, tensor.to_local().device)
            if isinstance(tensor, nn.Parameter):
                whole = nn.Parameter(whole, requires_grad=tensor.requires_grad)
            store[name] = whole
            swapped.append((store, name, tensor, whole, mapping))
    own = [(name, store[name]) for store in (module._parameters, module._buffers)
           for name in store if store[name] is not None]
    try:
        yield own
    finally:
        for store, name, tensor, whole, mapping in swapped:
            store[name] = tensor
            _keep_local_part(whole.detach(), tensor, mapping)


def _transient(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, mmap.mmap | None]:
    """An uninitialised tensor for the length of one module's init, and its mapping (None: none).

    On the CPU, a large one gets a private anonymous mapping of its own (unmapped when the last
    tensor on it is freed): from malloc, each module's whole tensor, freed, stays in the process's
    heap and the next ones fragment it, so a rank's resident memory would grow by several modules'
    worth. `_keep_local_part` may keep this rank's rows in it and return the rest to the kernel.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < 2**20:
        return torch.empty(shape, dtype=dtype, device=device), None
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=dtype).view(shape), mapping


def _keep_local_part(whole: torch.Tensor, tensor: torch.Tensor, mapping: mmap.mmap | None = None) -> None:
    """Copy this rank's part of `whole` into the DTensor `tensor`'s local shard, no communication.

    Plain shards and replicas copy their box of `whole` straight in (a view: no transient copy,
    which would fragment the heap a model's worth as every module's init allocates and frees);
    other placements (FSDP over TP's strided shards) let DTensor cut it. When `whole` has a
    mapping of its own and the box is one contiguous run of it (Shard(0): a row range), the pages
    outside the box go back to the kernel first, and the box's own as they are copied: the rank
    never holds the whole tensor and its shard at once.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    if all(type(p) in (Shard, Replicate) for p in tensor.placements):
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        if tuple(shape) == tuple(local.shape):
            box = whole[tuple(slice(start, start + size) for start, size in zip(offset, shape))]
            if mapping is not None and box.is_contiguous() and box.numel() and box.dim():
                _copy_releasing(box, local, mapping)
            else:
                local.copy_(box)
            return
    # src_data_rank=None: every rank slices its own copy.
    local.copy_(distribute_tensor(whole, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local())


RELEASE_CHUNK = 2**20  # bytes of `whole` copied before their pages are returned


def _copy_releasing(box: torch.Tensor, local: torch.Tensor, mapping: mmap.mmap) -> None:
    """`local.copy_(box)`, `box` a contiguous run of `mapping`, returning the mapping's pages as they are done."""
    itemsize = box.element_size()
    begin = box.storage_offset() * itemsize
    end = begin + box.numel() * itemsize
    _release(mapping, 0, begin)
    _release(mapping, end, len(mapping))
    rows = max(1, RELEASE_CHUNK // max(1, box[0].numel() * itemsize))
    for start in range(0, box.shape[0], rows):
        local[start: start + rows].copy_(box[start: start + rows])
        _release(mapping, begin, begin + min(box.shape[0], start + rows) * box[0].numel() * itemsize)


def _release(mapping: mmap.mmap, begin: int, end: int) -> None:
    """Return the whole pages inside bytes [begin, end) of `mapping` to the kernel (they read as zeros after)."""
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, end // page * page
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

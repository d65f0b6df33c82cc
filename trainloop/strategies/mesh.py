"""The device mesh of a run: data-parallel replication x data-parallel sharding x tensor parallelism.

Settings `dp_replicate`, `dp_shard` and `tp` (the record `MeshOptions` below, `config.mesh`)
give the sizes of the three mesh dimensions; their product is the world size, and `dp_shard=-1`
(the default) takes what the other two leave. Ranks are laid out row-major over `("dp_replicate", "dp_shard", "tp")`, so `tp`
is the innermost dimension: the ranks of one tensor-parallel group are neighbours (one machine,
the fastest links), and `dp_replicate` the outermost (across machines, where HSDP's all-reduce
of already-reduced shards is the only traffic).

    shape = mesh_shape(config.mesh, world_size)         # validates; resolves dp_shard=-1
    mesh = build_mesh(shape, state.device.type)          # a `Mesh`: torch DeviceMeshes
    fully_shard(block, mesh=mesh.fsdp_mesh)              # 1-D dp_shard, or 2-D for HSDP
    apply_tp_plan(model, mesh.tp_mesh, plan)             # trainloop.strategies.tensor_parallel
    mesh.data_parallel_rank, mesh.data_parallel_size     # what the loaders shard by
    mesh.data_parallel_group                             # what gather() collects over

The data-parallel dimensions together (`dp_replicate` x `dp_shard`) are flattened into one
1-D mesh, "dp": its ranks see different batches, while the `tp` ranks of one group see
the same batch and compute the same loss. So loaders shard by the data-parallel rank and
`gather` collects over the "dp" group. Logged metrics and `num_items` are reduced over the whole
world: each tensor-parallel rank counts its batch again, `tp` times in all, and what is used is
a ratio that the repetition cancels out of (a metric's mean; `world_size / total items`).

This module imports torch.distributed.device_mesh only when a mesh is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from trainloop.errors import SettingError
from trainloop.settings import Settings, at_least, boolean, integer, is_boolean, is_integer, name_of, setting

if TYPE_CHECKING:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from trainloop.config import Config

DIMENSIONS = ("dp_replicate", "dp_shard", "tp")  # outermost first
DATA_PARALLEL = "dp"  # the flattened dp_replicate x dp_shard dimension

# Tensor-parallel styles, in Hugging Face's vocabulary (`base_model_tp_plan`); trainloop.tensor_parallel
# maps each to torch's ParallelStyle.
TP_STYLES = ("colwise", "rowwise", "sequence_parallel", "colwise_rep", "colwise_gather_output",
             "rowwise_rep", "embedding_rowwise", "replicate",
             # trainloop's own, for sequence parallelism between blocks (torchtitan's plan):
             "rowwise_sequence", "embedding_rowwise_sequence", "gather_sequence")
# The styles whose outputs are sharded on the sequence between the blocks (a DTensor stream).
SEQUENCE_STREAM_STYLES = ("rowwise_sequence", "embedding_rowwise_sequence")
# The head styles that loss_parallel=True turns into a colwise head whose logits stay sharded.
GATHERED_HEAD_STYLES = ("colwise_rep", "colwise_gather_output")


def _minus_one_or_at_least_one(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value != -1 and value < 1:
        name = name_of(instance, attribute)
        raise SettingError(name, f"{name} must be -1 (what is left) or an integer >= 1 (got {value!r})")


def _json_object(value: Any) -> Any:
    """A setting given as text (a `TRAINLOOP_*` variable, a spawn flag) is JSON: parse it."""
    if not isinstance(value, str):
        return value
    import json

    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as error:
        raise SettingError("tp_plan", f"tp_plan must be a JSON object such as "
                           f'\'{{"blocks.*.up": "colwise"}}\' (got {value!r}: {error})') from None


def _parse_json(name: str, value: str) -> Any:
    return _json_object(value)


def _optional_tp_plan(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SettingError("tp_plan", f"tp_plan must be a dict of module-name pattern -> style (got {value!r})")
    unknown = {pattern: style for pattern, style in value.items() if style not in TP_STYLES}
    if unknown:
        raise SettingError("tp_plan", f"tp_plan has unknown style(s) {unknown}; the styles are {', '.join(TP_STYLES)}")


def _needs_tensor_parallelism(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    # attrs runs validators once every field is set, so `tp` is known here.
    if value and instance.tp == 1:
        raise SettingError("loss_parallel", "loss_parallel=True shards the output head's logits over the "
                           "tensor-parallel ranks, but tp=1: set tp > 1 (with strategy='fsdp'), or leave "
                           "loss_parallel off")


@attrs.frozen
class MeshOptions(Settings):
    """The mesh settings (`strategy="fsdp"` only; the other strategies refuse sizes other than 1)."""

    dp_replicate: int = setting(
        1, parse=integer, check=[is_integer, at_least(1)],
        help="mesh: data-parallel replicas (strategy fsdp: > 1 is HSDP, the model sharded within "
             "each replica and replicated across them)")
    dp_shard: int = setting(
        -1, parse=integer, check=[is_integer, _minus_one_or_at_least_one],
        help="mesh: ranks each replica's model is sharded over (-1: the world size divided by "
             "dp_replicate and tp); dp_replicate x dp_shard x tp = world size")
    tp: int = setting(
        1, parse=integer, check=[is_integer, at_least(1)],
        help="mesh: tensor-parallel ranks (the innermost mesh dimension: neighbouring ranks, one "
             "machine); they see the same batches")
    tp_plan: dict[str, str] | None = setting(
        None, parse=_parse_json, convert=_json_object, check=[_optional_tp_plan],
        help="tp > 1: module-name patterns -> 'colwise' | 'rowwise' | 'sequence_parallel' (JSON, "
             "e.g. '{\"blocks.*.up\": \"colwise\"}') (default: none: a Hugging Face model's own "
             "base_model_tp_plan)")
    loss_parallel: bool = setting(
        False, parse=boolean, check=[is_boolean, _needs_tensor_parallelism],
        help="tp > 1: keep the output head's logits sharded over the vocabulary (the plan's "
             "'colwise_rep' head) and compute the cross-entropy in parallel: compute the loss "
             "inside `with tl.loss_parallel(state):` (tl.backward enters it itself)")


@attrs.frozen
class MeshShape:
    """The size of each mesh dimension, resolved and checked against the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different batches."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def sizes(self) -> tuple[int, int, int]:
        """The sizes in `DIMENSIONS` order, as `init_device_mesh` takes them."""
        return (self.dp_replicate, self.dp_shard, self.tp)


def refuse_combinations(config: Config) -> None:
    """Raise SettingError, at init, for a mesh combination with other settings that torch cannot run.

    Sequence parallelism between blocks (`SEQUENCE_STREAM_STYLES` in `tp_plan`: the blocks' inputs
    are DTensors) with activation_checkpointing='blocks' and compile='blocks': AOTAutograd's
    forward of a compiled checkpoint wrapper fails on a DTensor input (torch 2.13: "expected all
    tensors_saved_with_vc_check to be Tensors", a DeviceMesh among them). Each alone works, and so
    does op-level selective checkpointing under compile.
    """
    mesh = config.mesh
    stream = [style for style in (mesh.tp_plan or {}).values() if style in SEQUENCE_STREAM_STYLES]
    if (mesh.tp > 1 and stream and config.compile == "blocks"
            and config.activation_checkpointing == "blocks"):
        raise SettingError(
            "activation_checkpointing",
            f"tp_plan's sequence parallelism between blocks ({stream[0]!r}) with "
            "activation_checkpointing='blocks' and compile='blocks' is not supported: torch's compiled "
            "checkpoint wrapper fails on the blocks' sequence-sharded DTensor inputs. Use "
            "activation_checkpointing='selective' (op-level, works under compile), or leave compile or "
            "activation checkpointing off, or keep the activations between blocks whole ('rowwise' and "
            "'embedding_rowwise' instead of the *_sequence styles, 'sequence_parallel' norms still allowed)"
        )


def mesh_shape(options: MeshOptions, world_size: int) -> MeshShape:
    """The mesh for `options.dp_replicate`, `.dp_shard` and `.tp` on `world_size` ranks.

    `dp_shard=-1` becomes `world_size // (dp_replicate * tp)`. Raises ValueError naming all
    three sizes and the world size when their product is not the world size (or, for -1, when
    `dp_replicate * tp` does not divide it).
    """
    dp_replicate, dp_shard, tp = options.dp_replicate, options.dp_shard, options.tp
    others = dp_replicate * tp
    if dp_shard == -1:
        if world_size % others:
            raise ValueError(
                f"dp_replicate={dp_replicate} x tp={tp} = {others} does not divide the world size "
                f"{world_size}, so dp_shard=-1 (what is left) has no integer size: choose "
                f"dp_replicate and tp whose product divides {world_size}"
            )
        dp_shard = world_size // others
    if dp_replicate * dp_shard * tp != world_size:
        raise ValueError(
            f"dp_replicate={dp_replicate} x dp_shard={dp_shard} x tp={tp} = "
            f"{dp_replicate * dp_shard * tp}, but the world size is {world_size}: the three must "
            f"multiply to the world size (dp_shard=-1 takes what dp_replicate and tp leave)"
        )
    return MeshShape(dp_replicate, dp_shard, tp)


@attrs.frozen(eq=False)
class Mesh:
    """A run's device meshes: the 3-D root and its flattened data-parallel dimension.

    `device_mesh` has dimensions "dp_replicate", "dp_shard", "tp" (size-1 ones kept, so every
    name always exists); `data_parallel` is the 1-D "dp" mesh (dp_replicate x dp_shard) that
    holds this rank. Kept here because torch deprecates slicing a flattened dimension from the
    root mesh (`mesh["dp"]`): the flattened mesh must be book-kept by its maker.
    """

    shape: MeshShape
    device_mesh: DeviceMesh
    data_parallel: DeviceMesh

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh to give `fully_shard`: 1-D "dp_shard", or 2-D ("dp_replicate", "dp_shard") for HSDP.

        With the 2-D mesh FSDP2 shards over the inner dimension and replicates over the outer
        one (reduce-scatter within a replica, then all-reduce of the shards across replicas).
        """
        if self.shape.dp_replicate == 1:
            return self.device_mesh["dp_shard"]
        return self.device_mesh["dp_replicate", "dp_shard"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        """The 1-D "tp" mesh of this rank's tensor-parallel group (size 1 when tp=1)."""
        return self.device_mesh["tp"]

    @property
    def data_parallel_rank(self) -> int:
        """This rank's place among the ranks that see different batches (the same for a TP group)."""
        return self.data_parallel.get_local_rank()

    @property
    def data_parallel_size(self) -> int:
        """How many different batches one step sees: dp_replicate x dp_shard."""
        return self.shape.data_parallel_size

    @property
    def data_parallel_group(self) -> dist.ProcessGroup:
        """The process group to reduce metrics and item counts over: this rank's "dp" ranks.

        Tensor-parallel ranks of one group hold the same loss; a sum over the whole world would
        count it `tp` times.
        """
        return self.data_parallel.get_group()


def build_mesh(shape: MeshShape, device_type: str) -> Mesh:
    """The meshes of `shape` over the default process group, on `device_type` ("cpu", "cuda").

    A collective: every rank of the default process group (which must be joined, also for one
    process) calls it with the same shape. Raises ValueError when the shape does not cover the
    process group.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if shape.world_size != dist.get_world_size():
        raise ValueError(
            f"the mesh dp_replicate={shape.dp_replicate} x dp_shard={shape.dp_shard} x tp={shape.tp} "
            f"has {shape.world_size} ranks, but the process group has {dist.get_world_size()}"
        )
    device_mesh = init_device_mesh(device_type, shape.sizes, mesh_dim_names=DIMENSIONS)
    # `_flatten` (private, in torch since 2.4; torchtitan uses it too) makes one group of the
    # data-parallel ranks out of the mesh's own layout, without a hand-made `new_group`.
    data_parallel = device_mesh["dp_replicate", "dp_shard"]._flatten(DATA_PARALLEL)
    return Mesh(shape, device_mesh, data_parallel)

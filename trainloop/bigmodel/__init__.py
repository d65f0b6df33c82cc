"""Big-model inference: run a model larger than the accelerator's memory, or than RAM.

    from trainloop.bigmodel import empty_weights, device_map, dispatch

    with empty_weights():                            # parameters on the meta device: no memory
        model = Transformer(config)
    placement = device_map(model, max_memory={"cuda:0": "20GiB", "cpu": "64GiB", "disk": "1TB"},
                           no_split=["DecoderLayer"])
    model = dispatch(model, "checkpoint_dir/", placement)
    logits = model(tokens)                           # offloaded blocks stream in during forward

or all three in one call, `load_and_dispatch(lambda: Transformer(config), "checkpoint_dir/")`;
and `pipeline(state, model, example_args)` for pipeline-parallel inference, one stage per rank.

A device map is a plain `{module name: device}` dict. Each tensor goes where the longest module
name that prefixes its own name says ("" is the whole model): `{"": "cpu", "layers.3": "disk"}`
keeps everything in RAM except `layers.3`. The devices:

- an accelerator ("cuda:0"): the weights live there and the module runs there.
- "cpu": the weights live in RAM. The module runs on the map's first accelerator when it has
  one (its weights are copied there for each forward), else on the CPU.
- "disk": the weights stay in their memory-mapped safetensors file (the checkpoint itself, or a
  copy in `offload_dir` for a checkpoint in another format). Between forwards they are on the
  meta device; each forward of the module reads them in and drops them after.

Outputs equal the fully loaded model's: offloading moves weights, it never changes the maths.
"""

from trainloop.bigmodel.checkpoint_reader import Checkpoint as Checkpoint  # the type `dispatch` takes
from trainloop.bigmodel.dispatch import dispatch
from trainloop.bigmodel.load_and_dispatch import load_and_dispatch
from trainloop.bigmodel.pipeline import PipelineRunner, pipeline
from trainloop.bigmodel.placement import device_map
from trainloop.models.meta import empty_weights

__all__ = ["PipelineRunner", "device_map", "dispatch", "empty_weights", "load_and_dispatch", "pipeline"]

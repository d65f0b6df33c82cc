"""What trainloop does to models themselves, under every strategy and in big-model inference.

`meta` builds models without memory and materialises them; `hf` holds Hugging Face's
conventions (block classes, the one resolver of safetensors checkpoints and their indexes);
`safetensors_file` reads the format itself (checked headers, plain reads through one held
descriptor); `weights` loads safetensors checkpoints into a (possibly sharded) model, each rank
reading only its own slices; `quiet` drops what importing torchao (precision='fp8') logs that
says nothing to the user.
"""

"""What trainloop does to models themselves, under every strategy and in big-model inference.

`meta` builds models without memory and materialises them; `hf` holds Hugging Face's
conventions (block classes, checkpoint indexes); `weights` loads safetensors checkpoints into a
(possibly sharded) model, each rank reading only its own slices.
"""

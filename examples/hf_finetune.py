"""Train a tiny Hugging Face Llama (built from a `LlamaConfig`: nothing is downloaded) on bytes.

    python examples/hf_finetune.py --smoke
    python -m trainloop.spawn -n 2 examples/hf_finetune.py --smoke

The data of examples/stdlib_gpt.py (the standard library's .py files, one token per byte: a
vocabulary of 256) through the same loop: bf16 autocast, accumulation with a token-weighted loss
(`num_items`), checkpoints that resume, TensorBoard, a progress bar, and the held-out bits per byte
on the last line, every byte counted once however many processes share the work. The model is
`transformers.LlamaForCausalLM` as it is: `prepare` returns it with its `config`, its
`generate` and its output type.

benchmarks/hf_finetune_accelerate.py is this job written for Hugging Face Accelerate: compare the
lines between the "training" markers of the two files (`python benchmarks/hf_finetune_accelerate.py
--count-lines` prints both counts).
"""

import argparse
import math
import os

import torch
import torch.nn.functional as F
from stdlib_gpt import IGNORE, ByteWindows, stdlib_files  # beside this file
from torch.utils.data import DataLoader, Subset
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

import trainloop as tl
from trainloop.callbacks import Checkpoint, Progress, TensorBoard


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and run (CI, a first try)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (full: 2000, smoke: 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch per process")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--run-dir", default="runs/hf_finetune", help="checkpoints and TensorBoard")
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.smoke else 2000)
    # (context, width, layers, training bytes, held-out windows)
    args.context, args.dim, args.layers, args.max_train_bytes, args.eval_windows = (
        (64, 64, 2, 200_000, 64) if args.smoke else (256, 256, 4, None, 2048))
    return args


def main() -> None:
    args = parse_args()
    train_files, held_out_files = stdlib_files()
    train_set = ByteWindows(train_files, args.context, args.max_train_bytes)
    held_out_set = ByteWindows(held_out_files, args.context, args.eval_windows * args.context)
    held_out_set = Subset(held_out_set, range(min(args.eval_windows, len(held_out_set))))

    # [training: begin] (the user's lines: `benchmarks/hf_finetune_accelerate.py --count-lines`)
    state = tl.init(precision="bf16", accumulate=args.accumulate, log_every=5, seed=0, callbacks=[
        Progress(total=args.steps), TensorBoard(os.path.join(args.run_dir, "tensorboard")),
        Checkpoint(os.path.join(args.run_dir, "checkpoints"), every=10, keep=2)])
    model = LlamaForCausalLM(LlamaConfig(  # built after init, which seeded the RNGs
        vocab_size=256, hidden_size=args.dim, intermediate_size=4 * args.dim, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.context))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 20), args.steps)
    state, model, optimizer, train_loader, held_out_loader, scheduler = tl.prepare(
        state, model, optimizer, DataLoader(train_set, batch_size=args.batch_size, shuffle=True),
        DataLoader(held_out_set, batch_size=2 * args.batch_size), scheduler)
    while state.step < args.steps:
        for batch in train_loader:
            with tl.accumulate(state, model):
                logits = model(input_ids=batch["x"]).logits
                loss = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="sum")
                state = tl.backward(state, loss, num_items=(batch["y"] != IGNORE).sum())
            state = tl.step(state, optimizer)
            state = tl.log(state, loss=loss.detach() / (batch["y"] != IGNORE).sum())
            if state.step >= args.steps:
                break
    model.eval()
    sums = torch.zeros(2, len(held_out_set), dtype=torch.float64, device=state.device)  # per window
    with torch.no_grad():
        for batch in held_out_loader:  # a window the loader repeated lands on its own slot again
            per_byte = F.cross_entropy(model(input_ids=batch["x"]).logits.transpose(1, 2), batch["y"], reduction="none")
            sums[:, batch["index"]] = torch.stack([per_byte.sum(1), (batch["y"] != IGNORE).sum(1)]).double()
    sums = tl.reduce(state, sums, op="max")  # each window's numbers, from whichever rank scored it
    tl.finish(state)
    if state.is_main:
        print(f"held-out bits per byte: {(sums[0].sum() / sums[1].sum()).item() / math.log(2):.3f}")
    # [training: end]


if __name__ == "__main__":
    main()

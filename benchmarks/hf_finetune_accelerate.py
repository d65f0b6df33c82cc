"""examples/hf_finetune.py written for Hugging Face Accelerate: the same job, for comparison.

    python benchmarks/hf_finetune_accelerate.py --smoke
    accelerate launch --num_processes 2 benchmarks/hf_finetune_accelerate.py --smoke
    python benchmarks/hf_finetune_accelerate.py --count-lines   # the user's lines, both versions

The same data, model, bf16, accumulation window, token-weighted loss, checkpoints every 10 steps
that resume mid-epoch, TensorBoard, progress bar and exact held-out bits per byte. What the user
writes by hand here, trainloop does inside `tl.backward`/`tl.step`/`Checkpoint`: the window's
batches read ahead to count their tokens across processes (Accelerate's documented recipe for
token-weighted accumulation), the scheduler built with `num_processes` times the steps (a prepared
scheduler steps once per process), the position in the run saved and the consumed batches skipped
on resume. Needs `pip install -e .[bench]` (accelerate).
"""

import argparse
import contextlib
import itertools
import math
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from stdlib_gpt import IGNORE, ByteWindows, stdlib_files  # noqa: E402  (the examples' data)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (full: 2000, smoke: 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch per process")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--run-dir", default="runs/hf_finetune_accelerate", help="checkpoints and TensorBoard")
    parser.add_argument("--count-lines", action="store_true", help="print the user's lines of both versions")
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.smoke else 2000)
    args.context, args.dim, args.layers, args.max_train_bytes, args.eval_windows = (
        (64, 64, 2, 200_000, 64) if args.smoke else (256, 256, 4, None, 2048))
    return args


def main() -> None:
    args = parse_args()
    train_files, held_out_files = stdlib_files()
    train_set = ByteWindows(train_files, args.context, args.max_train_bytes)
    held_out_set = ByteWindows(held_out_files, args.context, args.eval_windows * args.context)
    held_out_set = Subset(held_out_set, range(min(args.eval_windows, len(held_out_set))))

    # [training: begin]
    accelerator = Accelerator(
        mixed_precision="bf16", log_with="tensorboard", project_dir=args.run_dir,
        project_config=ProjectConfiguration(args.run_dir, automatic_checkpoint_naming=True, total_limit=2),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    accelerator.init_trackers("tensorboard")
    set_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=args.dim, intermediate_size=4 * args.dim, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.context))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    # A prepared scheduler steps once per process for each optimizer step: num_processes x the steps.
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, args.steps // 20) * accelerator.num_processes,
                                                args.steps * accelerator.num_processes)
    model, optimizer, train_loader, held_out_loader, scheduler = accelerator.prepare(
        model, optimizer, DataLoader(train_set, batch_size=args.batch_size, shuffle=True),
        DataLoader(held_out_set, batch_size=2 * args.batch_size), scheduler)

    class Position:  # where the run is, saved with each checkpoint
        step = epoch = batches = 0

        def state_dict(self):
            return {"step": self.step, "epoch": self.epoch, "batches": self.batches}

        def load_state_dict(self, saved):
            self.step, self.epoch, self.batches = saved["step"], saved["epoch"], saved["batches"]

    position = Position()
    accelerator.register_for_checkpointing(position)
    if os.path.isdir(os.path.join(args.run_dir, "checkpoints")):
        accelerator.load_state()  # the newest checkpoint
    bar = tqdm(total=args.steps, initial=position.step, disable=not accelerator.is_main_process)
    while position.step < args.steps:
        train_loader.set_epoch(position.epoch)
        batches = iter(accelerator.skip_first_batches(train_loader, position.batches))
        # Token-weighted accumulation: read the window's batches first, to count its tokens on every process.
        while position.step < args.steps and (window := list(itertools.islice(batches, args.accumulate))):
            num_items = accelerator.gather(sum((b["y"] != IGNORE).sum() for b in window)).sum()
            for i, batch in enumerate(window):
                with accelerator.no_sync(model) if i < len(window) - 1 else contextlib.nullcontext():
                    logits = model(input_ids=batch["x"]).logits
                    loss = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), reduction="sum")
                    accelerator.backward(loss * accelerator.num_processes / num_items)  # DDP averages
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            position.step, position.batches = position.step + 1, position.batches + len(window)
            bar.update()
            if position.step % 5 == 0:
                mean = accelerator.reduce(loss.detach() / (batch["y"] != IGNORE).sum(), "mean")
                accelerator.log({"loss": mean.item()}, step=position.step)
            if position.step % 10 == 0:
                accelerator.save_state()
        if position.step < args.steps:  # the epoch is done
            position.epoch, position.batches = position.epoch + 1, 0
    if position.step % 10:
        accelerator.save_state()
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in held_out_loader:
            per_byte = F.cross_entropy(model(input_ids=batch["x"]).logits.transpose(1, 2), batch["y"], reduction="none")
            pairs = torch.stack([per_byte.sum(1), (batch["y"] != IGNORE).sum(1)], dim=1).double()
            totals += accelerator.gather_for_metrics(pairs).sum(0)  # drops the padding of the last batch
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"held-out bits per byte: {(totals[0] / totals[1]).item() / math.log(2):.3f}")
    # [training: end]


def training_lines(path: str) -> int:
    """Lines of code between the "[training: begin]" and "[training: end]" markers (no blanks, no comments)."""
    with open(path, encoding="utf-8") as source:
        lines = source.read().split("[training: begin]", 1)[1].split("[training: end]", 1)[0].splitlines()[1:]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


if __name__ == "__main__":
    if "--count-lines" in sys.argv:
        for path in (os.path.join(HERE, "..", "examples", "hf_finetune.py"), __file__):
            print(f"{training_lines(path)} lines: {os.path.relpath(path)}")
    else:
        main()

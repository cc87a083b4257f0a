"""Run under torchrun (or alone): one training step's gradients of an objective on a fixed global batch of 8
split over the ranks and over MICRO micro-batches per rank, DDP-wrapped and stepped by ``trainer.step`` as in
training; rank 0 saves the parameter gradients and the step's losses.

Usage: ddp_grads.py OUT MICRO PRESET [KEY=VALUE ...]. Random masks come from one stream that each rank advances
past the rows of the ranks before it, and each micro-batch's forward draws its rows in turn, so every sample
gets the same mask whatever the world size and the accumulation.
"""

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.config import load_config
from trainer.data.tokenizer import tokenize
from trainer.models import ClipObjective, build_model
from trainer.step import gradient_sync, train_step

out, micro, preset, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")
config = load_config(preset, overrides)
torch.manual_seed(0)
model = build_model(config.model)
module = DistributedDataParallel(model) if world > 1 else model

global_batch, size = 8, config.model.image_size
data = torch.Generator().manual_seed(1)
images = torch.randn(global_batch, 3, size, size, generator=data)
tokens = tokenize([f"a {c} shape number {i}" for i, c in enumerate("abcdefgh")], config.model.context_length)
per_rank = global_batch // world
first = rank * per_rank
rows = [slice(first + m * per_rank // micro, first + (m + 1) * per_rank // micro) for m in range(micro)]

torch.manual_seed(2)
patches = (size // config.model.patch_size) ** 2
torch.rand(first, patches)  # advance the mask stream past the earlier ranks' samples
micro_batches = [{"image": images[r], "tokens": tokens[r]} for r in rows]
losses = train_step(module, micro_batches, gradient_sync(module), contextlib.nullcontext(), torch.device("cpu"),
                    isinstance(model, ClipObjective))
if rank == 0:
    torch.save({"grads": {name: p.grad for name, p in model.named_parameters()},
                "losses": {name: value.item() for name, value in losses.items()}}, out)
if world > 1:
    dist.destroy_process_group()

"""Run under torchrun (or alone): one forward/backward of an objective on a fixed global batch split over the
ranks, DDP-wrapped as in training; rank 0 saves the parameter gradients.

Usage: ddp_grads.py OUT PRESET [KEY=VALUE ...]. The global batch is 8 samples; random masks come from one
stream that each rank advances past the rows of the ranks before it, so every sample gets the same mask
whatever the world size.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.config import load_config
from trainer.data.tokenizer import tokenize
from trainer.models import build_model

out, preset, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
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
local = slice(rank * global_batch // world, (rank + 1) * global_batch // world)

torch.manual_seed(2)
patches = (size // config.model.patch_size) ** 2
torch.rand(local.start, patches)  # advance the mask stream past the earlier ranks' samples
losses = module({"image": images[local], "tokens": tokens[local]})
losses["loss"].backward()
if rank == 0:
    torch.save({name: p.grad for name, p in model.named_parameters()}, out)
if world > 1:
    dist.destroy_process_group()

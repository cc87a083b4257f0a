"""The optimizer and its learning-rate schedule, built in one place for the training loop and ``bench/step.py``.

A recipe's rate holds only at the batch it was published at. ``optim.lr`` and ``optim.min_lr`` are the recipe's
values at ``optim.reference_batch`` samples per step (0: used as given at any batch); a run at another global
batch B scales both by B / reference (``lr_scaling: linear``: Goyal et al. 2017, the rule MAE states as
lr = blr × batch / 256 and FLIP follows) or by its square root (``sqrt``: Krizhevsky 2014, "One weird trick",
the rule often used for Adam at large batch). The training loop logs the rate it uses as ``train/lr`` and the
published one as the ``optim.lr`` parameter.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.models import parameter_groups


def lr_scale(optim: OptimConfig, global_batch: int) -> float:
    """The factor from the published rates to this run's: (B / reference) or its square root; 1 without a
    reference batch."""
    if not optim.reference_batch:
        return 1.0
    ratio = global_batch / optim.reference_batch
    return ratio if optim.lr_scaling == "linear" else math.sqrt(ratio)


def at_batch(optim: OptimConfig, global_batch: int) -> OptimConfig:
    """``optim`` with ``lr`` and ``min_lr`` scaled to ``global_batch`` (and no reference batch left to apply)."""
    scale = lr_scale(optim, global_batch)
    return dataclasses.replace(optim, lr=optim.lr * scale, min_lr=optim.min_lr * scale, reference_batch=0)


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup to ``optim.lr``, then cosine decay to ``optim.min_lr`` at ``total_steps``."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, optim: OptimConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups`` (by ``optim.decay_rule``) with the config's betas and eps.

    ``fused``: one kernel for the whole update (about 6x faster than foreach on CPU, bench/README.md); FSDP2's
    sharded parameters need the foreach path.
    """
    return torch.optim.AdamW(parameter_groups(model, optim.weight_decay, optim.decay_rule), lr=optim.lr,
                             betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=fused)

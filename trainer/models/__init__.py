"""Models: towers (``vit``, ``text``, ``joint``), ``pooling``, ``masking``, ``decoders``, ``losses`` and the
training objectives (``objectives``, ``maeclip``).

``build_model`` turns a ``ModelConfig`` into the objective module that the training loop runs.
``parameter_groups`` splits its parameters for AdamW.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from trainer.config import ModelConfig
from trainer.models.maeclip import MaeClipObjective
from trainer.models.objectives import ClipObjective, M3aeObjective, MaeObjective

# Parameters that are never weight-decayed even when they have 2+ dims: position/class/token embeddings
# (FLIP excludes cls and posemb), the MAP probe and the logit scale (docs/models.md §9).
# Mask and type embeddings (M3AE's no_decay_list) are 1-D, so ``ndim < 2`` already excludes them.
NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "token_embedding.weight", "probe", "logit_scale")

# clip and flip share ``ClipObjective``: FLIP is CLIP with ``image_mask_ratio`` > 0.
OBJECTIVES: dict[str, type[nn.Module]] = {
    "clip": ClipObjective,
    "flip": ClipObjective,
    "mae": MaeObjective,
    "m3ae": M3aeObjective,
    "maeclip": MaeClipObjective,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The objective module for ``cfg.objective``."""
    return OBJECTIVES[cfg.objective](cfg)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups, with weight decay only on matrices: weights of Linear and conv layers.

    Biases, norms and the scalar logit scale are excluded by ``ndim < 2``, as in open_clip. The embeddings and
    the MAP probe are excluded by name (``NO_DECAY_SUFFIXES``). Decaying these would pull positions and
    tokens toward zero, with no regularising benefit.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(NO_DECAY_SUFFIXES) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = [
    "OBJECTIVES", "ClipObjective", "M3aeObjective", "MaeClipObjective", "MaeObjective", "build_model",
    "parameter_groups",
]

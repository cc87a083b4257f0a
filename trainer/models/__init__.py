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

# Parameters that "no-embeddings" also keeps from weight decay though they have 2+ dims: position, class and
# token embeddings (FLIP excludes cls and posemb, M3AE its embeddings), the MAP probe (docs/models.md §9).
# Mask and type embeddings (M3AE's no_decay_list) are 1-D, so ``ndim < 2`` already excludes them.
EMBEDDING_SUFFIXES = ("cls_token", "pos_embed", "token_embedding.weight", "probe")
DECAY_RULES = ("ndim", "no-embeddings")

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


def parameter_groups(model: nn.Module, weight_decay: float, rule: str = "ndim") -> list[dict[str, Any]]:
    """AdamW parameter groups: (decayed, not decayed) by ``rule`` (``DECAY_RULES``; docs/models.md §9).

    ``ndim``: decay every tensor of 2+ dims (SLIP's and open_clip's ``p.ndim < 2`` exclusion, MAE's timm
    ``add_weight_decay``); biases, norms and the scalar logit scale are not decayed. ``no-embeddings``: also
    keep the embeddings and the MAP probe (``EMBEDDING_SUFFIXES``) from decay.
    """
    if rule not in DECAY_RULES:
        raise ValueError(f"decay rule '{rule}' is not one of {', '.join(DECAY_RULES)}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kept = param.ndim < 2 or (rule == "no-embeddings" and name.endswith(EMBEDDING_SUFFIXES))
        (no_decay if kept else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = [
    "OBJECTIVES", "ClipObjective", "M3aeObjective", "MaeClipObjective", "MaeObjective", "build_model",
    "parameter_groups",
]

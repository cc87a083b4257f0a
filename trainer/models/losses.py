"""CLIP's symmetric contrastive (InfoNCE) loss, with features gathered over every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features, concatenated in rank order. This rank's slot holds the local tensor itself.

    These are open_clip's default semantics (``gather_features`` with ``local_loss=False,
    gather_with_grad=False``). The all_gather carries no gradient. Putting the local tensor back makes every
    logit that involves a local feature differentiable, so the local features get their complete gradient of
    the full N×N loss. Every rank must hold the same local batch size.
    """
    world_size = dist.get_world_size()
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    with torch.no_grad():
        dist.all_gather(gathered, features.contiguous())
    gathered[dist.get_rank()] = features
    return torch.cat(gathered, dim=0)


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: ½·[CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)].

    The features are expected L2-normalised. ``logit_scale`` is the scale s itself, not its log, as in
    open_clip's ``ClipLoss``. The logits are computed in fp32 at least (bf16/fp16 features are upcast) and
    use hard labels without label smoothing (paper-notes §5.9–10). When torch.distributed runs with more
    than one rank, the features of all ranks are gathered and every rank computes the same full loss.
    """
    dtype = torch.promote_types(image_features.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    image_features, text_features = image_features.to(dtype), text_features.to(dtype)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        image_features, text_features = _gather(image_features), _gather(text_features)
    logits = logit_scale.to(dtype) * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

"""Losses: CLIP's symmetric contrastive (InfoNCE) loss with features gathered over every rank, MAE's pixel
reconstruction loss and M3AE's masked-token loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


def _gather(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features, concatenated in rank order, with gradients flowing back to the rank that owns them.

    Every rank computes the same full N×N loss. The autograd all_gather sums, in backward, what every rank's
    loss sends to each feature, so a rank's local features get W × the gradient of the full loss; DDP then
    averages parameter gradients over the W ranks, which leaves exactly the gradient a single process gets on
    the whole global batch. (open_clip's default, a no-grad gather with the local tensor put back, gives 1/W of
    it under DDP: the same direction, but a learning rate that depends on the world size.) Every rank must hold
    the same local batch size.
    """
    # torch's functional collective (torch.distributed.nn.functional.all_gather is deprecated in its favour): its
    # backward is the reduce-scatter (sum) described above.
    return funcol.all_gather_single(features.contiguous(), 0, dist.group.WORLD)


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: ½·[CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)].

    The features are expected L2-normalised. ``logit_scale`` is the scale s itself, not its log, as in
    open_clip's ``ClipLoss``. The logits are computed in fp32 at least (bf16/fp16 features are upcast) and
    use hard labels without label smoothing (docs/models.md §7). When torch.distributed runs with more
    than one rank, the features of all ranks are gathered and every rank computes the same full loss.
    """
    dtype = torch.promote_types(image_features.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
    image_features, text_features = image_features.to(dtype), text_features.to(dtype)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        image_features, text_features = _gather(image_features), _gather(text_features)
    # Autocast would run the matmul in bf16 whatever its inputs: the logits of a large batch differ by less
    # than bf16 resolves near the top of the softmax, so they are computed with autocast off.
    with torch.autocast(image_features.device.type, enabled=False):
        logits = logit_scale.to(dtype) * image_features @ text_features.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, L, p·p·C), patches in row-major grid order, each flattened as (row, column, channel)
    within the patch: MAE's ``patchify`` (``nchpwq -> nhwpqc``)."""
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def pixel_target(images: torch.Tensor, patch_size: int, norm_pix: bool) -> torch.Tensor:
    """The MAE reconstruction target (B, L, p·p·C) in fp32.

    With ``norm_pix`` each patch is normalised by its own mean and unbiased variance over its p·p·C values,
    with eps 1e-6 inside the square root: ``(x − mean) / sqrt(var + 1e-6)``, MAE's ``norm_pix_loss``
    (models_mae.py ``forward_loss``; docs/models.md §4).
    """
    target = patchify(images.float(), patch_size)
    if not norm_pix:
        return target
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, torch's default, as in MAE
    return (target - mean) / (var + 1e-6) ** 0.5


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """MSE on masked patches only: the per-patch mean squared error, summed over masked patches and divided by
    their count (MAE ``forward_loss``). Visible patches do not count (docs/models.md §4)."""
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = masked.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def masked_token_loss(logits: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked caption tokens, as M3AE's ``cross_entropy_loss_and_accuracy``: per sample,
    the mean over its masked non-pad tokens (zero when it has none), then the mean over the batch.

    ``logits`` (N, V) are the predictions at the N positions where ``where`` (B, T) is True, in row-major
    order (``hidden[where]``), so that the vocabulary projection runs on masked positions only.
    """
    losses = F.cross_entropy(logits.float(), tokens[where], reduction="none")
    rows = where.nonzero()[:, 0]
    per_sample = losses.new_zeros(tokens.shape[0]).index_add(0, rows, losses)
    return (per_sample / where.sum(dim=1).clamp(min=1)).mean()

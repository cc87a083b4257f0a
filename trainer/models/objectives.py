"""Training objectives: each is a module whose ``forward(batch)`` returns its named losses and their total.

The training loop only reads ``losses["loss"]`` (the total) and logs every entry as ``train/<name>``, so an
objective reports its parts as ``loss_<part>`` and any diagnostics under other names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.models.losses import clip_loss
from trainer.models.text import TextTransformer
from trainer.models.vit import VisionTransformer, random_keep_indices


class ClipObjective(nn.Module):
    """CLIP, and FLIP when ``cfg.image_mask_ratio`` > 0: two towers trained with the symmetric InfoNCE loss.

    FLIP (Li et al. 2022) drops a random ``image_mask_ratio`` of the patches before the image tower. The
    drop happens only in training mode. ``encode_image`` and evaluation always see every patch, because
    unmasked inference scores higher (FLIP Table 1d, paper-notes §5.12).

    ``logit_scale`` stores log(s). It starts at log(``logit_scale_init``) and is capped at
    log(``logit_scale_max``) inside the forward, as AXLearn and FLIP do (paper-notes §5.7), so its gradient
    is zero beyond the cap.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mask_ratio = cfg.image_mask_ratio
        self.max_log_scale = math.log(cfg.logit_scale_max)
        self.visual = VisionTransformer(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.vision_width,
            layers=cfg.vision_layers,
            heads=cfg.vision_heads,
            mlp_ratio=cfg.mlp_ratio,
            embed_dim=cfg.embed_dim,
            pool=cfg.image_pool,
        )
        self.text = TextTransformer(
            vocab_size=cfg.vocab_size,
            context_length=cfg.context_length,
            width=cfg.text_width,
            layers=cfg.text_layers,
            heads=cfg.text_heads,
            mlp_ratio=cfg.mlp_ratio,
            embed_dim=cfg.embed_dim,
            pool=cfg.text_pool,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, embed_dim) from every patch."""
        return F.normalize(self.visual(images).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings (B, embed_dim)."""
        return F.normalize(self.text(tokens).float(), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        keep_idx = None
        if self.training and self.mask_ratio > 0:
            keep_idx, _ = random_keep_indices(
                images.shape[0], self.visual.num_patches, self.mask_ratio, device=images.device
            )
        image_features = F.normalize(self.visual(images, keep_idx).float(), dim=-1)
        text_features = self.encode_text(batch["tokens"])
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        loss = clip_loss(image_features, text_features, scale)
        return {"loss": loss, "loss_contrastive": loss, "logit_scale": scale.detach()}

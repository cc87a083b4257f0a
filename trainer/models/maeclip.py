"""MAE-CLIP (Weers et al. 2023): CLIP's two towers plus a cross-modal decoder that reconstructs masked patches
and, optionally, masked caption tokens.

No official code exists, so each choice the paper does not pin down is a config switch (docs/models.md §6):
- ``contrastive_input``: ``masked`` computes the contrastive loss on the same masked encoder passes the
  decoder reads (one shared pass, as FLIP + MAE in FLIP Table 1f); ``unmasked`` adds a full pass of each
  masked tower for the contrastive loss, so the CLIP branch sees exactly what the CLIP baseline sees.
- ``image_masking``: ``random`` (MAE) or ``similarity`` (``masking.similarity_keep_indices``).
- ``text_mask_ratio``: 0 leaves the caption whole (context for the decoder only); > 0 masks words and adds
  the token loss; this needs the bidirectional text tower (``text_causal: false``).
- Total = contrastive + ``image_loss_weight`` · pixel + ``text_loss_weight`` · token.

The decoder attends to the visible image tokens (CLS included) and the caption tokens, each projected from
its tower's width (``image_decoder_embed``, ``text_decoder_embed``). ``encode_image``/``encode_text`` are
CLIP's: unmasked, decoder unused (docs/models.md §11). Masking applies in training and evaluation alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.models.masking import (
    random_keep_indices,
    similarity_keep_indices,
    text_keep_indices,
    valid_tokens,
)
from trainer.models.objectives import ClipObjective, masked_decoder, pixel_loss, token_loss


class MaeClipObjective(ClipObjective):
    """CLIP towers and logit scale from ``ClipObjective``, plus the cross-modal decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.cfg = cfg
        self.image_decoder_embed = nn.Linear(cfg.vision_width, cfg.decoder_width)
        self.text_decoder_embed = nn.Linear(cfg.text_width, cfg.decoder_width)
        vocab = cfg.vocab_size if cfg.text_mask_ratio > 0 else 0
        self.decoder = masked_decoder(cfg, cfg.context_length, vocab)

    def image_keep_indices(
        self, images: torch.Tensor, full: torch.Tensor | None, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image mask. Similarity masking scores each patch token of a full pass (``full`` when the
        unmasked contrastive pass exists, else an extra pass), projected by ``visual.proj``, against the
        caption embedding, all without gradient."""
        cfg = self.cfg
        if cfg.image_masking == "random":
            return random_keep_indices(
                images.shape[0], self.visual.num_patches, cfg.image_mask_ratio, device=images.device
            )
        with torch.no_grad():
            tokens = self.visual.forward_tokens(images) if full is None else full
            patches = self.visual.proj(tokens[:, 1:])
            return similarity_keep_indices(
                patches, text_features, cfg.image_mask_ratio, cfg.mask_noise, cfg.similarity_mask == "most"
            )

    def forward(self, batch: dict[str, torch.Tensor], split: bool = False) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        images, tokens = batch["image"], batch["tokens"]
        unmasked = cfg.contrastive_input == "unmasked"
        text_mask = text_keep_indices(tokens, cfg.text_mask_ratio) if cfg.text_mask_ratio > 0 else None
        text_keep, text_restore, kept_valid = text_mask or (None, None, None)
        text_seq = self.text.forward_tokens(tokens, text_keep, kept_valid)
        if unmasked and text_mask is not None:
            text_features = self.encode_text(tokens)
        else:
            text_features = F.normalize(self.text.head(*text_seq).float(), dim=-1)

        full = self.visual.forward_tokens(images) if unmasked else None
        keep, restore = self.image_keep_indices(images, full, text_features)
        latent = self.visual.forward_tokens(images, keep)
        image_features = F.normalize(self.visual.head(latent if full is None else full).float(), dim=-1)

        pixels, hidden = self.decoder(
            self.image_decoder_embed(latent),
            restore,
            self.text_decoder_embed(text_seq[0]),
            valid_tokens(tokens),
            text_restore,
            kept_valid,
        )
        losses = {"loss_pixel": pixel_loss(cfg, pixels, images, keep)}
        rest = cfg.image_loss_weight * losses["loss_pixel"]
        if text_mask is not None:
            losses["loss_token"] = token_loss(self.decoder, hidden, tokens, text_mask)
            rest = rest + cfg.text_loss_weight * losses["loss_token"]
        return self.output(image_features, text_features, split, losses, rest)

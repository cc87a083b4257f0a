"""M3AE's joint encoder: one transformer over [CLS, image patches, caption tokens], with modality type
embeddings (Geng et al. 2022; young-geng/m3ae_public model.py ``forward_encoder``).

It reuses our ViT tower for the patch embedding, the blocks and the norms, so that M3AE differs from the
other objectives only in what the encoder sees and what it is trained on, not in the backbone. The caption
tokens get their own embedding table, positions (1-D sin-cos as in M3AE, or learned) and a type embedding;
patches get the image type embedding (M3AE's ``encoder_image_type_embedding``; CLS gets none, as in M3AE).
Caption padding is removed with a key-padding mask.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.masking import valid_tokens
from trainer.models.vit import VisionTransformer, sincos_1d


class JointEncoder(nn.Module):
    """Encodes an image and, optionally, its caption in one sequence through ``visual``'s blocks."""

    def __init__(
        self, visual: VisionTransformer, vocab_size: int, context_length: int, pos_embed: str
    ) -> None:
        super().__init__()
        width = visual.cls_token.shape[0]
        self.visual = visual
        self.token_embedding = nn.Embedding(vocab_size, width)
        if pos_embed == "sincos":
            self.register_buffer("text_pos_embed", sincos_1d(width, torch.arange(context_length)))
        else:
            self.text_pos_embed = nn.Parameter(0.01 * torch.randn(context_length, width))
        # M3AE: type embeddings ~ N(0, 0.02). Token embedding std 0.02 as in our text tower (M3AE uses 1.0).
        self.image_type = nn.Parameter(0.02 * torch.randn(width))
        self.text_type = nn.Parameter(0.02 * torch.randn(width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(
        self,
        images: torch.Tensor,
        keep_idx: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        text_keep: torch.Tensor | None = None,
        text_kept_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 1 + K + K_t, D): CLS, the kept patches, then the caption's kept positions (all T when
        ``text_keep`` is None; ``text_kept_valid`` marks the real ones). Without ``tokens``, image only."""
        image = self.visual.embed(images, keep_idx)
        image = torch.cat([image[:, :1], image[:, 1:] + self.image_type], dim=1)
        if tokens is None:
            return self.visual.encode(image)
        text = self.token_embedding(tokens) + self.text_pos_embed[: tokens.shape[1]] + self.text_type
        valid = valid_tokens(tokens)
        if text_keep is not None:
            text = torch.gather(text, 1, text_keep[..., None].expand(-1, -1, text.shape[-1]))
            valid = text_kept_valid
        image_valid = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        sequence = torch.cat([image, text.to(image.dtype)], dim=1)
        return self.visual.encode(sequence, torch.cat([image_valid, valid], dim=1))

"""The masked-reconstruction decoder: MAE's image decoder, extended to captions as in M3AE, and used by
MAE-CLIP as the cross-modal decoder over both towers' outputs.

Decoder sequence (facebookresearch/mae models_mae.py ``forward_decoder``; young-geng/m3ae_public model.py
``forward_decoder``):

    [CLS, patch 1..L, (caption position 1..T)]

- Inputs arrive already projected to the decoder width: the objective owns that projection
  (``decoder_embed``), because MAE and M3AE project one encoder while MAE-CLIP projects two towers of
  different widths.
- Masked patches get a learned mask token and everything is unshuffled to grid order; then fixed 2-D sin-cos
  position embeddings (a zero row for CLS), as in MAE. Caption positions get 1-D sin-cos, as in M3AE.
- With a caption present, learned type embeddings mark the modality of patches and caption tokens (M3AE's
  ``decoder_image_type_embedding`` / ``decoder_text_type_embedding``; CLS gets none, as in M3AE).
- Padding never takes part: a key-padding mask drops caption positions after the EOT.
- The CLS output is discarded. The pixel head predicts p·p·3 values per patch; the token head (present when
  captions are reconstructed) is applied only at the positions the loss reads, since a 49,408-way projection
  at every position would dominate memory.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.masking import unshuffle
from trainer.models.vit import make_blocks, sincos_1d, sincos_2d


def _embedding(width: int) -> nn.Parameter:
    """A learned (width,) vector ~ N(0, 0.02): MAE's mask token and M3AE's mask and type embeddings."""
    return nn.Parameter(0.02 * torch.randn(width))


class MaskedDecoder(nn.Module):
    """Decoder of ``layers`` blocks × ``width`` with ``heads`` heads (MAE's default is 8 × 512, 16 heads).

    ``text_length`` > 0 adds the caption stream (cross-modal decoding); ``vocab_size`` > 0 also adds the
    caption mask token and the token head, for objectives that reconstruct masked tokens. Modules that a
    configuration does not use are not created, so every parameter gets a gradient on every step.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        grid: int,
        patch_dim: int,
        text_length: int = 0,
        vocab_size: int = 0,
    ) -> None:
        super().__init__()
        self.image_mask_token = _embedding(width)
        # Fixed tables are rebuilt from the config, so they stay out of the state dict.
        self.register_buffer("image_pos", sincos_2d(width, grid), persistent=False)
        if text_length:
            self.image_type, self.text_type = _embedding(width), _embedding(width)
            self.register_buffer("text_pos", sincos_1d(width, torch.arange(text_length)), persistent=False)
        if vocab_size:
            self.text_mask_token = _embedding(width)
            self.token_head = nn.Linear(width, vocab_size)
        self.blocks = make_blocks(width, layers, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.pixel_head = nn.Linear(width, patch_dim)

    def forward(
        self,
        image: torch.Tensor,
        image_restore: torch.Tensor,
        text: torch.Tensor | None = None,
        text_valid: torch.Tensor | None = None,
        text_restore: torch.Tensor | None = None,
        text_kept_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode.

        ``image`` (B, 1 + K, W): CLS and the kept patches in ``keep_idx`` order; ``image_restore`` (B, L).
        ``text`` (B, K_t, W): the caption, all T positions, or only the kept ones when ``text_restore``
        (B, T) and ``text_kept_valid`` (B, K_t) describe a caption mask; ``text_valid`` (B, T) marks non-pad
        positions. Returns the pixel predictions (B, L, p·p·3) and the caption states (B, T, W) after the
        final norm, or None without a caption.
        """
        patches = unshuffle(image[:, 1:], image_restore, self.image_mask_token) + self.image_pos[1:]
        cls = image[:, :1] + self.image_pos[:1]
        if text is None:
            x, valid = torch.cat([cls, patches], dim=1), None
        else:
            if text_restore is not None:
                text = unshuffle(text, text_restore, self.text_mask_token, text_kept_valid)
            text = text + self.text_pos[: text.shape[1]] + self.text_type
            x = torch.cat([cls, patches + self.image_type, text], dim=1)
            image_valid = torch.ones(x.shape[0], 1 + patches.shape[1], dtype=torch.bool, device=x.device)
            valid = torch.cat([image_valid, text_valid], dim=1)
        for block in self.blocks:
            x = block(x, valid=valid)
        x = self.norm(x)
        pixels = self.pixel_head(x[:, 1 : 1 + patches.shape[1]])
        return pixels, None if text is None else x[:, 1 + patches.shape[1] :]

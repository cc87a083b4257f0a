"""The text tower: CLIP's transformer over BPE token ids, causal or bidirectional, pooled at EOT or by a
mask-aware pooler.

The layout mirrors open_clip's text tower, so that its weights map one-to-one onto ours. Our names, with
open_clip's in brackets:
- ``token_embedding``.
- ``pos_embed`` (``positional_embedding``).
- ``blocks.i`` (``transformer.resblocks.i``): the same blocks as the image tower.
- ``ln_final``.
- ``proj``: a bias-free Linear whose weight is ``text_projection`` transposed.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.masking import valid_tokens
from trainer.models.pooling import make_pooler
from trainer.models.vit import make_blocks


class TextTransformer(nn.Module):
    """Text tower. ``forward`` returns the projected pooled feature, not yet L2-normalised.

    Valid tokens are those up to and including the EOT, which has the highest id in CLIP's vocabulary
    (open_clip ``text_global_pool``, ``pool_type='argmax'``); everything after it is padding and never counts.
    ``pool='eot'`` takes the EOT token; ``gap``, ``max`` and ``map`` pool over the valid tokens.

    ``causal=True`` is CLIP's causal mask: no valid position attends to the later padding, so the output is
    independent of pad values whatever the pad id is. ``causal=False`` is bidirectional attention (needed to
    reconstruct masked tokens, docs/models.md §12), with the padding removed by a key-padding mask instead. Only
    the bidirectional tower can encode a masked caption (``keep_idx``): a causal mask over shuffled positions
    would be meaningless.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        embed_dim: int,
        pool: str,
        causal: bool = True,
        map_heads: int = 0,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.causal = causal
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(context_length, width))
        self.blocks = make_blocks(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_final = nn.LayerNorm(width)
        self.pooler = None if pool == "eot" else make_pooler(pool, width, map_heads or heads)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        # open_clip TextTransformer.init_parameters: token embedding std 0.02, positions 0.01,
        # projection width^-0.5.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        keep_idx: torch.Tensor | None = None,
        kept_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the caption, or only its kept positions (``keep_idx``/``kept_valid`` from
        ``masking.text_keep_indices``). Returns the sequence after ``ln_final`` (B, K, D), the token ids at
        those positions (B, K) and which of them are valid (B, K)."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        x = self.token_embedding(tokens) + self.pos_embed[:length]
        valid = valid_tokens(tokens)
        if keep_idx is not None:
            if self.causal:
                raise ValueError("a causal text tower cannot encode a masked caption (model.text_causal)")
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
            tokens, valid = torch.gather(tokens, 1, keep_idx), kept_valid
        for block in self.blocks:
            x = block(x, causal=self.causal, valid=None if self.causal else valid)
        return self.ln_final(x), tokens, valid

    def head(self, x: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Pool an encoded sequence (at the EOT, the highest valid id, or with the pooler), then project."""
        if self.pooler is None:
            eot = tokens.masked_fill(~valid, -1).argmax(dim=-1)
            pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        else:
            pooled = self.pooler(x, valid)
        return self.proj(pooled)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(*self.forward_tokens(tokens))

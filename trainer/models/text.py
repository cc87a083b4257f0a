"""The text tower: CLIP's causal transformer over BPE token ids, pooled at EOT or by a mask-aware pooler.

The layout mirrors open_clip's text tower, so that its weights map one-to-one onto ours. Our names, with
open_clip's in brackets:
- ``token_embedding``.
- ``pos_embed`` (``positional_embedding``).
- ``blocks.i`` (``transformer.resblocks.i``): the same blocks as the image tower, run with a causal mask.
- ``ln_final``.
- ``proj``: a bias-free Linear whose weight is ``text_projection`` transposed.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.models.pooling import make_pooler
from trainer.models.vit import make_blocks


class TextTransformer(nn.Module):
    """Causal text tower. ``forward`` returns the projected pooled feature, not yet L2-normalised.

    ``pool='eot'`` takes the token at ``argmax(token ids)``: CLIP's end-of-text token has the highest id in
    the vocabulary (open_clip ``text_global_pool``, ``pool_type='argmax'``). ``gap``, ``max`` and ``map`` pool
    over the tokens up to and including that EOT. Everything after it is padding and never counts. Under
    the causal mask no valid position attends to the padding either, so the output is independent of pad
    values whatever the pad id is.
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
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.empty(context_length, width))
        self.blocks = make_blocks(width, layers, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.pooler = None if pool == "eot" else make_pooler(pool, width, heads)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        # open_clip TextTransformer.init_parameters: token embedding std 0.02, positions 0.01,
        # projection width^-0.5.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj.weight, std=width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        x = self.token_embedding(tokens) + self.pos_embed[:length]
        for block in self.blocks:
            x = block(x, causal=True)
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)
        if self.pooler is None:
            pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        else:
            valid = torch.arange(length, device=x.device)[None, :] <= eot[:, None]
            pooled = self.pooler(x, valid)
        return self.proj(pooled)

"""The image tower, a ViT that encodes only the visible patches (MAE-style), and the transformer block that
both towers share.

The layout follows open_clip's ``VisionTransformer``, so that its ViT-B-16 weights can later map one-to-one
onto ours. Our names, with open_clip's in brackets:
- ``patch_embed``: a conv without bias (``conv1``).
- ``cls_token`` (``class_embedding``) and learned ``pos_embed`` (``positional_embedding``), then ``ln_pre``.
- ``blocks.i``: pre-norm residual blocks (``transformer.resblocks.i``). Each has ``ln_1``, a fused
  ``attn.in_proj`` (``attn.in_proj_weight``/``_bias``), ``attn.out_proj``, ``ln_2``, and ``mlp.c_fc`` /
  ``mlp.c_proj`` with an exact GELU between them.
- ``ln_post``, then ``proj``: a bias-free Linear whose weight is open_clip's ``proj`` transposed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.pooling import make_pooler


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection. The rows are laid out as q, k, v, like
    ``nn.MultiheadAttention.in_proj_weight``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.in_proj(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


def make_blocks(width: int, layers: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    """The block stack, initialised as in open_clip's ``TextTransformer.init_parameters``.

    The stds are: attention in-projection width^-0.5, MLP c_fc (2·width)^-0.5, and both output projections
    width^-0.5·(2·layers)^-0.5, so the residual stream stays O(1) with depth. Biases start at zero. We use
    the same scheme in both towers. open_clip leaves its vision blocks at PyTorch's defaults.
    """
    blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.in_proj.weight, std=width**-0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        for linear in (block.attn.in_proj, block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
            nn.init.zeros_(linear.bias)
    return blocks


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """How many patches survive masking: floor(L·(1 − r)), at least 1.

    This is MAE's and FLIP's ``int(L * (1 - mask_ratio))``, with a 1e-6 tolerance so that float error
    cannot drop a patch (10·(1 − 0.9) evaluates to 0.99999…). Examples: 196 patches at r = 0.75 keep 49;
    at r = 0.5 they keep 98.
    """
    return max(1, math.floor(num_patches * (1.0 - mask_ratio) + 1e-6))


def random_keep_indices(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random masking, as in MAE's ``random_masking``: argsort uniform noise for each sample.

    Returns ``keep_idx`` (B, K) and ``restore_idx`` (B, L), with K = ``num_kept(L, mask_ratio)``. ``keep_idx``
    lists the kept patch indices in shuffled order. ``restore_idx`` is the inverse permutation, so gathering
    ``cat([kept, dropped])`` with it restores the grid order, which is how an MAE decoder puts mask tokens
    back. The noise is drawn per sample: m3ae_public's shared-per-batch mask is a known pitfall
    (paper-notes §5.4).
    """
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    return shuffle[:, : num_kept(num_patches, mask_ratio)], restore


class VisionTransformer(nn.Module):
    """ViT image tower. ``forward`` returns the projected pooled feature, not yet L2-normalised.

    ``pool`` selects the pooled token(s): ``cls`` takes the CLS token. ``gap``, ``max`` and ``map`` pool the
    patch tokens only, with CLS excluded (see ``trainer.models.pooling`` for why). Position embeddings are
    added before masking, and the CLS token is never masked (MAE, paper-notes §5.3).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        embed_dim: int,
        pool: str,
    ) -> None:
        super().__init__()
        self.num_patches = (image_size // patch_size) ** 2
        self.pool = pool
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        # open_clip VisionTransformer: class and position embeddings ~ N(0, width^-0.5).
        scale = width**-0.5
        self.cls_token = nn.Parameter(scale * torch.randn(width))
        self.pos_embed = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = make_blocks(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.pooler = None if pool == "cls" else make_pooler(pool, width, heads)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=scale)

    def forward_tokens(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The encoded sequence after ``ln_post``: (B, 1 + K, D), CLS first, then the kept patches in the
        order of ``keep_idx`` (all L patches in grid order when ``keep_idx`` is None)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L, D), row-major over the grid
        x = x + self.pos_embed[1:]
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[0]).to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1))
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.forward_tokens(images, keep_idx)
        pooled = tokens[:, 0] if self.pooler is None else self.pooler(tokens[:, 1:])
        return self.proj(pooled)

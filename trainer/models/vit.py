"""The image tower, a ViT that encodes only the visible patches (MAE-style), the transformer block that every
encoder and decoder shares, and the fixed sin-cos position embeddings.

The layout follows open_clip's ``VisionTransformer``, so that its ViT-B-16 weights can map one-to-one onto
ours. Our names, with open_clip's in brackets:
- ``patch_embed``: a conv without bias (``conv1``).
- ``cls_token`` (``class_embedding``) and ``pos_embed`` (``positional_embedding``), then ``ln_pre``.
- ``blocks.i``: pre-norm residual blocks (``transformer.resblocks.i``). Each has ``ln_1``, a fused
  ``attn.in_proj`` (``attn.in_proj_weight``/``_bias``), ``attn.out_proj``, ``ln_2``, and ``mlp.c_fc`` /
  ``mlp.c_proj`` with an exact GELU between them (QuickGELU with ``quick_gelu``, for OpenAI-trained weights).
- ``ln_post``, then ``proj``: a bias-free Linear whose weight is open_clip's ``proj`` transposed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.masking import num_kept, random_keep_indices
from trainer.models.pooling import make_pooler


def sincos_1d(width: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE's ``get_1d_sincos_pos_embed_from_grid``: [sin(p·ω_i), cos(p·ω_i)] with ω_i = 10000^(−i/(width/2)),
    i < width/2. Computed in float64 like MAE's numpy code, returned as float32 (len(positions), width)."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed(width, grid, cls_token=True)``: (1 + grid², width), a zero row for CLS.

    Patch l = (row i, column j), in row-major order, gets [sincos_1d(j), sincos_1d(i)], each width/2 wide: MAE
    builds ``np.meshgrid(grid_w, grid_h)``, so its first half encodes the column (docs/models.md §2). We keep
    that order so that encoder and decoder grids agree with MAE's.
    """
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    patches = torch.cat([sincos_1d(width // 2, cols.flatten()), sincos_1d(width // 2, rows.flatten())], dim=1)
    return torch.cat([torch.zeros(1, width), patches], dim=0)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection. The rows are laid out as q, k, v, like
    ``nn.MultiheadAttention.in_proj_weight``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, causal: bool = False, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``valid`` (B, L) bool is a key-padding mask: no query attends to a key marked False."""
        batch, length, width = x.shape
        qkv = self.in_proj(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if valid is None else valid[:, None, None, :]
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask, is_causal=causal)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation, x·sigmoid(1.702x): what its checkpoints (open_clip's ``-quickgelu`` models) were
    trained with, close to but not the exact GELU."""
    return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, quick: bool = False) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.activation = quick_gelu if quick else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), quick_gelu)

    def forward(
        self, x: torch.Tensor, causal: bool = False, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, valid=valid)
        return x + self.mlp(self.ln_2(x))


def make_blocks(width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool = False) -> nn.ModuleList:
    """The block stack, initialised as in open_clip's ``TextTransformer.init_parameters``.

    The stds are: attention in-projection width^-0.5, MLP c_fc (2·width)^-0.5, and both output projections
    width^-0.5·(2·layers)^-0.5, so the residual stream stays O(1) with depth. Biases start at zero. We use
    the same scheme in every stack, decoders included. open_clip leaves its vision blocks at PyTorch's
    defaults.
    """
    blocks = nn.ModuleList(Block(width, heads, mlp_ratio, quick_gelu) for _ in range(layers))
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    for block in blocks:
        nn.init.normal_(block.attn.in_proj.weight, std=width**-0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        for linear in (block.attn.in_proj, block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
            nn.init.zeros_(linear.bias)
    return blocks


class VisionTransformer(nn.Module):
    """ViT image tower. ``forward`` returns the pooled feature, projected to ``embed_dim`` (not yet
    L2-normalised); with ``embed_dim=None`` there is no projection (MAE and M3AE have no joint embedding).

    ``pool`` selects the pooled token(s): ``cls`` takes the CLS token. ``gap``, ``max`` and ``map`` pool the
    patch tokens only, with CLS excluded (see ``trainer.models.pooling`` for why). Position embeddings are
    added before masking, and the CLS token is never masked (MAE, docs/models.md §3). ``pos_embed='sincos'``
    makes them MAE's fixed 2-D sin-cos table, a buffer kept in the state dict under the learned table's name.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        embed_dim: int | None,
        pool: str,
        pos_embed: str = "learned",
        map_heads: int = 0,
        quick_gelu: bool = False,
    ) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.num_patches = grid**2
        self.pool = pool
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        # open_clip VisionTransformer: class and position embeddings ~ N(0, width^-0.5).
        scale = width**-0.5
        self.cls_token = nn.Parameter(scale * torch.randn(width))
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_2d(width, grid))
        else:
            self.pos_embed = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = make_blocks(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.pooler = None if pool == "cls" else make_pooler(pool, width, map_heads or heads)
        self.proj = None if embed_dim is None else nn.Linear(width, embed_dim, bias=False)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=scale)

    def embed(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The input sequence (B, 1 + K, D) before ``ln_pre``: CLS, then the kept patches in the order of
        ``keep_idx`` (all L patches in grid order when it is None), position embeddings already added."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, L, D), row-major over the grid
        x = x + self.pos_embed[1:]
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[0]).to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1)

    def encode(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``ln_pre``, the blocks and ``ln_post`` over a sequence; ``valid`` masks keys (M3AE's captions)."""
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x, valid=valid)
        return self.ln_post(x)

    def forward_tokens(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The encoded sequence after ``ln_post``: (B, 1 + K, D), CLS first, then the kept patches."""
        return self.encode(self.embed(images, keep_idx))

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled feature (B, D) of an encoded sequence, before the projection."""
        return tokens[:, 0] if self.pooler is None else self.pooler(tokens[:, 1:])

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled and projected (when the tower has a projection)."""
        pooled = self.pool_tokens(tokens)
        return pooled if self.proj is None else self.proj(pooled)

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.forward_tokens(images, keep_idx))


# Masking helpers live in trainer.models.masking; they stay importable from here for older callers.
__all__ = [
    "Attention", "Block", "Mlp", "VisionTransformer", "make_blocks", "num_kept", "random_keep_indices",
    "sincos_1d", "sincos_2d",
]

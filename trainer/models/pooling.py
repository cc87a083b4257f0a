"""Poolers that turn a token sequence into one vector: GAP, MAX and MAP, all mask-aware.

Every pooler takes ``(tokens (B, T, D), valid (B, T) bool or None)``; ``valid=False`` marks tokens that
must not count (text padding). ``None`` means every token counts. Masked-out tokens never change the output,
whatever their values. CLS (image) and EOT (text) pooling select one token by index, so the towers do them
directly.

Which tokens the towers pass in: the image tower gives these poolers the **patch tokens only, not CLS**. This
follows MAE's ``global_pool`` (mean of ``x[:, 1:]``, facebookresearch/mae models_vit.py) and open_clip's
``pool_type='avg'`` (``x[:, 1:].mean``). AXLearn's poolers include CLS instead (docs/models.md §10). We
exclude it so that GAP/MAX/MAP summarise patch content alone, and so the four image poolers differ only in how
they combine patches. The CLS token still takes part in attention, so it keeps receiving gradients. Poolers
act after the tower's final LayerNorm, as in AXLearn and big_vision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MeanPool(nn.Module):
    """GAP: the mean over valid tokens."""

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is None:
            return tokens.mean(dim=1)
        # torch.where rather than a multiply, so that a non-finite masked token cannot leak in as NaN.
        total = torch.where(valid[..., None], tokens, 0.0).sum(dim=1)
        return total / valid.sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)


class MaxPool(nn.Module):
    """MAX: the element-wise maximum over valid tokens (AXLearn ``MaxPooling`` fills padding with -inf)."""

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is not None:
            tokens = tokens.masked_fill(~valid[..., None], float("-inf"))
        return tokens.amax(dim=1)


class AttentionPool(nn.Module):
    """MAP: multi-head attention pooling with a learned query, after big_vision's ``MAPHead``.

    big_vision (models/vit.py ``MAPHead``): a probe of shape (1, 1, D), xavier-uniform initialised, is the
    query and the tokens are keys and values of a multi-head attention; then ``x = x + MLP(LN(x))`` with a
    4×D GELU MLP, and the output is ``x[:, 0]``. big_vision uses 12 heads at ViT-B, the tower's own head
    count, so the towers pass their ``heads``.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        # big_vision initialises the probe and every dense kernel xavier-uniform, biases at zero.
        nn.init.xavier_uniform_(self.probe)
        for layer in (self.q_proj, self.kv_proj, self.out_proj, self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = tokens.shape
        head_dim = width // self.heads
        query = (
            self.q_proj(self.probe).expand(batch, -1, -1).view(batch, 1, self.heads, head_dim).transpose(1, 2)
        )
        key, value = self.kv_proj(tokens).view(batch, length, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        mask = None if valid is None else valid[:, None, None, :]
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        x = self.out_proj(attended.transpose(1, 2).reshape(batch, 1, width))
        x = x + self.mlp(self.norm(x))
        return x[:, 0]


def make_pooler(kind: str, width: int, heads: int) -> nn.Module:
    """The pooler for ``kind`` in gap, max, map (cls and eot are token selections done by the towers)."""
    if kind == "gap":
        return MeanPool()
    if kind == "max":
        return MaxPool()
    if kind == "map":
        return AttentionPool(width, heads)
    raise ValueError(f"unknown pooler '{kind}' (poolers: gap, max, map)")

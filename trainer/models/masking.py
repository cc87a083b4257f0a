"""Which tokens an encoder sees: per-sample keep indices for image patches and caption tokens, and the inverse
shuffle that puts mask tokens back in place for a decoder.

One convention throughout, MAE's ``random_masking`` (facebookresearch/mae models_mae.py): every sample gets a
score per position; ``shuffle = scores.argsort()`` orders the positions, its first K entries are the
kept positions (``keep``, in shuffled order) and the rest are masked. ``restore = shuffle.argsort()`` is the
inverse permutation, so gathering ``cat([kept, masked])`` with it gives back the original order. Random
masking scores with uniform noise, similarity masking with the patch-caption similarity plus Gumbel noise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """How many patches survive masking: floor(L·(1 − r)), at least 1.

    This is MAE's and FLIP's ``int(L * (1 - mask_ratio))``, with a 1e-6 tolerance so that float error
    cannot drop a patch (10·(1 − 0.9) evaluates to 0.99999…). Examples: 196 patches at r = 0.75 keep 49;
    at r = 0.5 they keep 98.
    """
    return max(1, math.floor(num_patches * (1.0 - mask_ratio) + 1e-6))


def keep_lowest(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` lowest-scoring positions of each row of ``scores`` (B, L).

    Returns ``keep_idx`` (B, keep), the kept positions in ascending score order, and ``restore_idx`` (B, L),
    the inverse of the full ascending order.
    """
    shuffle = scores.argsort(dim=1)
    return shuffle[:, :keep], shuffle.argsort(dim=1)


def random_keep_indices(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random masking, as in MAE's ``random_masking``: argsort uniform noise for each sample.

    Returns ``keep_idx`` (B, K) and ``restore_idx`` (B, L), with K = ``num_kept(L, mask_ratio)``. The noise is
    drawn per sample: m3ae_public's mask shared by the whole batch is a known pitfall (docs/models.md §3).
    """
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    return keep_lowest(noise, num_kept(num_patches, mask_ratio))


def similarity_keep_indices(
    patch_features: torch.Tensor,
    text_features: torch.Tensor,
    mask_ratio: float,
    noise: float,
    mask_most: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity masking: mask the patches most (or least) similar to the caption, with noise.

    The paper names similarity masking without a public definition; this is the exact rule we implement.
    For sample b and patch l, with ``patch_features`` (B, L, E) and ``text_features`` (B, E):

        s[b, l] = cos(patch_features[b, l], text_features[b])
        m[b, l] = σ · s[b, l] + noise · g[b, l],    σ = +1 if mask_most else −1,   g ~ Gumbel(0, 1) i.i.d.

    The L − K positions with the highest m are masked and the K = ``num_kept(L, mask_ratio)`` lowest are kept,
    exactly as many as random masking keeps. With ``noise`` τ > 0 this draws the masked set without
    replacement with probability ∝ exp(σ·s/τ) (the Gumbel-top-k trick, Kool et al. 2019), so τ → ∞ tends to
    random masking and τ = 0 is deterministic. The objective supplies the features under the current model,
    computed without gradient.
    """
    similarity = F.cosine_similarity(patch_features.float(), text_features.float()[:, None], dim=-1)
    scores = similarity if mask_most else -similarity
    if noise > 0:
        exponential = torch.empty_like(scores).exponential_(generator=generator)
        scores = scores + noise * -exponential.clamp(min=1e-30).log()  # −log Exp(1) ~ Gumbel(0, 1)
    # Keeping the lowest m is masking the highest.
    return keep_lowest(scores, num_kept(scores.shape[1], mask_ratio))


def valid_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True up to and including the end-of-text token: CLIP's EOT has the highest id in the
    vocabulary (open_clip ``text_global_pool``), and everything after it is padding."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return positions[None, :] <= tokens.argmax(dim=-1, keepdim=True)


def text_keep_indices(
    tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking of caption words.

    Rule: the start token (position 0) and the EOT are always kept, as the CLS token is for images, since the
    text tower pools at the EOT. The n other non-pad tokens ("words") of a sample keep
    floor(n·(1 − r) + 1e-6) of them, chosen uniformly; a one-word caption at r = 0.75 loses its word. Padding
    is always dropped: unlike M3AE, which masks uniformly over all positions pads included, no keep budget is
    spent on pads (FLIP prioritises masking pads, docs/models.md §3).

    Returns ``keep_idx`` (B, K), ``restore_idx`` (B, T) and ``kept_valid`` (B, K), with K the largest kept
    count in the batch: slot k of sample b is a real kept token when ``kept_valid[b, k]``; the other slots
    hold masked tokens or pads and must be ignored (the towers use it as a key-padding mask).
    """
    batch, length = tokens.shape
    valid = valid_tokens(tokens)
    positions = torch.arange(length, device=tokens.device)[None, :]
    protected = (positions == 0) | (positions == tokens.argmax(dim=-1, keepdim=True))
    words = (valid & ~protected).sum(dim=1)
    kept = protected.sum(dim=1) + torch.floor(words * (1.0 - mask_ratio) + 1e-6).long()
    noise = torch.rand(batch, length, generator=generator, device=tokens.device)
    scores = torch.where(protected, -1.0, torch.where(valid, noise, 2.0))  # protected first, pads last
    keep, restore = keep_lowest(scores, int(kept.max()))
    kept_valid = torch.arange(keep.shape[1], device=tokens.device)[None, :] < kept[:, None]
    return keep, restore, kept_valid


def masked_positions(
    keep_idx: torch.Tensor, length: int, kept_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, L) bool, True at the positions that were not kept (for captions this includes the pads)."""
    kept = torch.zeros(keep_idx.shape[0], length, dtype=torch.bool, device=keep_idx.device)
    source = torch.ones_like(keep_idx, dtype=torch.bool) if kept_valid is None else kept_valid
    return ~kept.scatter(1, keep_idx, source)


def unshuffle(
    visible: torch.Tensor,
    restore_idx: torch.Tensor,
    fill: torch.Tensor,
    kept_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Put the kept tokens (B, K, D) back at their positions of a length-L sequence, ``fill`` (D,) elsewhere.

    This is how an MAE decoder inserts its mask token (``ids_restore`` in models_mae.py). Slots with
    ``kept_valid`` False are masked positions too, so they get ``fill`` as well.
    """
    batch, kept, width = visible.shape
    fill = fill.to(visible.dtype)
    if kept_valid is not None:
        visible = torch.where(kept_valid[..., None], visible, fill)
    full = torch.cat([visible, fill.expand(batch, restore_idx.shape[1] - kept, width)], dim=1)
    return torch.gather(full, 1, restore_idx[..., None].expand(-1, -1, width))

"""CLIP's byte-pair tokenizer (49,408 tokens, lower-cased), from open_clip, whose package ships the vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer

# CLIP's special tokens (open_clip SimpleTokenizer: <start_of_text>, <end_of_text>); padding is 0.
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0


@lru_cache(maxsize=8)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """(N, context_length) token ids: SOT, the caption, EOT, zero padding; too-long captions keep EOT last."""
    return _tokenizer(context_length)(list(texts), context_length=context_length).long()

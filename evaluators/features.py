"""What the evaluators read off a model: its image tower's tokens, pooled features and text embeddings.

Every objective keeps its ViT at ``model.visual`` except M3AE, whose tower sits inside the joint encoder
(``model.encoder.visual``) and must be run through it. Objectives without a joint image-text space (mae,
m3ae) raise ``NotImplementedError`` from ``encode_text``; ``has_text_embedding`` asks exactly that, so
zero-shot, retrieval and grounding are skipped for them rather than guessed.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.data.tokenizer import tokenize
from trainer.models.vit import VisionTransformer

POOLS = ("cls", "gap", "max", "map")


def kept(features: torch.Tensor) -> torch.Tensor:
    """An owned float32 CPU copy of a batch's features, to hold across batches.

    On CPU ``.float().cpu()`` returns the tensor itself, and CLS pooling is the view ``tokens[:, 0]``: holding it
    would hold the batch's every token (B x 197 x 768 floats at ViT-B/16), so memory would grow with each batch.
    """
    return features.detach().to("cpu", torch.float32, copy=True)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def vision_tower(model: nn.Module) -> VisionTransformer:
    encoder = getattr(model, "encoder", None)
    return encoder.visual if encoder is not None else model.visual


def image_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 1 + L, D) after the tower's final LayerNorm: CLS, then every patch in grid order."""
    encoder = getattr(model, "encoder", None)
    return encoder(images) if encoder is not None else model.visual.forward_tokens(images)


def pooled(tower: VisionTransformer, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """The (B, D) feature of ``kind``, before any projection.

    The trained pooling uses the tower's own pooler; the others are the parameter-free readouts (CLS token,
    patch mean, patch max; patches only, as ``trainer.models.pooling`` defines them). MAP needs a trained
    head, so it exists only for towers trained with it.
    """
    if kind == tower.pool:
        return tower.pool_tokens(tokens)
    if kind == "cls":
        return tokens[:, 0]
    if kind == "gap":
        return tokens[:, 1:].mean(dim=1)
    if kind == "max":
        return tokens[:, 1:].amax(dim=1)
    raise ValueError(f"pooling '{kind}' is not available for a tower trained with '{tower.pool}'")


def probe_pools(tower: VisionTransformer, diagnostic: bool) -> tuple[str, ...]:
    """The trained pooling first; with ``diagnostic``, then every other pooling this tower can give."""
    others = [p for p in POOLS if p != tower.pool and p != "map"] if diagnostic else []
    return (tower.pool, *others)


def has_text_embedding(model: nn.Module, context_length: int) -> bool:
    try:
        with torch.no_grad():
            model.encode_text(tokenize(["a"], context_length).to(device_of(model)))
    except NotImplementedError:
        return False
    return True

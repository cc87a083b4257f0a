"""A small model configuration and CLIP-like token batches, shared by the model tests."""

from __future__ import annotations

import torch

from trainer.config import ModelConfig

SMALL = dict(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    text_width=32,
    text_layers=2,
    text_heads=4,
    context_length=12,
    vocab_size=100,
    embed_dim=16,
)


def small_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


def make_tokens(batch: int, context: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """CLIP-like ids: SOT (vocab-2), words, EOT (vocab-1, the highest id) at a random place, then 0s."""
    tokens = torch.zeros(batch, context, dtype=torch.long)
    for row in range(batch):
        eot = int(torch.randint(1, context, (1,), generator=generator))
        tokens[row, 0] = vocab - 2
        tokens[row, 1:eot] = torch.randint(1, vocab - 2, (eot - 1,), generator=generator)
        tokens[row, eot] = vocab - 1
    return tokens


def model_and_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A two-layer MLP and an AdamW that has taken one step, so its state holds moments: checkpoint material."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer

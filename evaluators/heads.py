"""Small trainable heads on frozen features, trained with a fixed budget (the VQA and segmentation probes).

The linear probes solve a convex problem to convergence (L-BFGS); a fusion head or a per-pixel head is not
convex and sees far more rows, so it gets a fixed budget instead: ``steps`` AdamW updates on minibatches
drawn as seeded permutations of the training rows. The head's initialisation and the minibatch order come from
``seed`` alone (never from the global RNG), so two runs on the same features give identical metrics.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Budget:
    """What one head may spend: AdamW steps, minibatch size, learning rate, weight decay, seed."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


DEFAULT_BUDGET = Budget()


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a head with its parameters drawn from ``seed``; the caller's RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


@contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny ops on one intra-op thread: on busy CPU cores extra threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def minibatches(rows: int, budget: Budget) -> Iterator[torch.Tensor]:
    """``budget.steps`` index batches: consecutive slices of seeded permutations of ``range(rows)``."""
    generator = torch.Generator().manual_seed(budget.seed)
    size = min(budget.batch_size, rows)
    order, at = torch.randperm(rows, generator=generator), 0
    for _ in range(budget.steps):
        if at + size > rows:
            order, at = torch.randperm(rows, generator=generator), 0
        yield order[at:at + size]
        at += size


def train_head(
    head: nn.Module, rows: int, loss_of: Callable[[torch.Tensor], torch.Tensor], budget: Budget, label: str,
    progress_every: int = 100,
) -> nn.Module:
    """Fit ``head`` by minimising ``loss_of(row indices)`` for the budget; return it in eval mode.

    Progress (step, loss) goes to stderr every ``progress_every`` steps, as the suites report their passes.
    """
    if rows == 0:
        raise ValueError(f"{label}: no training rows")
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    with torch.enable_grad(), single_thread():
        for step, index in enumerate(minibatches(rows, budget), start=1):
            loss = loss_of(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % progress_every == 0 or step == budget.steps:
                print(f"[eval] {label}: step {step}/{budget.steps}, loss {loss.item():.4f}", file=sys.stderr,
                      flush=True)
    return head.eval()

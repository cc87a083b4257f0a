"""One optimizer step's gradients from its micro-batches: what ``trainer.train`` runs between two updates.

Gradient accumulation reaches a global batch larger than memory holds. For a reconstruction loss (a per-sample
mean) the mean of the micro-batches' gradients is the global batch's. A contrastive loss is not a per-sample
mean: each pair's term depends on every other pair of the batch, its negatives, so the mean of micro-batch losses
is another objective with ``micro-batch × world`` negatives (on 8 pairs, 0.557 for the full batch against 0.100
for two 4-pair halves). For the contrastive objectives (clip, flip, maeclip) the step therefore computes the loss
of the whole global batch, as open_clip's ``--accum-freq`` does, with gradient caching (Gao et al. 2021,
"Scaling deep contrastive learning batch size under memory limited setup"):

1. the image and text features of every micro-batch but the last are computed without gradients and kept
   (B × embed_dim each);
2. the last micro-batch runs with gradients, and the contrastive loss of all the features (gathered over ranks
   as without accumulation) plus its other losses is backpropagated: into the parameters through the last
   micro-batch, and into the kept features;
3. each other micro-batch is run again with gradients, on the same random state (so the same masks), and
   backward runs on ``features · their gradient from step 2 + the other losses / micro-batches``.

The parameter gradients sum to exactly those of one pass over the global batch: one more forward for each
micro-batch but the last buys the full batch's negatives. DDP and FSDP2 synchronise on the step's last
backward, as before; the features' gradients carry the world-size factor of the gathered loss
(``losses._gather``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.models.losses import clip_loss

Batch = dict[str, torch.Tensor]
# The context of one micro-batch's backward; its argument says whether gradients synchronise (the last one).
SyncContext = Callable[[bool], contextlib.AbstractContextManager[Any]]


def gradient_sync(module: nn.Module) -> SyncContext:
    """The ``sync`` of ``module``: skip the gradient all-reduce on all but the last micro-batch of a step (DDP's
    ``no_sync``, FSDP2's ``set_requires_gradient_sync``); nothing to skip for a plain module."""

    def sync(last: bool) -> contextlib.AbstractContextManager[Any]:
        if isinstance(module, DistributedDataParallel):
            return contextlib.nullcontext() if last else module.no_sync()
        if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
            module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    return sync


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.random.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulate(module: nn.Module, micro_batches: Sequence[Batch], sync: SyncContext,
               autocast: contextlib.AbstractContextManager[Any]) -> dict[str, torch.Tensor]:
    """Backward of the mean of the micro-batches' losses; their mean values, detached (the reconstruction
    objectives, and any objective with a single micro-batch)."""
    count = len(micro_batches)
    totals: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        with sync(index == count - 1):
            with autocast:  # the forward only: backward runs each op in the dtype its forward used
                losses = module(batch)
            (losses["loss"] / count).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0) + value.detach() / count
    return totals


def contrastive_step(module: nn.Module, micro_batches: Sequence[Batch], sync: SyncContext,
                     autocast: contextlib.AbstractContextManager[Any], device: torch.device
                     ) -> dict[str, torch.Tensor]:
    """Backward of ``contrastive(global batch) + mean of the other losses`` by gradient caching (module
    docstring); returns the step's losses, detached, named as the objective's forward names them.

    The last micro-batch needs no second pass: it runs with gradients straight away, and the contrastive loss
    over the cached features and its own is backpropagated through it and into the cached features at once.
    """
    count = len(micro_batches)
    states, images, texts, rests = [], [], [], []
    with torch.no_grad():
        for batch in micro_batches[:-1]:
            states.append(_rng_state(device))
            with autocast:
                out = module(batch, split=True)
            images.append(out["image_features"].float().requires_grad_())  # leaves: their gradient is kept
            texts.append(out["text_features"].float().requires_grad_())
            rests.append({k: v for k, v in out.items() if k.startswith("loss_")})
    with sync(count == 1):
        with autocast:
            last = module(micro_batches[-1], split=True)
        contrastive = clip_loss(torch.cat([*images, last["image_features"].float()]),
                                torch.cat([*texts, last["text_features"].float()]), last["scale"].float())
        (contrastive + last["loss_rest"] / count).backward()  # also fills the cached features' .grad
    rests.append({k: v.detach() for k, v in last.items() if k.startswith("loss_")})

    for index, batch in enumerate(micro_batches[:-1]):
        _set_rng_state(states[index], device)  # the same masks as the cached features had
        with sync(index == count - 2):
            with autocast:
                out = module(batch, split=True)
            # The scale's gradient came with the last micro-batch; it takes part with a zero, since DDP's reducer
            # reduces a bucket only once every parameter in it has had its gradient in this backward.
            surrogate = ((out["image_features"].float() * images[index].grad).sum()
                         + (out["text_features"].float() * texts[index].grad).sum() + out["loss_rest"] / count
                         + 0.0 * out["scale"])
            surrogate.backward()
    losses = {"loss_contrastive": contrastive.detach()}
    for name in rests[0]:
        losses[name] = sum(rest[name] for rest in rests) / count
    losses["loss"] = losses["loss_contrastive"] + losses.pop("loss_rest")
    losses["logit_scale"] = last["scale"].detach()
    return losses


def train_step(module: nn.Module, micro_batches: Sequence[Batch], sync: SyncContext,
               autocast: contextlib.AbstractContextManager[Any], device: torch.device, contrastive: bool
               ) -> dict[str, torch.Tensor]:
    """The gradients of one optimizer step (not the update): the global batch's loss, whether it arrives in one
    micro-batch or several. ``contrastive``: the objective's forward takes ``split`` (``ClipObjective``)."""
    if contrastive and len(micro_batches) > 1:
        return contrastive_step(module, micro_batches, sync, autocast, device)
    return accumulate(module, micro_batches, sync, autocast)

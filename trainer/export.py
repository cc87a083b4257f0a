"""Export a checkpoint's CLIP towers as an open_clip ``CLIP`` state dict in safetensors (``maeclip export``).

The checkpoint is read through ``checkpoint.load_for_eval``, so a tampered or malformed one is refused
(``CheckpointRefused``) before any weight is used. The file loads with ``strict=True`` into the open_clip
model of the same shape (see ``trainer.models.interop``); MAE-CLIP's decoder is left out.
"""

from __future__ import annotations

import safetensors.torch

from trainer import storage
from trainer.checkpoint import CheckpointRefused, load_for_eval
from trainer.models import ClipObjective, build_model
from trainer.models.interop import to_open_clip


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked, or an output that already exists; one line."""


def export_open_clip(checkpoint_url: str, out_url: str) -> str:
    """Write the open_clip state dict of the clip-family checkpoint at ``checkpoint_url`` to ``out_url``.

    Returns ``out_url``. An existing ``out_url`` is never overwritten (ExportError), nor is a model open_clip
    computes differently (MAE or M3AE without a CLIP text tower, GAP/MAP pooling, a non-causal text tower).
    """
    if storage.exists(out_url):  # checked first, so a mistyped --out costs no checkpoint read
        raise ExportError(f"{out_url} exists; not overwriting it")
    config, weights, _ = load_for_eval(checkpoint_url)
    model = build_model(config.model)
    if not isinstance(model, ClipObjective):
        raise ExportError(f"{checkpoint_url}: objective '{config.model.objective}' has no CLIP image and text "
                          "towers to export to open_clip")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:  # weights that do not fit the checkpoint's own config
        detail = " ".join(str(err).split())[:300]
        raise CheckpointRefused(f"refusing checkpoint {checkpoint_url}: weights.safetensors does not match its "
                                f"config.yaml: {detail}") from None
    try:
        state = to_open_clip(model)
    except ValueError as err:
        raise ExportError(f"{checkpoint_url}: {err}") from None
    if storage.exists(out_url):  # it may have appeared while the checkpoint was read
        raise ExportError(f"{out_url} exists; not overwriting it")
    storage.write_bytes(out_url, safetensors.torch.save({k: v.contiguous() for k, v in state.items()},
                                                         metadata={"format": "pt"}))
    return out_url

"""The study's arms: matched ablations against the CLIP baseline, one preset per arm and scale.

An arm is a preset ``<scale>-<arm>`` (``tiny-maeclip``, ``vit-b16-flip-matched``, ...). A matched arm has
``base: <scale>-clip`` and sets only the keys of the factor it studies, so any difference from clip can be
attributed to that factor (Weers et al. 2023 compare MAE-CLIP with CLIP; docs/models.md §6 lists what their
paper leaves open). The preset is the declaration: ``declared_keys`` reads it, nothing here repeats its values.
Poolings are chosen per run by override (``model.image_pool=<pool>``), not by more presets.
"""

from __future__ import annotations

from typing import Any

from trainer.config import PRESET_DIR, ConfigError, load_yaml

SCALES = ("tiny", "vit-b16")
BASELINE = "clip"

# name -> the factor it studies, in one sentence.
ARMS: dict[str, str] = {
    "clip": "The baseline: CLIP's two towers and symmetric InfoNCE loss (Radford et al. 2021).",
    "maeclip": "Masked autoencoding alone: clip unchanged on the full image and caption, plus MAE's decoder and "
               "pixel loss on a 0.75-masked pass (Weers et al. 2023; He et al. 2021).",
    "maeclip-text": "maeclip plus masked-caption reconstruction, which needs a bidirectional text tower "
                    "(M3AE, Geng et al. 2022).",
    "flip-matched": "Masking as augmentation: clip on images masked at maeclip's 0.75, no decoder "
                    "(FLIP, Li et al. 2022).",
    "maeclip-shared": "maeclip with one shared pass: the contrastive loss also sees only the 0.75-masked image "
                      "(FLIP's + MAE loss ablation, Li et al. 2022).",
    "mae": "Image-only masked autoencoding, scored by linear probes: no contrastive branch, so not matched "
           "(He et al. 2021).",
    "m3ae": "One joint encoder reconstructing masked patches and words, scored by linear probes: no contrastive "
            "branch, so not matched (Geng et al. 2022).",
}

# The arms whose presets are clip plus one factor; mae and m3ae have no contrastive branch to match.
MATCHED: tuple[str, ...] = ("maeclip", "maeclip-text", "flip-matched", "maeclip-shared")

# Keys a preset may set that say where it runs or what it is called, not what it trains.
_NOT_DECLARED = {"name", "base", "train.run_url"}


def arm_preset(scale: str, arm: str) -> str:
    """The preset name of ``arm`` at ``scale`` (``tiny`` or ``vit-b16``)."""
    if scale not in SCALES:
        raise ConfigError(f"scale {scale!r} is not one of {', '.join(SCALES)}")
    if arm not in ARMS:
        raise ConfigError(f"arm {arm!r} is not one of {', '.join(ARMS)}")
    return f"{scale}-{arm}"


def _flat(tree: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys |= _flat(value, f"{path}.") if isinstance(value, dict) else {path}
    return keys


def declared_keys(scale: str, arm: str) -> set[str]:
    """The flattened keys (``model.image_mask_ratio``, ...) that the arm's preset file itself sets, without its
    base, ``name`` and ``train.run_url``. For the baseline, which has no base, that is its whole recipe."""
    path = PRESET_DIR / f"{arm_preset(scale, arm)}.yaml"
    raw = load_yaml(path.read_text(encoding="utf-8"), f"preset {path.name!r}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path.name!r}: expected a mapping at the top level")
    return _flat(raw) - _NOT_DECLARED


__all__ = ["ARMS", "BASELINE", "MATCHED", "SCALES", "arm_preset", "declared_keys"]

"""Grounding as a number: text-conditioned relevance maps scored against the shapes corpus' object masks.

Three maps per image, each a (grid × grid) score over the patches:
- ``patch-text``: cosine similarity of each patch token, projected into the joint space, with the text
  embedding (the dense readout of MaskCLIP, Zhou et al. 2022, applied to our projection).
- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) on the last transformer block's normalised input tokens
  (``ln_1``), target the image-text cosine; channel weights are the token-averaged gradients. This is the
  layer pytorch-grad-cam's ViT example hooks (``blocks[-1].norm1``): the last block's *output* patch tokens
  never reach a CLS-pooled feature, so their gradient is zero and the map would be blank.
- ``map-attention``: for towers pooled by MAP, the probe query's attention over patches, averaged over heads
  (not text-conditioned: it shows what the pooled feature looks at).

Scores, against the mask of the object the text names: the pointing game (Zhang et al. 2016: a hit when the
map's maximum falls on the object) and mask IoU after min-max normalising the map and thresholding at 0.5.
Maps are upsampled bilinearly to the mask's resolution first. ``Grounding`` scores up to ``grounding_samples``
images of a split that have colour and shape labels and a primary-object mask or box.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from evaluators.features import device_of, image_tokens, vision_tower
from evaluators.protocol import Batch, Context, Outcome, Source
from trainer.data.tokenizer import tokenize
from trainer.models.pooling import AttentionPool

METHODS = ("patch-text", "gradcam", "map-attention")


def _grid(scores: torch.Tensor) -> torch.Tensor:
    side = round(scores.shape[1] ** 0.5)
    return scores.reshape(scores.shape[0], side, side)


def patch_text_map(model: torch.nn.Module, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, g, g) cosine of each projected patch token with its image's text embedding ``text`` (B, E)."""
    tower = vision_tower(model)
    patches = tokens[:, 1:] if tower.proj is None else tower.proj(tokens[:, 1:])
    return _grid(torch.einsum("ble,be->bl", F.normalize(patches.float(), dim=-1), text.float()))


def gradcam_map(model: torch.nn.Module, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, g, g) Grad-CAM of the image-text cosine on the last block's normalised input patch tokens."""
    layer = vision_tower(model).blocks[-1].ln_1
    found: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: found.append(out))
    try:
        with torch.enable_grad():
            embedding = model.encode_image(images)
            score = (embedding * text).sum()
            activations = found[-1]
            (grads,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    weights = grads[:, 1:].mean(dim=1, keepdim=True)
    return _grid(F.relu((activations[:, 1:] * weights).sum(dim=-1)).detach().float())


def map_attention_map(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """(B, g, g) head-averaged attention of the MAP probe over patches; None for towers without MAP."""
    pooler = vision_tower(model).pooler
    if not isinstance(pooler, AttentionPool):
        return None
    patches = tokens[:, 1:]
    batch, length, width = patches.shape
    head_dim = width // pooler.heads
    query = pooler.q_proj(pooler.probe).view(1, pooler.heads, head_dim)
    key = pooler.kv_proj(patches)[..., :width].view(batch, length, pooler.heads, head_dim)
    logits = torch.einsum("hd,blhd->bhl", query[0], key) / head_dim**0.5
    return _grid(logits.softmax(dim=-1).mean(dim=1).float())


def relevance_maps(
    model: torch.nn.Module, images: torch.Tensor, text: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every applicable map of ``METHODS`` for a batch; ``text`` (B, E) holds unit text embeddings."""
    images, text = images.to(device_of(model)), text.to(device_of(model))
    with torch.no_grad():
        tokens = image_tokens(model, images)
        maps = {"patch-text": patch_text_map(model, tokens, text)}
        attention = map_attention_map(model, tokens)
    maps["gradcam"] = gradcam_map(model, images, text)
    if attention is not None:
        maps["map-attention"] = attention
    return {name: value.cpu() for name, value in maps.items()}


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == size:
        return maps.float()
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) 1.0 where the map's maximum (first one, on ties) lies inside the mask, else 0.0."""
    flat = _upsample(maps, tuple(masks.shape[-2:])).flatten(1)
    return masks.flatten(1).gather(1, flat.argmax(dim=1, keepdim=True))[:, 0].float()


def mask_iou(maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B,) IoU of each min-max-normalised map thresholded at ``threshold`` with its mask.

    A constant map (a blank Grad-CAM) says nothing about where the object is: it selects no pixel, IoU 0.
    """
    flat = _upsample(maps, tuple(masks.shape[-2:])).flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    predicted = (flat - low) / (high - low).clamp(min=1e-12) >= threshold
    truth = masks.flatten(1).bool()
    union = (predicted | truth).sum(dim=1).clamp(min=1)
    return (predicted & truth).sum(dim=1).float() / union


def primary_mask(meta: dict[str, Any], image_size: int) -> torch.Tensor | None:
    """The (S, S) bool mask of the sample's primary object, in the eval transform's geometry.

    From the label map (``mask_png``, value 1 = the primary) when the corpus has one, else its rasterised
    box; None when the meta has neither. Resize-shorter-side then centre-crop, like ``eval_transform``.
    """
    if "mask_png" in meta:
        label_map = np.array(Image.open(io.BytesIO(base64.b64decode(meta["mask_png"]))))
        mask = torch.from_numpy(label_map == 1)
    elif meta.get("objects") and "bbox" in meta["objects"][0]:
        # Inclusive pixel boxes in the stored image, whose side the meta may give (else: the eval size).
        x0, y0, x1, y1 = meta["objects"][0]["bbox"]
        side = int(meta.get("image_size", image_size))
        mask = torch.zeros(side, side, dtype=torch.bool)
        mask[y0:y1 + 1, x0:x1 + 1] = True
    else:
        return None
    resized = TF.resize(mask[None].to(torch.uint8), image_size, interpolation=v2.InterpolationMode.NEAREST)
    return TF.center_crop(resized, image_size)[0].bool()


def primary_prompt(meta: dict[str, Any]) -> str:
    """The text naming the primary object, in the zero-shot prompts' wording ("a red circle.")."""
    labels = meta["labels"]
    article = "an" if labels["color"][0] in "aeiou" else "a"
    return f"{article} {labels['color']} {labels['shape']}."


def _heat(values: np.ndarray) -> np.ndarray:
    """A [0, 1] map to RGB: dark blue → red → yellow."""
    return np.stack([np.clip(2 * values, 0, 1), np.clip(2 * values - 1, 0, 1), np.clip(1 - 2 * values, 0, 1)],
                    axis=-1)


def overlay_grid(
    images: torch.Tensor, maps: dict[str, torch.Tensor], masks: torch.Tensor, captions: list[str]
) -> Image.Image:
    """One row per image: the image with its mask outlined, then each map blended over it (PNG-ready).

    ``images`` are (B, 3, S, S) in [0, 1] (un-normalised).
    """
    size = images.shape[-1]
    columns = 1 + len(maps)
    grid = Image.new("RGB", (columns * size, len(images) * (size + 12)), "white")
    draw = ImageDraw.Draw(grid)
    for row in range(len(images)):
        picture = (images[row].permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
        edge = masks[row].numpy() ^ np.roll(masks[row].numpy(), 1, axis=0)
        outlined = picture.copy()
        outlined[edge] = (0, 0, 0)
        top = row * (size + 12)
        grid.paste(Image.fromarray(outlined), (0, top + 12))
        draw.text((1, top), captions[row][: size * columns // 6], fill="black")
        for column, values in enumerate(maps.values(), start=1):
            heat = _upsample(values[row:row + 1], (size, size))[0].numpy()
            heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
            blend = 0.5 * picture / 255 + 0.5 * _heat(heat)
            grid.paste(Image.fromarray((blend * 255).astype(np.uint8)), (column * size, top + 12))
    return grid


class Grounding:
    """``eval/grounding/<map>/{pointing_game,mask_iou}`` and an overlay of the first rows' maps."""

    name = "grounding"
    needs_text = True

    def __init__(self, context: Context, source: Source) -> None:
        self.context, self.source = context, source
        self.scores: dict[str, list[torch.Tensor]] = {}
        self.overlay: dict[str, Any] = {}
        self.grounded = 0

    def reads(self) -> dict[str, tuple[Source, int | None]]:
        return {"test": (self.source, None)}

    def collect(self, role: str, batch: Batch) -> None:
        options, size = self.context.options, self.context.config.model.image_size
        rows = [i for i, m in enumerate(batch.metas) if {"color", "shape"} <= set(m.get("labels", {}))]
        rows = rows[: options.grounding_samples - self.grounded]
        masks = [primary_mask(batch.metas[i], size) for i in rows]
        rows = [i for i, mask in zip(rows, masks, strict=True) if mask is not None]
        if not rows:
            return
        masks_t = torch.stack([m for m in masks if m is not None])
        prompts = [primary_prompt(batch.metas[i]) for i in rows]
        model, context_length = self.context.model, self.context.config.model.context_length
        with torch.no_grad():
            text = model.encode_text(tokenize(prompts, context_length).to(self.context.device))
        images = batch.images[rows]
        maps = relevance_maps(model, images, text)
        for name, values in maps.items():
            for score, scorer in (("pointing_game", pointing_game), ("mask_iou", mask_iou)):
                self.scores.setdefault(f"{name}/{score}", []).append(scorer(values, masks_t))
        if not self.overlay:
            keep = slice(0, options.overlay_rows)
            self.overlay = {"images": self.context.unnormalise(images[keep]).cpu(), "masks": masks_t[keep],
                            "maps": {k: v[keep] for k, v in maps.items()}, "captions": prompts[keep]}
        self.grounded += len(rows)

    def finish(self) -> Outcome:
        outcome = Outcome()
        if not self.grounded:
            outcome.skip(self.name, f"skipping: the {self.source.split} split has no 'color' and 'shape' labels "
                                    "with object masks or boxes")
            return outcome
        outcome.metrics = {f"eval/grounding/{name}": torch.cat(values).mean().item()
                           for name, values in self.scores.items()}
        shown = self.overlay
        outcome.overlay = overlay_grid(shown["images"], shown["maps"], shown["masks"], shown["captions"])
        return outcome

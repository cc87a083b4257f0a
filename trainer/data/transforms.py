"""Image decoding and the train / eval transforms (normalised float tensors)."""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from trainer.config import DataConfig


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to RGB; a ValueError names what is wrong with them."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"undecodable image ({len(data)} bytes): {err}") from err


def _to_tensor(data_cfg: DataConfig) -> list:
    normalize = v2.Normalize(data_cfg.image_mean, data_cfg.image_std)
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), normalize]


def train_transform(data_cfg: DataConfig, image_size: int) -> v2.Compose:
    """RandomResizedCrop at ``data_cfg.crop_scale``; no flip, because captions may say left and right."""
    crop = v2.RandomResizedCrop(image_size, scale=data_cfg.crop_scale, interpolation=v2.InterpolationMode.BICUBIC,
                                antialias=True)
    return v2.Compose([crop, *_to_tensor(data_cfg)])


def eval_transform(data_cfg: DataConfig, image_size: int) -> v2.Compose:
    """Resize the shorter side to ``image_size`` (bicubic) and centre-crop, as CLIP evaluates."""
    return v2.Compose([
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        *_to_tensor(data_cfg),
    ])

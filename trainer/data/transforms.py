"""Image decoding and the train / eval transforms (normalised float tensors).

The loader decodes with ``torchvision.io.decode_image`` and transforms uint8 tensors: on the stored JPEGs that
path measured 2-2.7x faster than PIL decode + PIL resize (``bench/data.py``, 2 CPU cores, 64 and 224 px).
``decode_image`` (PIL) remains for callers that want pixels to inspect.
"""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _decode_to_tensor
from torchvision.transforms import v2

from trainer.config import DataConfig


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to RGB; a ValueError names what is wrong with them."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"undecodable image ({len(data)} bytes): {err}") from err


def decode_tensor(data: bytes) -> torch.Tensor:
    """Decode JPEG/PNG/WebP bytes to an RGB uint8 tensor (3, H, W); a ValueError when they are not an image."""
    try:
        return _decode_to_tensor(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise ValueError(f"undecodable image ({len(data)} bytes): {err}") from err


def _to_float(data_cfg: DataConfig) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(data_cfg.image_mean, data_cfg.image_std)]


def train_transform(data_cfg: DataConfig, image_size: int) -> v2.Compose:
    """RandomResizedCrop at ``data_cfg.crop_scale``; no flip, because captions may say left and right."""
    crop = v2.RandomResizedCrop(image_size, scale=data_cfg.crop_scale, interpolation=v2.InterpolationMode.BICUBIC,
                                antialias=True)
    return v2.Compose([crop, *_to_float(data_cfg)])


def eval_transform(data_cfg: DataConfig, image_size: int) -> v2.Compose:
    """Resize the shorter side to ``image_size`` (bicubic) and centre-crop, as CLIP evaluates."""
    return v2.Compose([
        v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        *_to_float(data_cfg),
    ])

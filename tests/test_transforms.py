"""Train and eval transforms: the crop sampler against torchvision's, normalisation by known answers."""

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.transforms import RandomResizedCrop, v2

from trainer.config import DataConfig
from trainer.data.transforms import CROP_RATIO, crop_box, eval_transform, train_transform

DATA = DataConfig()


@given(height=st.integers(1, 600), width=st.integers(1, 600), low=st.floats(0.05, 1.0), seed=st.integers(0, 2**62))
@settings(max_examples=200, deadline=None)
def test_crop_box_lies_in_the_image_and_depends_only_on_the_seed(height, width, low, seed):
    box = crop_box(height, width, (low, 1.0), random.Random(seed))
    top, left, h, w = box
    assert 0 < h <= height and 0 < w <= width and 0 <= top <= height - h and 0 <= left <= width - w
    assert crop_box(height, width, (low, 1.0), random.Random(seed)) == box


@pytest.mark.parametrize("size", [(256, 256), (256, 320), (300, 240)])
def test_full_scale_keeps_the_whole_image_when_its_aspect_is_in_range(size):
    """Up to rounding, as torchvision's: an attempt may land on width - 1 when sqrt(area * aspect) rounds down."""
    height, width = size
    assert CROP_RATIO[0] <= width / height <= CROP_RATIO[1]
    for seed in range(50):
        top, left, h, w = crop_box(height, width, (1.0, 1.0), random.Random(seed))
        assert height - 1 <= h <= height and width - 1 <= w <= width and top <= 1 and left <= 1


@pytest.mark.parametrize("size, scale", [((256, 340), (0.5, 1.0)), ((256, 256), (0.08, 1.0)), ((64, 400), (0.3, 0.6))])
def test_crop_statistics_match_torchvision_random_resized_crop(size, scale):
    """Same distribution as torchvision's sampler: mean and spread of area fraction and log aspect ratio."""
    height, width = size
    draws = 4000
    rng = random.Random(0)
    ours = [crop_box(height, width, scale, rng)[2:] for _ in range(draws)]
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = [tuple(RandomResizedCrop.get_params(image, list(scale), list(CROP_RATIO))[2:]) for _ in range(draws)]

    def stats(boxes: list[tuple[int, int]]) -> tuple[float, float, float, float]:
        area = torch.tensor([h * w / (height * width) for h, w in boxes])
        aspect = torch.tensor([math.log(w / h) for h, w in boxes])
        return area.mean().item(), area.std().item(), aspect.mean().item(), aspect.std().item()

    for ours_stat, their_stat in zip(stats(ours), stats(theirs), strict=True):
        assert ours_stat == pytest.approx(their_stat, abs=0.01)


def test_a_constant_image_normalises_to_the_known_value():
    colour = torch.tensor([200, 30, 120], dtype=torch.uint8)
    image = colour.view(3, 1, 1).expand(3, 97, 131).contiguous()
    expected = (colour.float() / 255 - torch.tensor(DATA.image_mean)) / torch.tensor(DATA.image_std)
    for transform in (train_transform(DATA, 32), eval_transform(DATA, 32)):
        out = transform(image, 7)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5, rtol=0)


def test_eval_transform_equals_torchvision_resize_centre_crop_normalise():
    image = torch.randint(0, 256, (3, 120, 170), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = v2.Compose([
        v2.Resize(48, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(48),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(DATA.image_mean, DATA.image_std)])
    torch.testing.assert_close(eval_transform(DATA, 48)(image, 0), reference(image), atol=1e-5, rtol=0)


def test_train_crops_differ_across_seeds_and_repeat_for_a_seed():
    image = torch.randint(0, 256, (3, 200, 260), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    transform = train_transform(DATA, 32)
    assert torch.equal(transform(image, 5), transform(image, 5))
    assert not torch.equal(transform(image, 5), transform(image, 6))

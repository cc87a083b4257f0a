"""Grounding: the scores' known answers (a map equal to the mask scores 1.0/1.0), masks read from the shapes
corpus in the eval geometry, and the relevance maps of the real tiny model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluators.grounding import (
    mask_iou,
    overlay_grid,
    pointing_game,
    primary_mask,
    primary_prompt,
    relevance_maps,
)
from trainer.config import load_config
from trainer.data.shapes import decode_mask, make_sample
from trainer.models import build_model


@settings(deadline=None, max_examples=40)
@given(side=st.integers(2, 16), seed=st.integers(0, 2**16), batch=st.integers(1, 4))
def test_a_map_equal_to_the_mask_scores_one_and_one(side, seed, batch):
    masks = torch.rand(batch, side, side, generator=torch.Generator().manual_seed(seed)) < 0.3
    masks[:, 0, 0], masks[:, -1, -1] = True, False  # never empty, never everything
    maps = masks.float()
    assert pointing_game(maps, masks).tolist() == [1.0] * batch
    assert mask_iou(maps, masks).tolist() == [1.0] * batch


def test_a_constant_map_localises_nothing():
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    assert mask_iou(torch.full((1, 4, 4), 0.7), mask).item() == 0.0


def test_a_map_peaking_off_the_object_misses_and_half_overlap_scores_a_third():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :, :2] = True  # left half
    off = torch.zeros(1, 4, 4)
    off[0, 0, 3] = 1.0
    assert pointing_game(off, mask).item() == 0.0
    shifted = torch.zeros(1, 4, 4)
    shifted[0, :, 1:3] = 1.0  # columns 1-2: intersection 4, union 12
    assert mask_iou(shifted, mask).item() == pytest.approx(1 / 3)


def test_a_coarse_map_is_upsampled_onto_the_mask():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 4:, 4:] = True  # bottom-right quadrant
    coarse = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    assert pointing_game(coarse, mask).item() == 1.0
    assert mask_iou(coarse, mask).item() > 0.5


def test_primary_mask_is_the_label_map_in_eval_geometry():
    meta = make_sample(seed=1, split="eval", index=4, image_size=64)["meta"]
    full = torch.from_numpy(np.array(decode_mask(meta)) == 1)
    assert torch.equal(primary_mask(meta, 64), full)
    half = primary_mask(meta, 32)
    assert half.shape == (32, 32)
    assert torch.equal(half, full[::2, ::2]) or (half ^ full[::2, ::2]).float().mean() < 0.05
    box = primary_mask({"objects": [{"bbox": [2, 3, 5, 4]}], "image_size": 8}, 8)
    assert box.sum() == 8 and box[3:5, 2:6].all()
    assert primary_mask({"labels": {}}, 8) is None


def test_primary_prompt_uses_the_right_article():
    assert primary_prompt({"labels": {"color": "orange", "shape": "star"}}) == "an orange star."
    assert primary_prompt({"labels": {"color": "red", "shape": "circle"}}) == "a red circle."


@pytest.mark.parametrize(("pool", "methods"), [("cls", {"patch-text", "gradcam"}),
                                               ("map", {"patch-text", "gradcam", "map-attention"})])
def test_relevance_maps_of_the_tiny_model(pool, methods):
    config = load_config("tiny-clip", [f"model.image_pool={pool}"])
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        text = model.encode_text(torch.randint(1, 100, (3, config.model.context_length)))
    maps = relevance_maps(model, images, text)
    assert set(maps) == methods
    for values in maps.values():
        assert values.shape == (3, 8, 8) and torch.isfinite(values).all()
    assert (maps["gradcam"] >= 0).all()
    assert (maps["gradcam"].amax(dim=(1, 2)) > 0).all()  # not blank: the hooked tokens reach the pooled feature
    assert all(p.grad is None for p in model.parameters())  # Grad-CAM leaves the weights' grads alone
    if "map-attention" in maps:
        torch.testing.assert_close(maps["map-attention"].sum(dim=(1, 2)), torch.ones(3))
    # The patch-text map is each patch's cosine with the text: at most 1 in magnitude.
    assert maps["patch-text"].abs().max() <= 1 + 1e-5


def test_overlay_grid_has_a_row_per_image_and_a_column_per_map():
    images = torch.rand(2, 3, 16, 16)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True
    grid = overlay_grid(images, {"a": torch.rand(2, 4, 4), "b": torch.rand(2, 4, 4)}, masks, ["x", "y"])
    assert grid.size == (3 * 16, 2 * (16 + 12))

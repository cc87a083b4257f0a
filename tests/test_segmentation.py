"""Segmentation probe: known answers (tokens that encode the class give mIoU 1), IoU arithmetic by hand and as
properties, class masks read from the shapes label maps, the majority baseline, determinism and the overlay."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluators.heads import Budget
from evaluators.segmentation import (
    CLASSES,
    class_iou,
    class_mask,
    confusion,
    evaluate_segmentation,
    overlay_grid,
    score_segmentation,
)
from trainer.data.shapes import decode_mask, make_sample

BUDGET = Budget(steps=150, batch_size=16, lr=1e-2)
EMBED = torch.randn(len(CLASSES), 24, generator=torch.Generator().manual_seed(7))


def _encode(classes: torch.Tensor, seed: int) -> torch.Tensor:
    """An 'encoder' whose token at each grid cell is its class's embedding plus a little noise: (N, g*g, 24)."""
    tokens = torch.nn.functional.one_hot(classes.flatten(1).long(), len(CLASSES)).float() @ EMBED
    return tokens + 0.05 * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(seed))


def _shapes_masks(split: str, n: int, size: int) -> torch.Tensor:
    return torch.stack([class_mask(make_sample(3, split, i, 64)["meta"], size) for i in range(n)])


def test_tokens_that_encode_every_pixels_class_are_segmented_perfectly():
    train, test = _shapes_masks("train", 40, 16), _shapes_masks("eval", 12, 16)
    metrics, predicted = evaluate_segmentation(_encode(train, 1), train, _encode(test, 2), test, BUDGET)
    assert metrics["eval/seg/miou"] >= 0.99
    assert metrics["eval/seg/miou"] > metrics["eval/seg/majority_miou"]
    assert set(metrics) >= {f"eval/seg/iou/{c}" for c in CLASSES}
    assert predicted.shape == test.shape and predicted.dtype == torch.uint8


def test_coarse_patch_logits_are_upsampled_onto_the_pixel_mask():
    generator = torch.Generator().manual_seed(0)
    # 2×2 patch grids with four different classes, masks at 8×8: each quadrant is one patch's class.
    grids = torch.stack([torch.randperm(len(CLASSES), generator=generator)[:4].reshape(2, 2) for _ in range(40)])
    masks = grids.repeat_interleave(4, 1).repeat_interleave(4, 2).to(torch.uint8)
    metrics, predicted = evaluate_segmentation(_encode(grids[:30], 3), masks[:30], _encode(grids[30:], 4),
                                               masks[30:], BUDGET)
    assert metrics["eval/seg/miou"] >= 0.99
    assert torch.equal(predicted, masks[30:])


def test_iou_by_hand():
    truth = torch.tensor([[0, 0, 1, 1]])
    predicted = torch.tensor([[0, 1, 1, 1]])
    # background: 1 hit, union 2; circle: 2 hits, union 3; other classes absent from both.
    iou = class_iou(confusion(predicted, truth))
    assert iou[:2].tolist() == pytest.approx([0.5, 2 / 3])
    assert torch.isnan(iou[2:]).all()
    metrics = score_segmentation(predicted, truth, train_masks=torch.zeros(1, 4, dtype=torch.uint8))
    assert metrics["eval/seg/miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert metrics["eval/seg/pixel_accuracy"] == pytest.approx(0.75)
    # The majority (background) everywhere: background IoU 2/4, circle 0.
    assert metrics["eval/seg/majority_miou"] == pytest.approx(0.25)
    assert metrics["eval/seg/majority_pixel_accuracy"] == pytest.approx(0.5)
    assert "eval/seg/iou/square" not in metrics


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**16), side=st.integers(1, 12))
def test_a_perfect_prediction_scores_one_and_confusion_counts_every_pixel(seed, side):
    truth = torch.randint(0, len(CLASSES), (3, side, side), generator=torch.Generator().manual_seed(seed))
    matrix = confusion(truth, truth)
    assert matrix.sum() == truth.numel() and torch.equal(matrix, torch.diag(matrix.diag()))
    assert class_iou(matrix).nan_to_num(1.0).tolist() == [1.0] * len(CLASSES)
    shuffled = truth.flatten()[torch.randperm(truth.numel(), generator=torch.Generator().manual_seed(seed))]
    assert 0.0 <= score_segmentation(shuffled.view_as(truth), truth, truth)["eval/seg/miou"] <= 1.0


def test_class_mask_gives_each_pixel_its_objects_shape():
    meta = make_sample(seed=2, split="eval", index=11, image_size=64)["meta"]
    objects = np.array(decode_mask(meta))
    classes = class_mask(meta, 64)
    for number, obj in enumerate(meta["objects"], start=1):
        assert (classes.numpy()[objects == number] == CLASSES.index(obj["shape"])).all()
    assert (classes.numpy()[objects == 0] == 0).all()
    assert class_mask(meta, 32).shape == (32, 32)
    assert class_mask({"labels": {}}, 32) is None


def test_two_runs_give_identical_metrics():
    train, test = _shapes_masks("train", 16, 8), _shapes_masks("eval", 8, 8)
    tokens = _encode(train, 5) + 0.5 * torch.randn(16, 64, 24, generator=torch.Generator().manual_seed(6))
    budget = Budget(steps=20, batch_size=4)
    first, _ = evaluate_segmentation(tokens, train, _encode(test, 7), test, budget)
    second, _ = evaluate_segmentation(tokens, train, _encode(test, 7), test, budget)
    assert first == second


def test_overlay_shows_image_truth_and_prediction_per_row():
    masks = _shapes_masks("eval", 3, 32)
    grid = overlay_grid(torch.rand(3, 3, 32, 32), masks, masks)
    assert grid.size == (3 * 32, 12 + 3 * 32)
    pixels = np.array(grid)
    assert (pixels[12:44, 32:64] == pixels[12:44, 64:96]).all()  # truth and a perfect prediction look alike

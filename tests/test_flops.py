"""FLOPs per sample: known answers from open_clip's profile and anchors §B2, and parity with PyTorch's FLOP
counter run on our objectives; MFU against the peak table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import Config, ConfigError, ModelConfig, validate
from trainer.models import build_model
from trainer.models.flops import (
    PEAK_BF16_TFLOPS,
    decoder_macs,
    flops_per_sample,
    forward_flops,
    image_macs,
    mfu,
    peak_tflops,
    text_macs,
)

G = 1e9
VIT_B16 = ModelConfig()  # the defaults are ViT-B/16 at 224 px with CLIP's 12 x 512 text tower


@pytest.mark.parametrize(
    ("gflops", "expected"),
    [
        # open_clip docs/model_profile.csv: ViT-B-16 image 35.13, text 5.96; ViT-B-32 image 8.82.
        (2 * image_macs(VIT_B16, 0.0) / G, 35.13),
        (2 * text_macs(VIT_B16, 77) / G, 5.96),
        (2 * image_macs(dataclasses.replace(VIT_B16, patch_size=32), 0.0) / G, 8.82),
        # anchors §B2: encoder forward at 50 % and 75 % masking, MAE's 8 x 512 decoder over 197 tokens.
        (2 * image_macs(VIT_B16, 0.5) / G, 17.4),
        (2 * image_macs(VIT_B16, 0.75) / G, 8.8),
        (2 * decoder_macs(VIT_B16, 50 * 768, 0, 0) / G, 10.7),
        # anchors §B2, training GFLOPs per sample = 3 x forward.
        (flops_per_sample(VIT_B16) / G, 123),
        (flops_per_sample(dataclasses.replace(VIT_B16, objective="flip", image_mask_ratio=0.5)) / G, 70),
        (flops_per_sample(dataclasses.replace(VIT_B16, objective="flip", image_mask_ratio=0.75)) / G, 44),
        # MAE-CLIP with an unmasked contrastive pass and the cross-modal decoder over 197 + 77 tokens.
        (
            flops_per_sample(
                dataclasses.replace(
                    VIT_B16, objective="maeclip", image_mask_ratio=0.75, contrastive_input="unmasked"
                )
            )
            / G,
            195,
        ),
    ],
)
def test_known_answers_within_one_percent(gflops: float, expected: float) -> None:
    assert gflops == pytest.approx(expected, rel=0.01)


def test_masking_saves_only_encoder_work() -> None:
    clip = flops_per_sample(VIT_B16)
    flip = flops_per_sample(dataclasses.replace(VIT_B16, objective="flip", image_mask_ratio=0.5))
    saved = 3 * (image_macs(VIT_B16, 0.0) - image_macs(VIT_B16, 0.5)) * 2
    assert clip - flip == pytest.approx(saved)
    masked = dataclasses.replace(VIT_B16, objective="maeclip", image_mask_ratio=0.75)
    unmasked = dataclasses.replace(masked, contrastive_input="unmasked")
    # The unmasked contrastive input adds one trained full image pass; the masked pass loses its projection.
    extra = 6 * (image_macs(VIT_B16, 0.0) - 768 * 512)
    assert flops_per_sample(unmasked) - flops_per_sample(masked) == pytest.approx(extra)


# ---------------------------------------------------------------------------------------------------------
# Parity with torch.utils.flop_counter on our objectives' forward.

TINY = dict(
    image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4, text_width=32,
    text_layers=2, text_heads=4, context_length=12, vocab_size=100, embed_dim=16, decoder_width=32,
    decoder_layers=2, decoder_heads=4,
)


def counted_forward_flops(cfg: ModelConfig, batch_size: int) -> float:
    """FLOPs per sample that PyTorch's counter sees in one training-mode forward, captions filling the
    context.

    The math SDPA backend decomposes attention into counted bmm's (the CPU flash kernel has no FLOP formula),
    and no_grad keeps the counter's module tracker away from views made inside the objectives' no_grad blocks.
    """
    torch.manual_seed(0)
    model = build_model(cfg).train()
    tokens = torch.randint(1, cfg.vocab_size - 2, (batch_size, cfg.context_length))
    tokens[:, 0], tokens[:, -1] = cfg.vocab_size - 2, cfg.vocab_size - 1  # start, words, EOT last
    batch = {"image": torch.randn(batch_size, 3, cfg.image_size, cfg.image_size), "tokens": tokens}
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(batch)
    return counter.get_total_flops() / batch_size


@settings(max_examples=40, deadline=None)
@given(
    objective=st.sampled_from(["clip", "flip", "mae", "m3ae", "maeclip"]),
    image_pool=st.sampled_from(["cls", "map", "gap", "max"]),
    text_pool=st.sampled_from(["eot", "map", "gap", "max"]),
    image_mask_ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
    text_mask_ratio=st.sampled_from([0.0, 0.5, 0.75]),
    contrastive_input=st.sampled_from(["masked", "unmasked"]),
    image_masking=st.sampled_from(["random", "similarity"]),
    patch_size=st.sampled_from([4, 8, 16]),
)
def test_formula_matches_pytorch_flop_counter(**choice: object) -> None:
    cfg = ModelConfig(**{**TINY, **choice, "text_causal": choice["text_mask_ratio"] == 0.0})
    try:
        validate(Config(model=cfg))
    except ConfigError:
        assume(False)
    counted = counted_forward_flops(cfg, batch_size=3)
    # Left out by the formula: the B x B contrastive logits and MAP's once-per-batch query projection.
    assert counted == pytest.approx(forward_flops(cfg), rel=2e-3)


# ---------------------------------------------------------------------------------------------------------
# MFU.


def test_peak_lookup_by_device_name() -> None:
    assert peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops("NVIDIA H100 PCIe") == 756  # the longest matching key wins
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops("cpu") is None
    assert set(PEAK_BF16_TFLOPS) >= {"H100", "H200", "A100"}


def test_mfu_known_answers() -> None:
    # anchors §B2: CLIP ViT-B/16 at 123 GFLOPs/sample, 3,210 samples/s on one H200 is 40 % MFU.
    assert mfu(3210, 123e9, "NVIDIA H200", 1) == pytest.approx(0.40, abs=0.005)
    # The same per-device rate on 8 devices: 8x the samples, same MFU.
    assert mfu(8 * 3210, 123e9, "NVIDIA H200", 8) == pytest.approx(0.40, abs=0.005)
    assert mfu(1000, 123e9, "cpu", 1) is None

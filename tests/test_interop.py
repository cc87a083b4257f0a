"""open_clip interop: its ViT-B-32 / ViT-B-16 (and small ViT CLIPs of any shape) loaded into our towers give
the same embeddings, and the state dict comes back bit for bit."""

from __future__ import annotations

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from small_models import make_tokens

from trainer.config import ModelConfig
from trainer.models import build_model
from trainer.models.interop import from_open_clip, infer_config, to_open_clip


def perturb(model: torch.nn.Module, seed: int) -> None:
    """open_clip starts LayerNorms at identity, biases at zero and all of them alike, so a mapping that swaps
    two of them would pass unnoticed; make every tensor distinct."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim < 2 or "ln" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def assert_same_embeddings(
    ours: torch.nn.Module, reference: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> None:
    ours.eval()
    reference.eval()
    with torch.no_grad():
        image_diff = ours.encode_image(images) - reference.encode_image(images, normalize=True)
        text_diff = ours.encode_text(tokens) - reference.encode_text(tokens, normalize=True)
    assert image_diff.abs().max() <= 1e-5
    assert text_diff.abs().max() <= 1e-5


@pytest.fixture(scope="module", params=["ViT-B-32", "ViT-B-16"])
def vit_b(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, torch.nn.Module]:
    """(name, open_clip's randomly initialised model, ours from its state dict)."""
    torch.manual_seed(0)
    reference = open_clip.create_model(request.param, pretrained=None)
    perturb(reference, seed=1)
    return request.param, reference, from_open_clip(reference.state_dict())


def test_vit_b_config_is_inferred(vit_b: tuple[str, torch.nn.Module, torch.nn.Module]) -> None:
    name, reference, _ = vit_b
    patch = 32 if name == "ViT-B-32" else 16
    # Our defaults are ViT-B/16 (open_clip model_configs/ViT-B-16.json); B-32 differs only in the patch.
    assert infer_config(reference.state_dict()) == ModelConfig(patch_size=patch)


def test_vit_b_embeddings_match_open_clip(vit_b: tuple[str, torch.nn.Module, torch.nn.Module]) -> None:
    _, reference, ours = vit_b
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    tokens = open_clip.tokenize(["a photo of a cat", "two dogs running through deep snow on a sunny morning"])
    assert_same_embeddings(ours, reference, images, tokens)
    assert ours.logit_scale.item() == reference.logit_scale.item()


def test_vit_b_round_trip_is_exact(vit_b: tuple[str, torch.nn.Module, torch.nn.Module]) -> None:
    _, reference, ours = vit_b
    assert_same_state(to_open_clip(ours), reference.state_dict())


# ---------------------------------------------------------------------------------------------------------
# Any ViT CLIP whose shapes we can read: small random architectures.


@settings(max_examples=12, deadline=None)
@given(
    patch=st.sampled_from([4, 8]),
    grid=st.integers(1, 4),
    vision=st.sampled_from([(48, 16), (64, 32), (32, 8)]),  # (width, head width)
    vision_layers=st.integers(1, 3),
    text=st.sampled_from([(32, 4), (48, 3), (64, 2)]),  # (width, heads)
    text_layers=st.integers(1, 3),
    context=st.integers(3, 16),
    vocab=st.integers(10, 200),
    embed_dim=st.sampled_from([8, 24]),
    mlp_ratio=st.sampled_from([2.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_small_vit_clips_match_open_clip(
    patch: int,
    grid: int,
    vision: tuple[int, int],
    vision_layers: int,
    text: tuple[int, int],
    text_layers: int,
    context: int,
    vocab: int,
    embed_dim: int,
    mlp_ratio: float,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    (vision_width, head_width), (text_width, text_heads) = vision, text
    reference = open_clip.model.CLIP(
        embed_dim=embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=vision_layers, width=vision_width, head_width=head_width, patch_size=patch,
            image_size=patch * grid, mlp_ratio=mlp_ratio,
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=context, vocab_size=vocab, width=text_width, heads=text_heads, layers=text_layers,
            mlp_ratio=mlp_ratio,
        ),
    )
    perturb(reference, seed)
    state = reference.state_dict()
    ours = from_open_clip(state, vision_heads=vision_width // head_width, text_heads=text_heads)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, patch * grid, patch * grid, generator=generator)
    assert_same_embeddings(ours, reference, images, make_tokens(3, context, vocab, generator))
    assert_same_state(to_open_clip(ours), state)


def test_heads_default_to_width_over_64() -> None:
    reference = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=128, patch_size=8, image_size=16),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=50, width=64, heads=1, layers=1),
    )
    perturb(reference, seed=0)
    cfg = infer_config(reference.state_dict())
    assert (cfg.vision_heads, cfg.text_heads) == (2, 1)
    images = torch.randn(2, 3, 16, 16)
    tokens = make_tokens(2, 8, 50, torch.Generator().manual_seed(0))
    assert_same_embeddings(from_open_clip(reference.state_dict()), reference, images, tokens)


def test_our_model_exports_into_open_clip() -> None:
    """The other direction on its own: our weights, exported, load strictly into open_clip's model (fixed
    sin-cos positions become values of its learned table)."""
    cfg = ModelConfig(
        pos_embed="sincos",
        image_size=24, patch_size=8, vision_width=64, vision_layers=2, vision_heads=1, text_width=64,
        text_layers=2, text_heads=1, context_length=10, vocab_size=60, embed_dim=16,
    )
    torch.manual_seed(3)
    ours = build_model(cfg)
    perturb(ours, seed=3)
    reference = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=24),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=10, vocab_size=60, width=64, heads=1, layers=2),
    )
    reference.load_state_dict(to_open_clip(ours), strict=True)
    images = torch.randn(2, 3, 24, 24)
    tokens = make_tokens(2, 10, 60, torch.Generator().manual_seed(3))
    assert_same_embeddings(ours, reference, images, tokens)


def test_quickgelu_weights_need_the_quickgelu_switch_to_match() -> None:
    """OpenAI's weights (open_clip's ``-quickgelu`` models) were trained with QuickGELU: with ``quick_gelu`` they
    give open_clip's embeddings, and read with our exact GELU they do not (which nothing in the weights shows)."""
    torch.manual_seed(5)
    reference = open_clip.model.CLIP(
        embed_dim=16, quick_gelu=True,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=24),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=10, vocab_size=60, width=64, heads=1, layers=2),
    )
    perturb(reference, seed=5)
    images = torch.randn(2, 3, 24, 24)
    tokens = make_tokens(2, 10, 60, torch.Generator().manual_seed(5))
    ours = from_open_clip(reference.state_dict(), vision_heads=1, quick_gelu=True)
    assert ours.visual.blocks[0].mlp.activation is not torch.nn.functional.gelu
    assert_same_embeddings(ours, reference, images, tokens)
    exact = from_open_clip(reference.state_dict(), vision_heads=1).eval()
    with torch.no_grad():
        assert (exact.encode_image(images) - ours.encode_image(images)).abs().max() > 1e-3
    # And back: the export loads into open_clip's QuickGELU model and computes the same there.
    again = open_clip.model.CLIP(
        embed_dim=16, quick_gelu=True,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=24),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=10, vocab_size=60, width=64, heads=1, layers=2),
    )
    again.load_state_dict(to_open_clip(ours), strict=True)
    assert_same_embeddings(ours, again, images, tokens)


def test_half_precision_round_trip_keeps_dtype() -> None:
    reference = open_clip.model.CLIP(
        embed_dim=8,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=64, patch_size=4, image_size=8),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=5, vocab_size=20, width=64, heads=1, layers=1),
    )
    perturb(reference, seed=5)
    state = {key: value.half() for key, value in reference.state_dict().items()}
    assert_same_state(to_open_clip(from_open_clip(state)), state)


# ---------------------------------------------------------------------------------------------------------
# Layouts we cannot represent are refused, not silently changed.

SMALL_TEXT = dict(context_length=6, vocab_size=30, width=64, heads=1, layers=1)


@pytest.mark.parametrize(
    "vision_extra",
    [
        {"ls_init_value": 0.1},  # layer scale: ls_1 / ls_2 gammas in every block
        {"attentional_pool": True},  # CoCa-style attention pooler
        {"no_ln_pre": True},
    ],
)
def test_foreign_layouts_are_refused(vision_extra: dict) -> None:
    reference = open_clip.model.CLIP(
        embed_dim=8,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=1, width=64, patch_size=4, image_size=8, **vision_extra
        ),
        text_cfg=open_clip.model.CLIPTextCfg(**SMALL_TEXT),
    )
    with pytest.raises(ValueError, match="layout differs"):
        from_open_clip(reference.state_dict())


def test_unknown_heads_need_an_override() -> None:
    reference = open_clip.model.CLIP(
        embed_dim=8,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=1, width=48, head_width=16, patch_size=4, image_size=8
        ),
        text_cfg=open_clip.model.CLIPTextCfg(**SMALL_TEXT),
    )
    with pytest.raises(ValueError, match="vision_heads"):
        from_open_clip(reference.state_dict())
    assert from_open_clip(reference.state_dict(), vision_heads=3).visual.blocks[0].attn.heads == 3


def test_not_a_clip_state_dict_is_refused() -> None:
    with pytest.raises(ValueError, match="not an open_clip ViT CLIP"):
        from_open_clip({"weight": torch.zeros(2, 2)})


@pytest.mark.parametrize(
    "overrides",
    [{"image_pool": "gap"}, {"text_pool": "map"}, {"text_causal": False}],
)
def test_export_refuses_what_open_clip_computes_differently(overrides: dict) -> None:
    cfg = ModelConfig(
        image_size=8, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
        text_layers=1, text_heads=2, context_length=6, vocab_size=30, embed_dim=8, **overrides,
    )
    with pytest.raises(ValueError, match="open_clip"):
        to_open_clip(build_model(cfg))


def test_maeclip_exports_its_clip_towers() -> None:
    cfg = ModelConfig(
        objective="maeclip", image_mask_ratio=0.75, image_size=8, patch_size=4, vision_width=64,
        vision_layers=1, vision_heads=1, text_width=64, text_layers=1, text_heads=1, context_length=6,
        vocab_size=30, embed_dim=8, decoder_width=32, decoder_layers=1, decoder_heads=2,
    )
    exported = to_open_clip(build_model(cfg))
    assert not any("decoder" in key for key in exported)
    clip = from_open_clip(exported)
    assert_same_state(to_open_clip(clip), exported)

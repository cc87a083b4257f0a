"""The model family's objectives (mae, m3ae, maeclip), their decoders, masking strategies and presets: known
answers, properties (hypothesis), gradients reaching every parameter, and the tiny family learning."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from small_models import small_config as shared_small_config

from trainer.config import ConfigError, ModelConfig, load_config
from trainer.data.loader import build_train_loader
from trainer.data.shapes import write_shapes
from trainer.models import build_model, parameter_groups
from trainer.models.losses import masked_patch_loss, masked_token_loss, patchify, pixel_target
from trainer.models.masking import (
    masked_positions,
    num_kept,
    random_keep_indices,
    similarity_keep_indices,
    text_keep_indices,
    unshuffle,
    valid_tokens,
)
from trainer.models.objectives import pixel_loss
from trainer.models.text import TextTransformer
from trainer.models.vit import sincos_1d, sincos_2d
from trainer.optim import build_optimizer, lr_at

SOT, EOT = 98, 99  # the two highest ids of the small vocabulary, as in CLIP's


def small_config(**overrides) -> ModelConfig:
    return shared_small_config(**{"decoder_width": 16, "decoder_layers": 1, "decoder_heads": 2, **overrides})


def make_tokens(batch: int, context: int, generator: torch.Generator, min_words: int = 0) -> torch.Tensor:
    """SOT, random words, EOT at a random place, then 0-padding."""
    tokens = torch.zeros(batch, context, dtype=torch.long)
    for row in range(batch):
        eot = int(torch.randint(1 + min_words, context, (1,), generator=generator))
        tokens[row, 0] = SOT
        tokens[row, 1:eot] = torch.randint(1, SOT, (eot - 1,), generator=generator)
        tokens[row, eot] = EOT
    return tokens


def make_batch(cfg: ModelConfig, size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(size, 3, cfg.image_size, cfg.image_size, generator=generator),
        "tokens": make_tokens(size, cfg.context_length, generator, min_words=2),
    }


# ---------------------------------------------------------------------------------------------------------
# Position embeddings.


def test_sincos_known_answer() -> None:
    # width 8: each axis gets 4 channels, [sin(p), sin(p/100), cos(p), cos(p/100)] (ω_i = 10000^(-i/2)).
    def axis(p: float) -> list[float]:
        return [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]

    table = sincos_2d(8, 2)
    assert table.shape == (5, 8)
    assert torch.equal(table[0], torch.zeros(8))  # CLS
    # Patch l = 2 is row 1, column 0: MAE's first half encodes the column, the second the row.
    assert torch.allclose(table[1 + 2], torch.tensor(axis(0) + axis(1)), atol=1e-7)
    assert torch.allclose(table[1 + 1], torch.tensor(axis(1) + axis(0)), atol=1e-7)
    assert torch.allclose(sincos_1d(4, torch.tensor([3.0]))[0], torch.tensor(axis(3.0)), atol=1e-7)


def test_sincos_tower_has_fixed_positions_in_its_state_dict() -> None:
    model = build_model(small_config(pos_embed="sincos"))
    assert "visual.pos_embed" in model.state_dict()
    assert "visual.pos_embed" not in dict(model.named_parameters())
    assert torch.equal(model.visual.pos_embed, sincos_2d(32, 4))


# ---------------------------------------------------------------------------------------------------------
# Masking.


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), patches=st.integers(1, 40), ratio=st.floats(0, 0.95), seed=st.integers(0, 99))
def test_unshuffle_restores_order(batch: int, patches: int, ratio: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, patches, 3, generator=generator)
    fill = torch.randn(3, generator=generator)
    keep, restore = random_keep_indices(batch, patches, ratio, generator=generator)
    kept = torch.gather(x, 1, keep[..., None].expand(-1, -1, 3))
    masked = masked_positions(keep, patches)
    assert torch.equal(masked.sum(dim=1), torch.full((batch,), patches - num_kept(patches, ratio)))
    expected = torch.where(masked[..., None], fill, x)
    assert torch.equal(unshuffle(kept, restore, fill), expected)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 6), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_text_masking_keeps_the_documented_count(batch: int, ratio: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tokens = make_tokens(batch, 12, generator)
    keep, restore, kept_valid = text_keep_indices(tokens, ratio, generator=generator)
    valid = valid_tokens(tokens)
    words = valid.sum(dim=1) - 2  # SOT and EOT are never masked
    expected = 2 + torch.floor(words * (1 - ratio) + 1e-6).long()
    assert torch.equal(kept_valid.sum(dim=1), expected)
    # The real kept slots come first, hold valid positions only, and include SOT and EOT.
    assert torch.equal(kept_valid, torch.arange(keep.shape[1])[None] < expected[:, None])
    kept_positions = [set(keep[b][kept_valid[b]].tolist()) for b in range(batch)]
    for b in range(batch):
        assert {0, int(tokens[b].argmax())} <= kept_positions[b]
        assert all(valid[b, p] for p in kept_positions[b])
    # Masked positions = valid words not kept, plus every pad; unshuffle puts the kept ones back in place.
    masked = masked_positions(keep, 12, kept_valid)
    assert torch.equal(masked.sum(dim=1), 12 - expected)
    ids = tokens[..., None].float()
    gathered = torch.gather(ids, 1, keep[..., None])
    restored = unshuffle(gathered, restore, torch.tensor([-1.0]), kept_valid)
    assert torch.equal(restored, torch.where(masked[..., None], -1.0, ids))


def test_text_masks_differ_per_sample() -> None:
    tokens = make_tokens(1, 40, torch.Generator().manual_seed(0), min_words=30).expand(8, -1)
    keep, _, kept_valid = text_keep_indices(tokens, 0.5, generator=torch.Generator().manual_seed(1))
    kept_sets = {tuple(sorted(row[valid].tolist())) for row, valid in zip(keep, kept_valid, strict=True)}
    assert len(kept_sets) == 8


def _features_with_similarities(similarities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features (B, L, 2) whose cosine to the text feature (B, 2) = (1, 0) is ``similarities``."""
    angles = torch.arccos(similarities)
    patches = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return patches, torch.tensor([[1.0, 0.0]]).expand(similarities.shape[0], -1)


def test_similarity_masking_without_noise_masks_the_most_or_least_similar() -> None:
    similarities = torch.tensor([[0.9, -0.5, 0.1, 0.7, -0.2, 0.3, 0.0, 0.8]])
    patches, text = _features_with_similarities(similarities)
    keep, restore = similarity_keep_indices(patches, text, 0.75, noise=0.0, mask_most=True)
    assert keep.shape == (1, num_kept(8, 0.75)) == (1, 2)
    assert set(keep[0].tolist()) == {1, 4}  # the two least similar survive
    keep, _ = similarity_keep_indices(patches, text, 0.75, noise=0.0, mask_most=False)
    assert set(keep[0].tolist()) == {0, 7}
    assert torch.equal(restore.argsort(dim=1)[:, :2].sort().values, torch.tensor([[1, 4]]))


def test_similarity_masking_noise_samples_by_softmax() -> None:
    # Two patches, one masked: P(mask patch 0) = e^{s0/τ} / (e^{s0/τ} + e^{s1/τ}) (Gumbel-top-k).
    samples, tau = 20000, 0.5
    similarities = torch.tensor([0.6, -0.2]).expand(samples, -1)
    patches, text = _features_with_similarities(similarities)
    generator = torch.Generator().manual_seed(0)
    keep, _ = similarity_keep_indices(patches, text, 0.5, noise=tau, mask_most=True, generator=generator)
    masked_first = (keep[:, 0] == 1).float().mean().item()
    expected = 1 / (1 + math.exp((-0.2 - 0.6) / tau))
    assert masked_first == pytest.approx(expected, abs=0.015)
    keep, _ = similarity_keep_indices(patches, text, 0.5, noise=tau, mask_most=False, generator=generator)
    assert (keep[:, 0] == 1).float().mean().item() == pytest.approx(1 - expected, abs=0.015)


# ---------------------------------------------------------------------------------------------------------
# Losses.


def test_patchify_known_answer() -> None:
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    patches = patchify(images, 2)
    assert patches.shape == (2, 6, 12)
    for b, i, j, r, c, ch in itertools.product(range(2), range(2), range(3), range(2), range(2), range(3)):
        assert patches[b, i * 3 + j, (r * 2 + c) * 3 + ch] == images[b, ch, i * 2 + r, j * 2 + c]


def test_norm_pix_target_matches_the_formula_by_hand() -> None:
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    target = pixel_target(images, 4, norm_pix=True)
    raw = patchify(images, 4)
    for b, patch in itertools.product(range(2), range(4)):
        values = raw[b, patch].tolist()
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)  # unbiased
        expected = torch.tensor([(v - mean) / math.sqrt(var + 1e-6) for v in values])
        assert torch.allclose(target[b, patch], expected, atol=1e-5)
    assert torch.equal(pixel_target(images, 4, norm_pix=False), raw)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), ratio=st.sampled_from([0.25, 0.5, 0.75]), norm_pix=st.booleans())
def test_mae_loss_ignores_visible_patches(seed: int, ratio: float, norm_pix: bool) -> None:
    cfg = small_config(objective="mae", image_mask_ratio=ratio, norm_pix_loss=norm_pix)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    pixels = torch.randn(3, 16, 192, generator=generator, requires_grad=True)
    keep, _ = random_keep_indices(3, 16, ratio, generator=generator)
    loss = pixel_loss(cfg, pixels, images, keep)
    masked = masked_positions(keep, 16)

    def change_patch(sample: int, patch: int) -> torch.Tensor:
        changed = images.clone()
        row, col = divmod(patch, 4)
        changed[sample, :, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8] = torch.randn(
            3, 8, 8, generator=generator
        )
        return changed

    visible = int(keep[0, 0])
    assert torch.equal(pixel_loss(cfg, pixels, change_patch(0, visible), keep), loss)
    # A masked patch moves the loss by exactly its own change of MSE over the number of masked patches.
    hidden = int(masked[0].nonzero()[0, 0])
    changed = change_patch(0, hidden)

    def patch_mse(source: torch.Tensor) -> torch.Tensor:
        return ((pixels[0, hidden] - pixel_target(source, 8, norm_pix)[0, hidden]) ** 2).mean()

    shift = (patch_mse(changed) - patch_mse(images)) / masked.sum()
    assert torch.allclose(pixel_loss(cfg, pixels, changed, keep) - loss, shift, atol=1e-6)
    assert shift != 0
    # Predictions at visible patches get no gradient; known answer: the mean MSE over masked patches.
    loss.backward()
    assert torch.all(pixels.grad[~masked] == 0) and torch.all(pixels.grad[masked].abs().sum(-1) > 0)
    target = pixel_target(images, 8, norm_pix)
    expected = ((pixels - target) ** 2).mean(-1)[masked].mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(masked_patch_loss(pixels, target, masked), expected, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5))
def test_masked_token_loss_is_m3ae_per_sample_mean(seed: int, batch: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 20, (batch, 7), generator=generator)
    where = torch.rand(batch, 7, generator=generator) < 0.4
    logits = torch.randn(batch, 7, 20, generator=generator)
    loss = masked_token_loss(logits[where], tokens, where)
    per_sample = []
    for b in range(batch):
        terms = [-torch.log_softmax(logits[b, t], -1)[tokens[b, t]] for t in range(7) if where[b, t]]
        per_sample.append(sum(terms) / len(terms) if terms else torch.tensor(0.0))
    assert torch.allclose(loss, torch.stack(per_sample).mean(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Encoders see only what they should.


def test_masked_caption_encoding_ignores_the_masked_words() -> None:
    torch.manual_seed(0)
    tower = TextTransformer(100, 12, 32, 2, 4, 4.0, 16, "gap", causal=False).eval()
    tokens = make_tokens(4, 12, torch.Generator().manual_seed(2), min_words=4)
    keep, _, kept_valid = text_keep_indices(tokens, 0.5, generator=torch.Generator().manual_seed(3))
    masked = masked_positions(keep, 12, kept_valid)
    changed = torch.where(masked, torch.randint(1, SOT, tokens.shape), tokens)
    assert not torch.equal(changed, tokens)
    with torch.no_grad():
        first = tower.head(*tower.forward_tokens(tokens, keep, kept_valid))
        assert torch.allclose(first, tower.head(*tower.forward_tokens(changed, keep, kept_valid)), atol=1e-6)
        with pytest.raises(ValueError, match="causal"):
            TextTransformer(100, 12, 32, 1, 4, 4.0, 16, "eot").forward_tokens(tokens, keep, kept_valid)


def test_m3ae_joint_encoder_ignores_masked_pixels_words_and_pads() -> None:
    torch.manual_seed(0)
    model = build_model(small_config(objective="m3ae", image_mask_ratio=0.75, text_mask_ratio=0.5)).eval()
    batch = make_batch(small_config(), 3, seed=4)
    keep, _ = random_keep_indices(3, 16, 0.75, generator=torch.Generator().manual_seed(5))
    text_generator = torch.Generator().manual_seed(6)
    text_keep, _, kept_valid = text_keep_indices(batch["tokens"], 0.5, generator=text_generator)
    grid_mask = masked_positions(keep, 16).view(3, 1, 4, 1, 4, 1)
    hidden_patch = grid_mask.expand(3, 3, 4, 8, 4, 8).reshape(3, 3, 32, 32)
    images = torch.where(hidden_patch, torch.randn(3, 3, 32, 32), batch["image"])
    masked_words = masked_positions(text_keep, 12, kept_valid)
    tokens = torch.where(masked_words, torch.randint(1, SOT, (3, 12)), batch["tokens"])
    with torch.no_grad():
        first = model.encoder(batch["image"], keep, batch["tokens"], text_keep, kept_valid)
        second = model.encoder(images, keep, tokens, text_keep, kept_valid)
    rows = torch.cat([torch.ones(3, 1 + 4, dtype=torch.bool), kept_valid], dim=1)
    assert torch.allclose(first[rows], second[rows], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Every objective × pooling: outputs, and a gradient for every parameter (DDP without find_unused_parameters).

VARIANTS = {
    "mae": dict(objective="mae", image_mask_ratio=0.75),
    "mae-sincos-pix": dict(objective="mae", image_mask_ratio=0.75, pos_embed="sincos", norm_pix_loss=False),
    "m3ae": dict(objective="m3ae", image_mask_ratio=0.75, text_mask_ratio=0.5, pos_embed="sincos"),
    "m3ae-no-text-mask": dict(objective="m3ae", image_mask_ratio=0.75),
    "maeclip": dict(objective="maeclip", image_mask_ratio=0.75),
    "maeclip-text": dict(objective="maeclip", image_mask_ratio=0.75, text_mask_ratio=0.5, text_causal=False),
    "maeclip-unmasked-text": dict(
        objective="maeclip", image_mask_ratio=0.5, text_mask_ratio=0.5, text_causal=False,
        contrastive_input="unmasked",
    ),
    "maeclip-similarity": dict(objective="maeclip", image_mask_ratio=0.75, image_masking="similarity"),
    "maeclip-similarity-least-unmasked": dict(
        objective="maeclip", image_mask_ratio=0.75, image_masking="similarity", similarity_mask="least",
        contrastive_input="unmasked",
    ),
    "flip-bidirectional-map2": dict(objective="flip", image_mask_ratio=0.5, text_causal=False, map_heads=2),
}
EXPECTED_LOSSES = {
    "mae": {"loss_pixel"},
    "m3ae": {"loss_pixel", "loss_token"},
    "maeclip": {"loss_contrastive", "loss_pixel", "logit_scale"},
    "flip": {"loss_contrastive", "logit_scale"},
}
CASES = [
    (name, pool)
    for name, variant in VARIANTS.items()
    for pool in ("cls", "map", "gap", "max")
    if not (pool == "map" and variant["objective"] in ("mae", "m3ae"))
]


@pytest.mark.parametrize(("variant", "image_pool"), CASES)
def test_one_step_reaches_every_parameter(variant: str, image_pool: str) -> None:
    options = VARIANTS[variant]
    text_pool = "map" if image_pool == "map" else "eot"
    cfg = small_config(image_pool=image_pool, text_pool=text_pool, **options)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(make_batch(cfg, 4, seed=1))
    expected = set(EXPECTED_LOSSES[cfg.objective])
    if cfg.objective == "maeclip" and cfg.text_mask_ratio > 0:
        expected.add("loss_token")
    if cfg.objective == "m3ae" and cfg.text_mask_ratio == 0:
        expected.discard("loss_token")
    assert set(losses) == {"loss"} | expected
    parts = {"loss_contrastive": 1.0, "loss_pixel": cfg.image_loss_weight, "loss_token": cfg.text_loss_weight}
    total = sum(weight * losses[name] for name, weight in parts.items() if name in losses)
    assert torch.allclose(losses["loss"], total) and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("objective", ["mae", "m3ae", "maeclip"])
def test_encoders_of_reconstruction_objectives(objective: str) -> None:
    cfg = small_config(objective=objective, image_mask_ratio=0.75, image_pool="gap")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = make_batch(cfg, 3, seed=2)
    with torch.no_grad():
        image = model.encode_image(batch["image"])
        assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert image.shape == (3, cfg.embed_dim if objective == "maeclip" else cfg.vision_width)
        assert torch.allclose(model.encode_image(batch["image"]), image)  # no masking at encode time
        if objective == "maeclip":
            assert model.encode_text(batch["tokens"]).shape == (3, cfg.embed_dim)
        else:
            with pytest.raises(NotImplementedError, match=f"{objective} objective has no joint"):
                model.encode_text(batch["tokens"])


@pytest.mark.parametrize(
    ("options", "lengths"),
    [
        (dict(), [1 + 4]),  # one shared masked pass (16 patches at 0.75 keep 4)
        (dict(contrastive_input="unmasked"), [1 + 16, 1 + 4]),
        (dict(image_masking="similarity"), [1 + 16, 1 + 4]),  # the extra no-grad pass scores the patches
        (dict(image_masking="similarity", contrastive_input="unmasked"), [1 + 16, 1 + 4]),  # reused
    ],
)
def test_maeclip_encoder_passes(options: dict, lengths: list[int]) -> None:
    cfg = small_config(objective="maeclip", image_mask_ratio=0.75, **options)
    model = build_model(cfg).train()
    seen: list[int] = []
    model.visual.blocks[0].register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].shape[1]))
    model(make_batch(cfg, 2, seed=3))
    assert seen == lengths


def test_reconstruction_parameters_skip_weight_decay_by_m3aes_rule() -> None:
    cfg = small_config(objective="m3ae", image_mask_ratio=0.75, text_mask_ratio=0.5)
    model = build_model(cfg)
    _, no_decay = parameter_groups(model, 0.05, "no-embeddings")
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in no_decay["params"]}
    for name in (
        "decoder.image_mask_token",
        "decoder.text_mask_token",
        "decoder.image_type",
        "encoder.text_type",
        "encoder.text_pos_embed",
        "encoder.token_embedding.weight",
        "encoder.visual.cls_token",
    ):
        assert name in kept
    assert "decoder.token_head.weight" not in kept


# ---------------------------------------------------------------------------------------------------------
# Config and presets.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.objective=mae"], "image_mask_ratio: mae reconstructs"),
        (["model.objective=m3ae", "model.image_mask_ratio=0.75", "model.image_pool=map"], "image_pool: m3ae"),
        (["model.text_mask_ratio=0.5"], "only m3ae and maeclip"),
        (["model.objective=maeclip", "model.image_mask_ratio=0.7", "model.text_mask_ratio=0.5"], "causal"),
        (["model.image_masking=similarity", "model.objective=flip"], "only maeclip"),
        (["model.contrastive_input=both"], "masked, unmasked"),
        (["model.pos_embed=rope"], "learned, sincos"),
        (["model.decoder_heads=3"], "decoder_heads"),
        (["model.map_heads=5"], "map_heads"),
    ],
)
def test_config_rejects_bad_model_combinations(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-clip", overrides)


GRID = [
    (obj, pool)
    for obj in ("clip", "flip", "mae", "m3ae", "maeclip")
    for pool in ("cls", "map", "gap", "max")
    if not (pool == "map" and obj in ("mae", "m3ae"))
]


def test_vit_b16_grid_presets() -> None:
    run_urls = set()
    for objective, pool in GRID:
        config = load_config(f"vit-b16-{objective}-{pool}")
        m = config.model
        assert (m.objective, m.image_pool) == (objective, pool)
        assert (m.image_size, m.patch_size, m.vision_width, m.vision_layers) == (224, 16, 768, 12)
        assert (m.text_width, m.text_layers, m.context_length, m.embed_dim) == (512, 12, 77, 512)
        assert m.image_mask_ratio == {"clip": 0.0, "flip": 0.5}.get(objective, 0.75)
        expected_optim = (0.05, 0.95) if objective in ("mae", "m3ae") else (0.5, 0.98)
        assert (config.optim.weight_decay, config.optim.beta2) == expected_optim
        run_urls.add(config.train.run_url)
        with torch.device("meta"):
            build_model(m)
    assert len(run_urls) == len(GRID)
    with torch.device("meta"):  # MAE ViT-B/16 with its 8 x 512 decoder is ~112M parameters (MAE paper)
        mae = build_model(load_config("vit-b16-mae").model)
    assert sum(p.numel() for p in mae.parameters()) == pytest.approx(111.7e6, rel=0.01)


# ---------------------------------------------------------------------------------------------------------
# The tiny family learns on the shapes corpus.

# mae and m3ae train the same whatever the pool (no loss reads the pooled feature; the test below checks it),
# so one run each stands for their three pools.
TINY = [(f"tiny-{obj}", pool) for obj, pool in GRID if obj not in ("mae", "m3ae") or pool == "cls"]


@pytest.mark.parametrize("objective", ["mae", "m3ae"])
def test_reconstruction_training_does_not_depend_on_the_pool(objective: str) -> None:
    losses = set()
    for pool in ("cls", "gap", "max"):
        text_mask_ratio = 0.5 if objective == "m3ae" else 0.0
        cfg = small_config(
            objective=objective, image_mask_ratio=0.75, text_mask_ratio=text_mask_ratio, image_pool=pool
        )
        torch.manual_seed(0)
        model = build_model(cfg)
        torch.manual_seed(1)
        losses.add(model(make_batch(cfg, 4, seed=2))["loss"].item())
    assert len(losses) == 1


@pytest.fixture(scope="module")
def shapes_batches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, torch.Tensor]]]:
    """One epoch of a 32-sample shapes corpus through the real training loader: four batches of 8.

    The training runs use one intra-op thread: with two, OpenMP's spin-waiting makes a run ~10x slower
    whenever another process shares the 2 cores.
    """
    root = tmp_path_factory.mktemp("shapes")
    url = f"file://{Path(root) / 'shapes'}"
    write_shapes(url, n_train=32, n_eval=8, seed=0)
    config = load_config("tiny-clip", [f"data.url={url}", "data.batch_size=8", "data.num_workers=0"])
    loader = build_train_loader(config)
    batches = [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]
    assert len(batches) == 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield batches
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("preset", "image_pool"), TINY)
def test_tiny_family_learns_in_50_steps(
    preset: str, image_pool: str, shapes_batches: list[dict[str, torch.Tensor]]
) -> None:
    config = load_config(preset, [f"model.image_pool={image_pool}"])
    torch.manual_seed(0)
    model = build_model(config.model).train()
    optim = config.optim
    # The same update as train.py's (fused: ~8x cheaper on CPU for the 49,408-token tables).
    optimizer = build_optimizer(model, optim, fused=True)
    history: dict[str, list[float]] = {}
    for step in range(50):  # the train loop's recipe: warmup + cosine, grad clipping
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, optim, 50)
        losses = model(shapes_batches[step % len(shapes_batches)])
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        for name, value in losses.items():
            history.setdefault(name, []).append(value.item())
    for name, values in history.items():  # the total falls by a fifth, and so does every part of it
        if name.startswith("loss"):
            first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
            assert last < 0.8 * first, (name, values)

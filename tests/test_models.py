"""Model v0: towers, poolers, masking, the CLIP loss (against open_clip, and gathered over 2 gloo ranks) and
the clip/flip objective."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.loss import ClipLoss
from small_models import make_tokens, small_config

from trainer.config import ModelConfig, load_config
from trainer.models import OBJECTIVES, build_model, parameter_groups
from trainer.models.losses import clip_loss
from trainer.models.masking import num_kept, random_keep_indices
from trainer.models.objectives import ClipObjective
from trainer.models.pooling import make_pooler
from trainer.models.text import TextTransformer
from trainer.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
def random_features(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return image, text


# ---------------------------------------------------------------------------------------------------------
# The contrastive loss.


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 24), dim=st.integers(2, 32), scale=st.floats(1.0, 100.0), seed=st.integers(0, 2**16)
)
def test_clip_loss_matches_open_clip(batch: int, dim: int, scale: float, seed: int) -> None:
    # float64, so that the 1e-6 tolerance tests the formula and not fp32 rounding (the loss reaches ~50).
    image, text = (t.double() for t in random_features(batch, dim, seed))
    ours_in = [t.clone().requires_grad_() for t in (image, text, torch.tensor(scale, dtype=torch.float64))]
    ref_in = [t.clone().requires_grad_() for t in (image, text, torch.tensor(scale, dtype=torch.float64))]
    ours = clip_loss(*ours_in)
    ref = ClipLoss()(*ref_in)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    for mine, theirs in zip(ours_in, ref_in, strict=True):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6, rtol=0)


def test_contrastive_logits_and_loss_stay_fp32_under_bf16_autocast() -> None:
    """Autocast runs a matmul in bf16 whatever its inputs; the loss must not: at scale 100 over 256 pairs, bf16
    logits move the loss by ~1e-2, fp32 ones by float noise."""
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(256, 64, generator=generator), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(256, 64, generator=generator), dim=-1)
    scale = torch.tensor(100.0)
    expected = clip_loss(images, texts, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = clip_loss(images.bfloat16(), texts.bfloat16(), scale)
        logits = images @ texts.T
    assert logits.dtype == torch.bfloat16  # what autocast does to a plain matmul here
    assert got.dtype == torch.float32
    reference = clip_loss(images.bfloat16().float(), texts.bfloat16().float(), scale)  # same inputs, fp32 maths
    assert got.item() == pytest.approx(reference.item(), abs=1e-5)
    assert abs(got.item() - expected.item()) < 1e-2


def test_clip_loss_known_answer() -> None:
    # Two orthonormal pairs at scale s: each row's CE is log(1 + e^{-s}).
    eye = torch.eye(2)
    assert clip_loss(eye, eye, torch.tensor(5.0)).item() == pytest.approx(
        math.log1p(math.exp(-5.0)), abs=1e-6
    )


GATHER_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from trainer.models.losses import clip_loss
    rank, world, store, data, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    full = torch.load(data)
    rows = slice(rank * full["image"].shape[0] // world, (rank + 1) * full["image"].shape[0] // world)
    image = full["image"][rows].clone().requires_grad_()
    text = full["text"][rows].clone().requires_grad_()
    scale = full["scale"].clone().requires_grad_()
    loss = clip_loss(image, text, scale)
    loss.backward()
    torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad}, out)
    dist.destroy_process_group()
""")


def test_clip_loss_gathers_over_two_gloo_ranks(tmp_path: Path) -> None:
    image, text = random_features(12, 8, seed=7)
    scale = torch.tensor(20.0)
    torch.save({"image": image, "text": text, "scale": scale}, tmp_path / "data.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                GATHER_WORKER,
                str(rank),
                "2",
                str(tmp_path / "store"),
                str(tmp_path / "data.pt"),
                str(tmp_path / f"rank{rank}.pt"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]

    ref_in = [t.clone().requires_grad_() for t in (image, text, scale)]
    ref = clip_loss(*ref_in)
    ref.backward()
    for result in results:  # every rank computes the full-batch loss and the full logit-scale gradient
        assert torch.allclose(result["loss"], ref.detach(), atol=1e-6, rtol=0)
        assert torch.allclose(result["scale"], ref_in[2].grad, atol=1e-5, rtol=0)
    # Each rank's local features get world_size × their gradient of the full loss (the autograd gather sums
    # what both ranks' losses send them), so DDP's average over 2 ranks yields the 1-process gradient.
    assert torch.allclose(torch.cat([r["image"] for r in results]) / 2, ref_in[0].grad, atol=1e-5, rtol=0)
    assert torch.allclose(torch.cat([r["text"] for r in results]) / 2, ref_in[1].grad, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# Poolers and padding.


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["gap", "max", "map"]),
    batch=st.integers(1, 4),
    length=st.integers(1, 10),
    heads=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_poolers_ignore_masked_tokens(kind: str, batch: int, length: int, heads: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    width = 4 * heads
    pooler = make_pooler(kind, width, heads)
    tokens = torch.randn(batch, length, width, generator=generator)
    valid = torch.rand(batch, length, generator=generator) < 0.5
    valid[torch.arange(batch), torch.randint(0, length, (batch,), generator=generator)] = True
    changed = torch.where(valid[..., None], tokens, 100 * torch.randn(tokens.shape, generator=generator))
    out = pooler(tokens, valid)
    assert out.shape == (batch, width)
    assert torch.allclose(out, pooler(changed, valid), atol=1e-6, rtol=0)
    if kind in ("gap", "max"):  # known answer, row by row
        reduce = torch.mean if kind == "gap" else (lambda x, dim: x.amax(dim=dim))
        expected = torch.stack([reduce(tokens[b][valid[b]], dim=0) for b in range(batch)])
        assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    all_valid = torch.ones(batch, length, dtype=torch.bool)
    assert torch.allclose(pooler(tokens, all_valid), pooler(tokens, None), atol=1e-6, rtol=0)


@pytest.mark.parametrize("text_causal", [True, False])
@pytest.mark.parametrize("text_pool", ["eot", "gap", "max", "map"])
def test_text_padding_does_not_change_encode_text(text_pool: str, text_causal: bool) -> None:
    # Causal: valid positions never see the later padding. Bidirectional: the key-padding mask removes it.
    torch.manual_seed(0)
    model = build_model(small_config(text_pool=text_pool, text_causal=text_causal)).eval()
    generator = torch.Generator().manual_seed(1)
    tokens = make_tokens(6, 12, 100, generator)
    after_eot = torch.arange(12)[None, :] > tokens.argmax(dim=-1)[:, None]
    junk = torch.where(after_eot, torch.randint(1, 98, tokens.shape, generator=generator), tokens)
    assert not torch.equal(junk, tokens)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), model.encode_text(junk), atol=1e-6, rtol=0)
        # Tokens before the EOT do matter.
        changed = tokens.clone()
        changed[:, 1] = torch.where(tokens[:, 1] == 99, 99, (tokens[:, 1] % 97) + 1)
        assert not torch.allclose(model.encode_text(tokens), model.encode_text(changed), atol=1e-4)


def test_text_tower_rejects_overlong_input() -> None:
    tower = TextTransformer(100, 8, 16, 1, 2, 4.0, 8, "eot")
    with pytest.raises(ValueError, match="context length 8"):
        tower(torch.ones(1, 9, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# Masking.


@pytest.mark.parametrize(
    ("patches", "ratio", "kept"),
    [(196, 0.75, 49), (196, 0.5, 98), (10, 0.9, 1), (4, 0.95, 1), (7, 0.0, 7), (64, 0.3, 44)],
)
def test_num_kept_rule(patches: int, ratio: float, kept: int) -> None:
    assert num_kept(patches, ratio) == kept


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    patches=st.integers(1, 64),
    ratio=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**16),
)
def test_random_keep_indices_keep_count_and_restore(
    batch: int, patches: int, ratio: float, seed: int
) -> None:
    keep, restore = random_keep_indices(batch, patches, ratio, generator=torch.Generator().manual_seed(seed))
    assert keep.shape == (batch, num_kept(patches, ratio))
    assert restore.shape == (batch, patches)
    shuffle = restore.argsort(dim=1)  # the full shuffled order: kept first, then dropped
    assert torch.equal(shuffle[:, : keep.shape[1]], keep)
    assert torch.equal(torch.sort(shuffle, dim=1).values, torch.arange(patches).expand(batch, -1))
    assert torch.equal(torch.gather(shuffle, 1, restore), torch.arange(patches).expand(batch, -1))


def test_random_keep_indices_differ_per_sample() -> None:
    keep, _ = random_keep_indices(8, 196, 0.75, generator=torch.Generator().manual_seed(0))
    kept_sets = {tuple(sorted(row.tolist())) for row in keep}
    assert len(kept_sets) == 8


def _small_vit(pool: str) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(32, 8, 32, 2, 4, 4.0, 16, pool).eval()


def test_vit_encodes_only_the_kept_patches() -> None:
    vit = _small_vit("cls")
    images = torch.randn(2, 3, 32, 32)
    keep, _ = random_keep_indices(2, 16, 0.5, generator=torch.Generator().manual_seed(3))
    grid_mask = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, keep, True).view(2, 1, 4, 1, 4, 1)
    pixel_mask = grid_mask.expand(2, 3, 4, 8, 4, 8).reshape(2, 3, 32, 32)  # True on kept patches' pixels
    with torch.no_grad():
        out = vit(images, keep)
        assert vit.forward_tokens(images, keep).shape == (2, 1 + 8, 32)
        dropped_changed = torch.where(pixel_mask, images, torch.randn_like(images))
        assert torch.allclose(out, vit(dropped_changed, keep), atol=1e-6, rtol=0)
        kept_changed = torch.where(pixel_mask, torch.randn_like(images), images)
        assert not torch.allclose(out, vit(kept_changed, keep), atol=1e-4)


def test_vit_position_embeddings_travel_with_their_patches() -> None:
    # Keeping every patch in shuffled order must equal the unmasked forward for a permutation-invariant pool:
    # the position embedding is added before the gather.
    vit = _small_vit("gap")
    images = torch.randn(3, 3, 32, 32)
    keep, _ = random_keep_indices(3, 16, 0.0, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(keep, torch.arange(16).expand(3, -1))
    with torch.no_grad():
        assert torch.allclose(vit(images, keep), vit(images), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# The objective.


def _batch(cfg: ModelConfig, size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(size, 3, cfg.image_size, cfg.image_size, generator=generator),
        "tokens": make_tokens(size, cfg.context_length, cfg.vocab_size, generator),
    }


POOLS = [
    ("cls", "eot", 0.0),
    ("gap", "gap", 0.0),
    ("map", "map", 0.0),
    ("max", "max", 0.0),
    ("map", "eot", 0.5),
]


@pytest.mark.parametrize(("image_pool", "text_pool", "mask_ratio"), POOLS)
def test_one_step_reaches_every_parameter(image_pool: str, text_pool: str, mask_ratio: float) -> None:
    cfg = small_config(
        image_pool=image_pool,
        text_pool=text_pool,
        image_mask_ratio=mask_ratio,
        objective="flip" if mask_ratio else "clip",
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _batch(cfg, 4, seed=1)
    losses = model(batch)
    assert set(losses) == {"loss", "loss_contrastive", "logit_scale"}
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    with torch.no_grad():
        image, text = model.encode_image(batch["image"]), model.encode_text(batch["tokens"])
    assert image.shape == text.shape == (4, cfg.embed_dim)
    assert torch.allclose(image.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_image_mask_applies_in_training_only() -> None:
    cfg = small_config(objective="flip", image_mask_ratio=0.5)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = _batch(cfg, 4, seed=2)
    seen: list[int] = []
    handle = model.visual.blocks[0].register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].shape[1]))
    with torch.no_grad():
        model.train()(batch)
        model.eval()(batch)
        model.encode_image(batch["image"])
    handle.remove()
    assert seen == [1 + 8, 1 + 16, 1 + 16]  # 16 patches: half kept in training, all at eval


def test_logit_scale_init_and_cap() -> None:
    cfg = small_config()
    model = build_model(cfg)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    batch = _batch(cfg, 4, seed=3)
    model(batch)["loss"].backward()
    assert model.logit_scale.grad.item() != 0
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    model.zero_grad()
    losses = model(batch)
    losses["loss"].backward()
    assert losses["logit_scale"].item() == pytest.approx(100.0)
    assert model.logit_scale.grad.item() == 0


@pytest.mark.parametrize("rule", ["ndim", "no-embeddings"])
def test_parameter_groups_split(rule: str) -> None:
    model = build_model(small_config(image_pool="map", text_pool="map"))
    decay, no_decay = parameter_groups(model, 0.2, rule)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    # Never decayed, by either rule: what has under two dims.
    for name in ("logit_scale", "visual.cls_token", "visual.ln_pre.weight", "visual.blocks.0.attn.in_proj.bias"):
        assert name in kept
    assert "visual.blocks.0.attn.in_proj.weight" in decayed
    embeddings = {"visual.pos_embed", "text.pos_embed", "text.token_embedding.weight", "visual.pooler.probe",
                  "text.pooler.probe"}
    # SLIP's and open_clip's rule decays the embeddings (2+ dims); FLIP's and M3AE's keeps them.
    assert embeddings <= (decayed if rule == "ndim" else kept)


def test_each_recipe_has_its_cited_decay_rule() -> None:
    rules = {preset: load_config(preset).optim.decay_rule for preset in
             ("vit-b16-clip", "vit-b16-flip", "vit-b16-maeclip", "vit-b16-mae", "vit-b16-m3ae", "tiny-clip",
              "tiny-maeclip")}
    assert rules == {"vit-b16-clip": "ndim", "vit-b16-flip": "ndim", "vit-b16-maeclip": "ndim", "vit-b16-mae": "ndim",
                     "vit-b16-m3ae": "no-embeddings", "tiny-clip": "no-embeddings", "tiny-maeclip": "no-embeddings"}
    with pytest.raises(ValueError, match="decay rule 'all'"):
        parameter_groups(build_model(small_config()), 0.1, "all")


def test_build_model_builds_every_objective() -> None:
    assert isinstance(build_model(small_config()), ClipObjective)
    assert isinstance(build_model(small_config(objective="flip", image_mask_ratio=0.5)), ClipObjective)
    for objective in ("mae", "m3ae", "maeclip"):
        model = build_model(small_config(objective=objective, image_mask_ratio=0.75, decoder_width=16))
        assert type(model) is OBJECTIVES[objective] and type(model) is not ClipObjective


# ---------------------------------------------------------------------------------------------------------
# Parity with open_clip's towers: its weights, renamed, give our towers the same embeddings.


def _open_clip_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = {
        "visual.conv1.weight": "visual.patch_embed.weight",
        "visual.class_embedding": "visual.cls_token",
        "visual.positional_embedding": "visual.pos_embed",
        "positional_embedding": "text.pos_embed",
        "token_embedding.weight": "text.token_embedding.weight",
        "ln_final.weight": "text.ln_final.weight",
        "ln_final.bias": "text.ln_final.bias",
    }
    transposed = {"visual.proj": "visual.proj.weight", "text_projection": "text.proj.weight"}
    ours = {}
    for key, value in state.items():
        if key in transposed:
            ours[transposed[key]] = value.T
            continue
        key = renames.get(key, key)
        key = key.replace("visual.transformer.resblocks.", "visual.blocks.")
        key = key.replace("transformer.resblocks.", "text.blocks.") if key.startswith("transformer.") else key
        ours[
            key.replace("attn.in_proj_weight", "attn.in_proj.weight").replace(
                "attn.in_proj_bias", "attn.in_proj.bias"
            )
        ] = value
    return ours


def test_towers_match_open_clip_with_mapped_weights() -> None:
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=2, width=32, head_width=8, patch_size=8, image_size=32
        ),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=12, vocab_size=100, width=32, heads=4, layers=2),
    ).eval()
    with torch.no_grad():  # open_clip leaves LN/bias at identity/zero; perturb them so the mapping is tested
        for name, param in reference.named_parameters():
            if "ln" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    ours = build_model(small_config()).eval()
    ours.load_state_dict(_open_clip_to_ours(reference.state_dict()), strict=True)
    cfg = small_config()
    batch = _batch(cfg, 5, seed=4)
    with torch.no_grad():
        assert torch.allclose(
            ours.encode_image(batch["image"]),
            reference.encode_image(batch["image"], normalize=True),
            atol=1e-5,
            rtol=0,
        )
        assert torch.allclose(
            ours.encode_text(batch["tokens"]),
            reference.encode_text(batch["tokens"], normalize=True),
            atol=1e-5,
            rtol=0,
        )


# ---------------------------------------------------------------------------------------------------------
# Learning.


def test_tiny_clip_overfits_a_fixed_batch() -> None:
    cfg = load_config("tiny-clip").model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _batch(cfg, 16, seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(batch)["loss"]
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[0] > 2.0  # about log(16) = 2.77 for random embeddings
    assert losses[-1] < 0.25 * losses[0], losses

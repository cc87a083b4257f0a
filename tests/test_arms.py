"""The study's arms (trainer/arms.py): each matched arm is clip plus exactly the factor its preset declares,
maeclip's contrastive branch sees what clip sees, every tiny arm trains, and each objective has a gate policy."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from evaluators import gate, linear_probe, policies, suite, zeroshot
from trainer import checkpoint, train
from trainer.arms import ARMS, BASELINE, MATCHED, SCALES, arm_preset, declared_keys
from trainer.config import IMAGE_POOLS, OBJECTIVES, PRESET_DIR, ConfigError, load_config
from trainer.data.shapes import write_shapes
from trainer.data.tokenizer import tokenize
from trainer.models import build_model

IGNORED = {"name", "train.run_url"}
# The towers and everything outside the model: a matched arm keeps all of them clip's.
ARCHITECTURE = {
    f"model.{key}"
    for key in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "pos_embed",
                "image_pool", "text_width", "text_layers", "text_heads", "context_length", "vocab_size",
                "text_pool", "text_causal", "mlp_ratio", "embed_dim", "map_heads", "logit_scale_init",
                "logit_scale_max")
}
# What a matched arm may set: the objective, the mask and the reconstruction branch (docs/models.md §6).
FACTOR_KEYS = {
    f"model.{key}"
    for key in ("objective", "image_mask_ratio", "contrastive_input", "text_mask_ratio", "norm_pix_loss",
                "image_loss_weight", "text_loss_weight", "decoder_width", "decoder_layers", "decoder_heads")
}
# Keys ClipObjective never reads: an arm may restate their defaults to pin its recipe; any other declared key
# must actually differ from clip.
CLIP_INERT = FACTOR_KEYS - {"model.objective", "model.image_mask_ratio"}
# The one architecture change a matched arm may make: maeclip-text's bidirectional tower (docs/models.md §12).
ARCH_ALLOWED = {"maeclip-text": {"model.text_causal"}}


def _flat(preset: str, pool: str) -> dict:
    flat = load_config(preset, [f"model.image_pool={pool}"]).flat()
    return {k: v for k, v in flat.items() if k not in IGNORED}


# ---------------------------------------------------------------------------------------------------------
# The presets are the declaration.


@pytest.mark.parametrize("pool", IMAGE_POOLS)
@pytest.mark.parametrize("arm", MATCHED)
@pytest.mark.parametrize("scale", SCALES)
def test_matched_arm_differs_from_clip_in_its_declared_keys_only(scale: str, arm: str, pool: str) -> None:
    base, config = _flat(arm_preset(scale, BASELINE), pool), _flat(arm_preset(scale, arm), pool)
    assert base.keys() == config.keys()
    differ = {k for k in base if base[k] != config[k]}
    declared = declared_keys(scale, arm)
    assert differ <= declared, f"{arm} changes undeclared keys {sorted(differ - declared)}"
    assert declared - differ <= CLIP_INERT, f"{arm} declares keys it leaves at clip's {sorted(declared - differ)}"
    assert "model.objective" in differ
    assert not {k for k in declared if k.startswith(("optim.", "data.", "train.", "tracking."))}
    assert not declared & (ARCHITECTURE - ARCH_ALLOWED.get(arm, set())), f"{arm} changes a tower"
    assert declared <= FACTOR_KEYS | ARCH_ALLOWED.get(arm, set())


@pytest.mark.parametrize("scale", SCALES)
def test_each_arm_holds_its_factor(scale: str) -> None:
    m = {arm: load_config(arm_preset(scale, arm)).model for arm in ARMS}
    assert (m["maeclip"].objective, m["maeclip"].contrastive_input) == ("maeclip", "unmasked")
    assert (m["maeclip"].text_causal, m["maeclip"].text_mask_ratio, m["maeclip"].image_mask_ratio) == (True, 0, 0.75)
    assert (m["maeclip-text"].contrastive_input, m["maeclip-text"].text_causal) == ("unmasked", False)
    assert m["maeclip-text"].text_mask_ratio > 0
    assert (m["flip-matched"].objective, m["flip-matched"].image_mask_ratio) == ("flip", m["maeclip"].image_mask_ratio)
    shared = m["maeclip-shared"]
    assert (shared.contrastive_input, shared.text_causal, shared.text_mask_ratio) == ("masked", True, 0)
    assert shared.image_mask_ratio == m["maeclip"].image_mask_ratio
    assert (m["mae"].objective, m["m3ae"].objective, m[BASELINE].objective) == ("mae", "m3ae", "clip")
    for arm, model in m.items():  # ViT-B/16 only needs to build: no memory on the meta device
        with torch.device("meta"):
            build_model(model)
        text = (PRESET_DIR / f"{arm_preset(scale, arm)}.yaml").read_text()
        assert text.startswith("# "), f"{arm}: the factor and its source go in a comment at the top"
        if arm in MATCHED:
            assert yaml.safe_load(text)["base"] == arm_preset(scale, BASELINE)


def test_arm_names_and_errors() -> None:
    assert set(MATCHED) < set(ARMS) and BASELINE in ARMS and BASELINE not in MATCHED
    assert {"mae", "m3ae"} <= set(ARMS) - set(MATCHED)
    assert all(factor.endswith(".") and len(factor) < 200 for factor in ARMS.values())
    assert arm_preset("vit-b16", "flip-matched") == "vit-b16-flip-matched"
    assert declared_keys("tiny", "flip-matched") == {"model.objective", "model.image_mask_ratio"}
    with pytest.raises(ConfigError, match="scale"):
        arm_preset("vit-l14", "maeclip")
    with pytest.raises(ConfigError, match="arm"):
        declared_keys("tiny", "maeclip-typo")


# ---------------------------------------------------------------------------------------------------------
# maeclip's contrastive branch sees exactly what clip sees.

DECODER_PREFIXES = ("decoder.", "image_decoder_embed.", "text_decoder_embed.")


@pytest.mark.parametrize("pool", IMAGE_POOLS)
def test_matched_maeclip_contrastive_branch_sees_what_clip_sees(pool: str) -> None:
    """The contrastive loss's inputs (the forward's ``split`` output, what trainer.step contrasts) of each
    MAE-CLIP arm against clip's, on clip's weights."""
    overrides = [f"model.image_pool={pool}"]
    torch.manual_seed(0)
    clip = build_model(load_config("tiny-clip", overrides).model).train()
    size = clip.visual.num_patches
    batch = {"image": torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
             "tokens": tokenize([f"a {c} circle above a blue star" for c in ("red", "green", "purple", "orange")],
                                32)}
    losses, seen = {"clip": clip(batch)}, {}
    split = clip(batch, split=True)
    seen["clip"] = (split["image_features"], split["text_features"])
    for arm in ("maeclip", "maeclip-text", "maeclip-shared"):
        model = build_model(load_config(f"tiny-{arm}", overrides).model).train()
        missing, unexpected = model.load_state_dict(clip.state_dict(), strict=False)
        assert not unexpected and missing and all(k.startswith(DECODER_PREFIXES) for k in missing), arm
        assert model.visual.num_patches == size
        losses[arm] = model(batch)
        split = model(batch, split=True)
        seen[arm] = (split["image_features"], split["text_features"])
    clip_image, clip_text = seen["clip"]
    torch.testing.assert_close(seen["maeclip"][0], clip_image)
    torch.testing.assert_close(seen["maeclip"][1], clip_text)
    torch.testing.assert_close(losses["maeclip"]["loss_contrastive"], losses["clip"]["loss_contrastive"])
    # maeclip-text: the same full image; its text tower is bidirectional, so its caption embedding differs.
    torch.testing.assert_close(seen["maeclip-text"][0], clip_image)
    # maeclip-shared: the whole caption through clip's causal tower, but only a quarter of the patches.
    torch.testing.assert_close(seen["maeclip-shared"][1], clip_text)
    assert not torch.allclose(seen["maeclip-shared"][0], clip_image, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# Every arm trains at tiny scale.

LOSS_PARTS = {
    "clip": {"loss_contrastive"},
    "flip-matched": {"loss_contrastive"},
    "maeclip": {"loss_contrastive", "loss_pixel"},
    "maeclip-shared": {"loss_contrastive", "loss_pixel"},
    "maeclip-text": {"loss_contrastive", "loss_pixel", "loss_token"},
    "mae": {"loss_pixel"},
    "m3ae": {"loss_pixel", "loss_token"},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A 64-sample shapes corpus and a directory for runs. One intra-op thread: with two, OpenMP's spin-waiting
    slows a run ~10x whenever another process shares the cores (as in test_objectives.py)."""
    root = tmp_path_factory.mktemp("arms")
    url = f"file://{root / 'shapes'}"
    write_shapes(url, n_train=64, n_eval=16, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield url, root
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arm", ARMS)
def test_every_tiny_arm_trains_two_steps(corpus: tuple[str, Path], arm: str, capsys) -> None:
    url, root = corpus
    run_url, tracking = f"file://{root / arm}", f"sqlite:///{root / 'mlflow.db'}"
    config = load_config(arm_preset("tiny", arm), [
        f"data.url={url}", f"train.run_url={run_url}", f"tracking.uri={tracking}", "train.steps=2",
        "data.num_workers=0", "data.batch_size=8", "train.checkpoint_every=1000"])
    train.train(config)
    out = capsys.readouterr().out
    assert "[train] done at step 2" in out
    loss = float(re.search(r"step 2/2 loss (\S+)", out).group(1))
    assert loss == loss and 0 < loss < 100
    [(step, url_2)] = checkpoint.committed_checkpoints(run_url)
    assert step == 2
    metrics = MlflowClient(tracking).get_run(checkpoint.read_meta(url_2)["mlflow_run_id"]).data.metrics
    parts = {name.removeprefix("train/") for name in metrics if name.startswith("train/loss_")}
    assert parts == LOSS_PARTS[arm]


# ---------------------------------------------------------------------------------------------------------
# The gate policy per objective.


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_has_a_policy_its_suite_computes(objective: str) -> None:
    policy = gate.load_policy(policies.policy_for(objective))
    assert policy.thresholds and policy.champion is not None
    kinds = set(suite.SUITES[policies.suite_for(objective)])
    zeroshot_tasks = {t.name for t in zeroshot.load_tasks()}
    probe_tasks = {t.name for t in linear_probe.load_probe_tasks()}
    for metric in [t.metric for t in policy.thresholds] + [policy.champion.metric]:
        kind, task, name = metric.removeprefix("eval/").split("/")
        assert kind in kinds and name == "top1"
        assert task in (zeroshot_tasks if kind == "zeroshot" else probe_tasks)
        # mae and m3ae have no text embedding: zero-shot never runs for them (docs/models.md §11).
        assert kind == ("linear" if objective in ("mae", "m3ae") else "zeroshot")


def test_policies_keep_the_zero_shot_gate_and_refuse_nonsense() -> None:
    zero_shot = {"thresholds": [{"metric": "eval/zeroshot/shapes-color/top1", "min": 0.3}],
                 "champion": {"metric": "eval/zeroshot/shapes-color/top1", "tolerance": 0.02}}
    for objective in ("clip", "flip", "maeclip"):
        assert policies.policy_for(objective) == zero_shot
        assert policies.suite_for(objective) == "quick"
    assert policies.suite_for("mae") == policies.suite_for("m3ae") == "default"
    policies.policy_for("mae")["thresholds"].clear()  # a fresh copy each time
    assert policies.policy_for("mae")["thresholds"]
    with pytest.raises(gate.PolicyError, match="checks nothing"):
        gate.load_policy({"thresholds": []})
    with pytest.raises(ValueError, match="unknown objective"):
        policies.policy_for("simclr")
    with pytest.raises(ValueError, match="unknown objective"):
        policies.suite_for("simclr")

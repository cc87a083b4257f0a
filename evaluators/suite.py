"""Named evaluation suites run on one checkpoint: ``maeclip eval --checkpoint URL --suite NAME``.

- ``quick``: zero-shot classification (the shapes tasks).
- ``default``: zero-shot, linear probes on the trained pooling (full and k-shot), image↔text retrieval and
  grounding.
- ``full``: ``default`` plus linear probes on every other pooling, as a diagnostic of what the tokens hold.

The eval split is streamed once, in batches: only per-image features, labels and grounding scores are kept,
so memory grows with ``samples × width``, never with pixels. Linear probes fit on up to
``probe_train_samples`` of the corpus' train split and are scored on the eval split. Objectives without a
text tower (mae, m3ae) get the linear probes only. Results are merged into ``metrics.json`` beside the
checkpoint and logged to the training run at the checkpoint's step; grounding overlays go to MLflow as PNGs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from evaluators import grounding, linear_probe, report, retrieval, zeroshot
from evaluators.features import device_of, has_text_embedding, image_tokens, pooled, probe_pools, vision_tower
from trainer import storage
from trainer.checkpoint import load_for_eval
from trainer.config import Config
from trainer.data.loader import iter_eval_batches
from trainer.data.tokenizer import tokenize
from trainer.models import build_model
from trainer.tracking import default_tracking_uri

SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("zeroshot",),
    "default": ("zeroshot", "linear", "retrieval", "grounding"),
    "full": ("zeroshot", "linear", "linear-diagnostic", "retrieval", "grounding"),
}
NEEDS_TEXT = {"zeroshot", "retrieval", "grounding"}


@dataclass(frozen=True)
class SuiteOptions:
    """How much of each evaluation to run; the defaults keep the default suite to minutes on CPU."""

    batch_size: int = 64
    probe_train_samples: int = 2048
    k_shots: tuple[int, ...] = (1, 5, 10)
    grounding_samples: int = 256
    overlay_rows: int = 8
    progress_every: int = 10


@dataclass
class _Collected:
    """What one streamed pass keeps: per-image vectors and labels, grounding scores, overlay examples."""

    embeddings: list[torch.Tensor] = field(default_factory=list)
    captions: list[torch.Tensor] = field(default_factory=list)
    pooled: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    labels: dict[str, list[Any]] = field(default_factory=dict)
    metas: list[dict[str, Any]] = field(default_factory=list)
    grounding: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    overlay: dict[str, Any] = field(default_factory=dict)
    grounded: int = 0


def _progress(label: str, number: int, seen: int, every: int) -> None:
    if number % every == 0:
        print(f"[eval] {label}: {number} batches, {seen} images", file=sys.stderr, flush=True)


def _label_keys() -> list[str]:
    return sorted({t.label_key for t in linear_probe.load_probe_tasks()})


@torch.no_grad()
def _stream(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    kinds: set[str],
    config: Config,
    options: SuiteOptions,
    label: str,
    limit: int | None = None,
) -> _Collected:
    """One pass over ``batches`` (at most ``limit`` images), keeping what the ``kinds`` need."""
    device, tower = device_of(model), vision_tower(model)
    pools = probe_pools(tower, "linear-diagnostic" in kinds) if "linear" in kinds else ()
    found = _Collected(pooled={p: [] for p in pools}, labels={k: [] for k in _label_keys()})
    seen = 0
    for number, batch in enumerate(batches, start=1):
        images = batch["image"].to(device)
        if limit is not None:
            images, batch = images[: limit - seen], {k: v[: limit - seen] for k, v in batch.items()}
        if "zeroshot" in kinds or "retrieval" in kinds:
            found.embeddings.append(model.encode_image(images).float().cpu())
            found.metas.extend(batch["meta"])
        if "retrieval" in kinds:
            text = tokenize(batch["caption"], config.model.context_length).to(device)
            found.captions.append(model.encode_text(text).float().cpu())
        if pools:
            tokens = image_tokens(model, images)
            for pool in pools:
                found.pooled[pool].append(pooled(tower, tokens, pool).float().cpu())
            for key in found.labels:
                found.labels[key].extend(m.get("labels", {}).get(key) for m in batch["meta"])
        if "grounding" in kinds and found.grounded < options.grounding_samples:
            _ground(model, batch, images, config, options, found)
        seen += len(images)
        _progress(label, number, seen, options.progress_every)
        if limit is not None and seen >= limit:
            break
    if seen == 0:
        raise ValueError(f"{label}: the split holds no samples")
    return found


def _ground(
    model: nn.Module, batch: dict[str, Any], images: torch.Tensor, config: Config, options: SuiteOptions,
    found: _Collected,
) -> None:
    """Relevance maps of the primary object's prompt, scored against its mask; keep the first rows to draw."""
    rows = [i for i, m in enumerate(batch["meta"]) if "labels" in m and "color" in m["labels"]]
    rows = rows[: options.grounding_samples - found.grounded]
    masks = [grounding.primary_mask(batch["meta"][i], config.model.image_size) for i in rows]
    rows = [i for i, mask in zip(rows, masks, strict=True) if mask is not None]
    if not rows:
        return
    masks_t = torch.stack([m for m in masks if m is not None])
    prompts = [grounding.primary_prompt(batch["meta"][i]) for i in rows]
    text = model.encode_text(tokenize(prompts, config.model.context_length).to(images.device))
    maps = grounding.relevance_maps(model, images[rows], text)
    for name, values in maps.items():
        for score, scorer in (("pointing_game", grounding.pointing_game), ("mask_iou", grounding.mask_iou)):
            found.grounding.setdefault(f"{name}/{score}", []).append(scorer(values, masks_t))
    if not found.overlay:
        keep = slice(0, options.overlay_rows)
        mean = torch.tensor(config.data.image_mean)[:, None, None]
        std = torch.tensor(config.data.image_std)[:, None, None]
        found.overlay = {"images": images[rows][keep].cpu() * std + mean, "masks": masks_t[keep],
                         "maps": {k: v[keep] for k, v in maps.items()}, "captions": prompts[keep]}
    found.grounded += len(rows)


def _zeroshot(model: nn.Module, found: _Collected, config: Config) -> dict[str, float]:
    metrics = {}
    features = torch.cat(found.embeddings)
    for task in zeroshot.load_tasks():
        classifier = zeroshot.zero_shot_classifier(model, task.classnames, task.templates,
                                                   config.model.context_length).cpu()
        labels = torch.tensor(zeroshot._label_indices(task, found.metas))
        for name, value in zeroshot.zero_shot_accuracy(features, classifier, labels).items():
            metrics[f"eval/zeroshot/{task.name}/{name}"] = value
        metrics[f"eval/zeroshot/{task.name}/chance"] = 1.0 / len(task.classnames)
    return metrics


def _retrieval(found: _Collected) -> dict[str, float]:
    images = torch.cat(found.embeddings)
    scores = retrieval.recall_at_k(images, torch.cat(found.captions), torch.arange(len(images)))
    return {f"eval/retrieval/shapes-captions/{name}": value for name, value in scores.items()}


def _linear(test: _Collected, train: _Collected, pool: str, options: SuiteOptions) -> dict[str, float]:
    train_features = {p: torch.cat(v) for p, v in train.pooled.items()}
    test_features = {p: torch.cat(v) for p, v in test.pooled.items()}
    return linear_probe.score_probe_tasks(train_features, train.labels, test_features, test.labels,
                                          linear_probe.load_probe_tasks(), pool, options.k_shots)


def evaluate_model(
    model: nn.Module,
    config: Config,
    suite: str,
    eval_batches: Iterable[dict[str, Any]],
    train_batches: Iterator[dict[str, Any]] | None,
    options: SuiteOptions = SuiteOptions(),
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, overlay example) of ``suite`` on a loaded model; the overlay is empty without grounding."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite '{suite}' (suites: {', '.join(SUITES)})")
    model.eval()
    kinds = set(SUITES[suite])
    if kinds & NEEDS_TEXT and not has_text_embedding(model, config.model.context_length):
        print(f"[eval] {config.model.objective} has no text embedding: skipping {sorted(kinds & NEEDS_TEXT)}",
              file=sys.stderr, flush=True)
        kinds -= NEEDS_TEXT
    found = _stream(model, eval_batches, kinds, config, options, f"{suite} eval")
    metrics: dict[str, float] = {}
    if "zeroshot" in kinds:
        metrics |= _zeroshot(model, found, config)
    if "retrieval" in kinds:
        metrics |= _retrieval(found)
    if "linear" in kinds and train_batches is not None:
        train = _stream(model, train_batches, kinds & {"linear", "linear-diagnostic"}, config, options,
                        f"{suite} probe-train", limit=options.probe_train_samples)
        metrics |= _linear(found, train, vision_tower(model).pool, options)
    for name, values in found.grounding.items():
        metrics[f"eval/grounding/{name}"] = torch.cat(values).mean().item()
    return metrics, found.overlay


def run_suite(
    checkpoint_url: str,
    suite: str = "default",
    *,
    tracking_uri: str | None = None,
    options: SuiteOptions = SuiteOptions(),
) -> dict[str, float]:
    """Evaluate a committed checkpoint; merge into its ``metrics.json``, log metrics and overlays to MLflow.

    Returns the flat ``{metric name: value}`` of this suite, the shape the kfp components read.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite '{suite}' (suites: {', '.join(SUITES)})")
    config, weights, meta = load_for_eval(checkpoint_url)
    model = build_model(config.model)
    model.load_state_dict(weights)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    eval_batches = iter_eval_batches(storage.join(config.data.url, "eval"), config, options.batch_size)
    train_batches = None
    if "linear" in SUITES[suite]:
        train_batches = iter_eval_batches(storage.join(config.data.url, "train"), config, options.batch_size)
    metrics, overlay = evaluate_model(model, config, suite, eval_batches, train_batches, options)
    step = int(meta["step"])
    report.write_metrics(checkpoint_url, meta, metrics, suite)
    run_id = meta.get("mlflow_run_id")
    if run_id:
        uri = tracking_uri or config.tracking.uri or default_tracking_uri()
        report.log_metrics(uri, run_id, metrics, step)
        if overlay:
            grid = grounding.overlay_grid(overlay["images"], overlay["maps"], overlay["masks"],
                                          overlay["captions"])
            report.log_png(uri, run_id, grid, f"grounding/step-{step:09d}", "overlays.png")
    return metrics

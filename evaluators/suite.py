"""Named evaluation suites run on one checkpoint: ``maeclip eval --checkpoint URL --suite NAME``.

- ``quick``: zero-shot classification (the shapes tasks).
- ``default``: zero-shot, linear probes on the trained pooling (full and k-shot), image↔text retrieval,
  grounding, the VQA probe (``evaluators.vqa``) and the linear segmentation probe (``evaluators.segmentation``).
- ``full``: ``default`` plus linear probes on every other pooling, as a diagnostic of what the tokens hold.

The eval split is streamed once, in batches: only per-image features, labels and grounding scores are kept,
so memory grows with ``samples × width``, never with pixels. The VQA and segmentation probes also need every
token and the class masks: those are kept (tokens in float16) for the first ``dense_samples`` images of each
split only, so their memory is bounded whatever the split's size. Probes fit on up to ``probe_train_samples``
of the corpus' train split and are scored on the eval split. Objectives without a text tower (mae, m3ae) get
the linear probes, segmentation, and VQA with a learned bag-of-words question encoder in place of the text
tower (said on stderr). A task whose labels the eval split lacks (a caption-only corpus has none of the shapes
labels) is skipped with a line on stderr; retrieval needs only captions. Results are merged into ``metrics.json``
beside the checkpoint and logged to the training run at the checkpoint's step; grounding, VQA and segmentation
overlays go to MLflow as PNGs.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from evaluators import grounding, linear_probe, report, retrieval, segmentation, vqa, zeroshot
from evaluators.features import (
    device_of,
    has_text_embedding,
    image_tokens,
    kept,
    pooled,
    probe_pools,
    vision_tower,
)
from evaluators.heads import DEFAULT_BUDGET, Budget
from trainer import storage
from trainer.checkpoint import load_for_eval
from trainer.config import Config
from trainer.data.loader import iter_eval_batches
from trainer.data.tokenizer import tokenize
from trainer.models import build_model
from trainer.tracking import default_tracking_uri

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - musl and macOS have no malloc_trim
except (OSError, AttributeError):
    _LIBC = None

SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("zeroshot",),
    "default": ("zeroshot", "linear", "retrieval", "grounding", "vqa", "seg"),
    "full": ("zeroshot", "linear", "linear-diagnostic", "retrieval", "grounding", "vqa", "seg"),
}
NEEDS_TEXT = {"zeroshot", "retrieval", "grounding"}
NEEDS_TRAIN = {"linear", "linear-diagnostic", "vqa", "seg"}
DENSE = {"vqa", "seg"}


@dataclass(frozen=True)
class SuiteOptions:
    """How much of each evaluation to run; the defaults keep the default suite to minutes on CPU."""

    batch_size: int = 64
    probe_train_samples: int = 2048
    k_shots: tuple[int, ...] = (1, 5, 10)
    grounding_samples: int = 256
    overlay_rows: int = 8
    progress_every: int = 10
    dense_samples: int = 512
    vqa_fusion: str = "cross-attention"
    head_budget: Budget = DEFAULT_BUDGET


@dataclass
class _Collected:
    """What one streamed pass keeps: per-image vectors and labels (``metas`` holds only each image's labels),
    grounding scores, overlay examples, and for the first ``dense_samples`` images their tokens, class masks and
    generated questions."""

    embeddings: list[torch.Tensor] = field(default_factory=list)
    captions: list[torch.Tensor] = field(default_factory=list)
    pooled: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    labels: dict[str, list[Any]] = field(default_factory=dict)
    metas: list[dict[str, Any]] = field(default_factory=list)
    grounding: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    overlay: dict[str, Any] = field(default_factory=dict)
    grounded: int = 0
    tokens: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    questions: list[vqa.Question] = field(default_factory=list)
    question_image: list[int] = field(default_factory=list)
    question_embeddings: list[torch.Tensor] = field(default_factory=list)
    pictures: list[torch.Tensor] = field(default_factory=list)
    dense: int = 0


def _progress(label: str, number: int, seen: int, every: int) -> None:
    if number % every == 0:
        print(f"[eval] {label}: {number} batches, {seen} images", file=sys.stderr, flush=True)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; nothing where there is no glibc).

    glibc serves allocations under its mmap threshold, which rises to 32 MiB as large blocks are freed, from the
    heap. A batch's activations are freed around the small feature copies kept across batches, and the heap's
    free holes were not returned: at ViT-B/16 and batch 8, resident memory grew ~3 MiB a batch, almost as if the
    images were kept (bench/eval_memory.py, most RSS while streaming, 250 -> 1,000 images: +348 MiB without the
    trim, +34 MiB with it after each batch).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _skip(evaluation: str, task: str, key: str, missing: int, total: int) -> None:
    """Say on stderr that a task is skipped because the eval split lacks its labels (a caption-only corpus)."""
    why = f"no '{key}' labels" if missing == total else f"no '{key}' label on {missing} of {total} samples"
    print(f"[eval] {evaluation}: skipping {task}: the eval split has {why}", file=sys.stderr, flush=True)


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
    with_text = has_text_embedding(model, config.model.context_length) if "vqa" in kinds else False
    for number, batch in enumerate(batches, start=1):
        images = batch["image"].to(device)
        if limit is not None:
            images, batch = images[: limit - seen], {k: v[: limit - seen] for k, v in batch.items()}
        tokens = image_tokens(model, images) if pools or kinds & DENSE else None
        if "zeroshot" in kinds or "retrieval" in kinds:
            found.embeddings.append(kept(model.encode_image(images)))
            found.metas.extend({"labels": m.get("labels", {})} for m in batch["meta"])  # not masks: memory
        if "retrieval" in kinds:
            text = tokenize(batch["caption"], config.model.context_length).to(device)
            found.captions.append(kept(model.encode_text(text)))
        if pools:
            for pool in pools:
                found.pooled[pool].append(kept(pooled(tower, tokens, pool)))
            for key in found.labels:
                found.labels[key].extend(m.get("labels", {}).get(key) for m in batch["meta"])
        if "grounding" in kinds and found.grounded < options.grounding_samples:
            _ground(model, batch, images, config, options, found)
        if kinds & DENSE and found.dense < options.dense_samples:
            _keep_dense(model, batch, images, tokens, kinds, with_text, config, options, found)
        seen += len(images)
        _release_freed_memory()
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
    rows = [i for i, m in enumerate(batch["meta"]) if {"color", "shape"} <= set(m.get("labels", {}))]
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


def _keep_dense(
    model: nn.Module, batch: dict[str, Any], images: torch.Tensor, tokens: torch.Tensor, kinds: set[str],
    with_text: bool, config: Config, options: SuiteOptions, found: _Collected,
) -> None:
    """Tokens (float16), class masks and questions of the batch's first images, up to ``dense_samples``."""
    rows = slice(0, options.dense_samples - found.dense)
    keys, metas = batch["key"][rows], batch["meta"][rows]
    found.tokens.append(tokens[rows].half().cpu())
    if "seg" in kinds:
        found.masks += [segmentation.class_mask(m, config.model.image_size) for m in metas]
    if "vqa" in kinds:
        questions, image_rows = vqa.shapes_questions(keys, metas, found.dense, options.head_budget.seed)
        found.questions += questions
        found.question_image += image_rows
        if with_text and questions:
            ids = tokenize([q.text for q in questions], config.model.context_length).to(images.device)
            found.question_embeddings.append(kept(model.encode_text(ids)))
    if found.dense < options.overlay_rows:
        mean = torch.tensor(config.data.image_mean, device=images.device)[:, None, None]
        std = torch.tensor(config.data.image_std, device=images.device)[:, None, None]
        shown = images[rows][: options.overlay_rows - found.dense]
        found.pictures.append((shown * std + mean).cpu())
    found.dense += len(keys)


def _zeroshot(model: nn.Module, found: _Collected, config: Config) -> dict[str, float]:
    metrics = {}
    features = torch.cat(found.embeddings)
    for task in zeroshot.load_tasks():
        if missing := sum(task.label_key not in m["labels"] for m in found.metas):
            _skip("zeroshot", task.name, task.label_key, missing, len(found.metas))
            continue
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
    tasks = []
    for task in linear_probe.load_probe_tasks():
        labels = test.labels[task.label_key]
        if all(label is None for label in labels):  # some missing is normal: one object has no relation
            _skip("linear", task.name, task.label_key, len(labels), len(labels))
        else:
            tasks.append(task)
    return linear_probe.score_probe_tasks(train_features, train.labels, test_features, test.labels, tasks, pool,
                                          options.k_shots)


def _vqa_set(model: nn.Module, found: _Collected, fusion: str) -> vqa.VqaSet:
    tokens = torch.cat(found.tokens)
    if fusion == "pooled-mlp":
        tower = vision_tower(model)
        tokens = torch.cat([pooled(tower, part.float().to(device_of(model)), tower.pool).cpu()
                            for part in tokens.split(256)])
    return vqa.VqaSet(tokens, torch.tensor(found.question_image), [q.text for q in found.questions],
                      [(q.answer,) for q in found.questions], [q.qtype for q in found.questions],
                      torch.cat(found.question_embeddings) if found.question_embeddings else None)


def _vqa(model: nn.Module, test: _Collected, train: _Collected, options: SuiteOptions
         ) -> tuple[dict[str, float], Image.Image | None]:
    """VQA probe metrics and the overlay of the first eval images' questions; nothing without questions."""
    if not test.questions or not train.questions:
        print("[eval] vqa: the corpus has no scene objects to ask about: skipping", file=sys.stderr, flush=True)
        return {}, None
    if not train.question_embeddings:
        print("[eval] vqa: no text tower: questions are encoded by a learned bag of words", file=sys.stderr,
              flush=True)
    test_set = _vqa_set(model, test, options.vqa_fusion)
    metrics, predicted = vqa.evaluate_vqa(_vqa_set(model, train, options.vqa_fusion), test_set, options.vqa_fusion,
                                          options.head_budget, options.progress_every * 10)
    pictures = torch.cat(test.pictures)
    rows = [[] for _ in range(len(pictures))]
    for question, image, guess in zip(test.questions, test.question_image, predicted, strict=True):
        if image < len(rows):
            rows[image].append((question, guess))
    return metrics, vqa.overlay_grid(pictures, rows)


def _with_masks(found: _Collected) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [i for i, mask in enumerate(found.masks) if mask is not None]
    patches = torch.cat(found.tokens)[rows, 1:] if rows else torch.empty(0)
    return patches, torch.stack([found.masks[i] for i in rows]) if rows else torch.empty(0)


def _seg(test: _Collected, train: _Collected, options: SuiteOptions) -> tuple[dict[str, float], Image.Image | None]:
    """Segmentation probe metrics and the overlay of the first eval images; nothing without class masks."""
    train_patches, train_masks = _with_masks(train)
    test_patches, test_masks = _with_masks(test)
    if not len(train_masks) or not len(test_masks):
        print("[eval] seg: the corpus has no object masks: skipping", file=sys.stderr, flush=True)
        return {}, None
    metrics, predicted = segmentation.evaluate_segmentation(train_patches, train_masks, test_patches, test_masks,
                                                            options.head_budget, options.progress_every * 10)
    shown = [i for i, mask in enumerate(test.masks[: options.overlay_rows]) if mask is not None]
    pictures = torch.cat(test.pictures)
    return metrics, segmentation.overlay_grid(pictures[shown], test_masks[: len(shown)], predicted[: len(shown)])


def evaluate_model(
    model: nn.Module,
    config: Config,
    suite: str,
    eval_batches: Iterable[dict[str, Any]],
    train_batches: Iterator[dict[str, Any]] | None,
    options: SuiteOptions = SuiteOptions(),
) -> tuple[dict[str, float], dict[str, Image.Image]]:
    """(metrics, overlays) of ``suite`` on a loaded model; overlays are PNG-ready images by evaluation name
    (``grounding``, ``vqa``, ``seg``), for the evaluations that ran and had something to draw."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite '{suite}' (suites: {', '.join(SUITES)})")
    model.eval()
    kinds = set(SUITES[suite])
    if kinds & NEEDS_TEXT and not has_text_embedding(model, config.model.context_length):
        print(f"[eval] {config.model.objective} has no text embedding: skipping {sorted(kinds & NEEDS_TEXT)}",
              file=sys.stderr, flush=True)
        kinds -= NEEDS_TEXT
    found = _stream(model, eval_batches, kinds, config, options, f"{suite} eval")
    if "grounding" in kinds and not found.grounded:
        print("[eval] grounding: skipping: the eval split has no 'color' and 'shape' labels with object masks or "
              "boxes", file=sys.stderr, flush=True)
    metrics: dict[str, float] = {}
    if "zeroshot" in kinds:
        metrics |= _zeroshot(model, found, config)
    if "retrieval" in kinds:
        metrics |= _retrieval(found)
    overlays: dict[str, Image.Image | None] = {}
    if kinds & NEEDS_TRAIN and train_batches is not None:
        train = _stream(model, train_batches, kinds & NEEDS_TRAIN, config, options, f"{suite} probe-train",
                        limit=options.probe_train_samples)
        if "linear" in kinds:
            metrics |= _linear(found, train, vision_tower(model).pool, options)
        if "vqa" in kinds:
            found_metrics, overlays["vqa"] = _vqa(model, found, train, options)
            metrics |= found_metrics
        if "seg" in kinds:
            found_metrics, overlays["seg"] = _seg(found, train, options)
            metrics |= found_metrics
    for name, values in found.grounding.items():
        metrics[f"eval/grounding/{name}"] = torch.cat(values).mean().item()
    if found.overlay:
        overlay = found.overlay
        overlays["grounding"] = grounding.overlay_grid(overlay["images"], overlay["maps"], overlay["masks"],
                                                       overlay["captions"])
    return metrics, {name: image for name, image in overlays.items() if image is not None}


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
    if NEEDS_TRAIN & set(SUITES[suite]):
        train_batches = iter_eval_batches(storage.join(config.data.url, "train"), config, options.batch_size)
    metrics, overlays = evaluate_model(model, config, suite, eval_batches, train_batches, options)
    step = int(meta["step"])
    report.write_metrics(checkpoint_url, meta, metrics, suite)
    run_id = meta.get("mlflow_run_id")
    if run_id:
        uri = tracking_uri or config.tracking.uri or default_tracking_uri()
        report.log_metrics(uri, run_id, metrics, step)
        for name, image in overlays.items():
            report.log_png(uri, run_id, image, f"{name}/step-{step:09d}", "overlays.png")
    return metrics

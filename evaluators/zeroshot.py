"""Zero-shot classification of a checkpoint's image features against prompt-built text classifiers.

CLIP's protocol (Radford et al. 2021, §3.1.4; open_clip ``zero_shot_classifier``): each class is the
renormalised mean of its L2-normalised prompt embeddings, and an image's prediction is the class of highest
cosine similarity. Tasks (class names, the label they score, templates) are data in ``assets/``. A checkpoint
is scored by streaming its corpus' eval split once, so every task reuses the same image features.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evaluators import report
from evaluators.features import kept
from trainer import storage
from trainer.checkpoint import load_for_eval
from trainer.data.eval_sets import classnames
from trainer.data.loader import iter_eval_batches
from trainer.data.tokenizer import tokenize
from trainer.models import build_model
from trainer.tracking import default_tracking_uri

SHAPES_TASKS = Path(__file__).parent / "assets" / "shapes.json"
# For users who have ImageNet as an ImageFolder or clip_benchmark set (trainer.data.eval_sets).
IMAGENET_TASKS = Path(__file__).parent / "assets" / "imagenet1k.json"


@dataclass(frozen=True)
class Task:
    """One zero-shot task: which meta label it scores and the prompts that build its classifier."""

    name: str
    label_key: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


def load_tasks(path: Path = SHAPES_TASKS) -> list[Task]:
    """The tasks of an assets file (``{"source": ..., "tasks": [...]}``)."""
    data = json.loads(path.read_text())
    return [
        Task(t["name"], t["label_key"], tuple(t["classnames"]), tuple(t["templates"])) for t in data["tasks"]
    ]


def eval_set_task(url: str, name: str, templates: Sequence[str]) -> Task:
    """A task over an ImageFolder or clip_benchmark eval set's own class names, scored by its integer labels.

    With ImageNet stored as either, ``load_tasks(IMAGENET_TASKS)`` gives OpenAI's curated names instead of
    the folders' wnids.
    """
    return Task(name, "label", tuple(classnames(url)), tuple(templates))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module, classnames: Sequence[str], templates: Sequence[str], context_length: int
) -> torch.Tensor:
    """(C, E) unit-norm class embeddings: per class, the renormalised mean of its prompt embeddings.

    Averaging over several templates ("prompt ensembling") is what CLIP reports as worth several points of
    ImageNet accuracy (Radford et al. 2021, §3.1.4); open_clip's ``build_zero_shot_classifier`` does the same.
    """
    device = _device(model)
    rows = []
    for name in classnames:
        tokens = tokenize([template.format(name) for template in templates], context_length).to(device)
        prompts = F.normalize(model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(prompts.mean(dim=0), dim=-1))
    return torch.stack(rows)


def zero_shot_accuracy(
    image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}``: the fraction of images whose label is among the k best-scoring classes.

    k is capped at the number of classes, so top-5 of a 4-class task is 1.0 rather than an error: the metric
    names stay the same across tasks of any size.
    """
    logits = image_features.float() @ classifier.float().T
    ranked = logits.topk(min(max(topk), classifier.shape[0]), dim=1).indices
    hits = ranked == labels.to(ranked.device).unsqueeze(1)
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in topk}


def _label_indices(task: Task, metas: Iterable[dict[str, Any]]) -> list[int]:
    indices = []
    for meta in metas:
        label = meta["labels"][task.label_key]
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(task.classnames):
            indices.append(label)  # eval sets of class indices (ImageFolder, clip_benchmark)
            continue
        if label not in task.classnames:
            classes = list(task.classnames)
            raise ValueError(f"{task.name}: label '{label}' is not one of its classes {classes}")
        indices.append(task.classnames.index(label))
    return indices


@torch.no_grad()
def _encode_split(
    model: nn.Module, batches: Iterable[dict[str, Any]], tasks: Sequence[Task], progress_every: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image features of the whole split (on CPU) and, per task, the label index of every image."""
    device = _device(model)
    features: list[torch.Tensor] = []
    labels: dict[str, list[int]] = {task.name: [] for task in tasks}
    seen = 0
    for number, batch in enumerate(batches, start=1):
        features.append(kept(model.encode_image(batch["image"].to(device))))
        for task in tasks:
            labels[task.name].extend(_label_indices(task, batch["meta"]))
        seen += len(batch["meta"])
        if number % progress_every == 0:
            print(f"[eval] zeroshot: {number} batches, {seen} images", file=sys.stderr, flush=True)
    if not features:
        raise ValueError("the eval split holds no samples")
    return torch.cat(features), {name: torch.tensor(found) for name, found in labels.items()}


def score_tasks(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    tasks: Sequence[Task],
    context_length: int,
    *,
    progress_every: int = 10,
) -> dict[str, float]:
    """``eval/zeroshot/<task>/{top1,top5,chance}`` for every task, from one pass over ``batches``."""
    model.eval()
    # Classifiers first: a model without a text tower fails here, before the split is streamed.
    classifiers = {
        t.name: zero_shot_classifier(model, t.classnames, t.templates, context_length) for t in tasks
    }
    features, labels = _encode_split(model, batches, tasks, progress_every)
    metrics: dict[str, float] = {}
    for task in tasks:
        for name, value in zero_shot_accuracy(features, classifiers[task.name], labels[task.name]).items():
            metrics[f"eval/zeroshot/{task.name}/{name}"] = value
        metrics[f"eval/zeroshot/{task.name}/chance"] = 1.0 / len(task.classnames)
    return metrics


def evaluate_checkpoint(
    checkpoint_url: str, *, batch_size: int = 256, tracking_uri: str | None = None, progress_every: int = 10
) -> dict[str, float]:
    """Score a committed checkpoint on the shapes tasks; merge them into ``metrics.json`` and log to MLflow.

    This is the ``quick`` suite (``evaluators.suite``) kept callable on its own for the kfp components. The
    metrics file is written before MLflow is tried, so an unreachable tracking server loses nothing. The
    MLflow run is the training run recorded in the checkpoint's meta (none: no MLflow logging); the tracking
    URI is ``tracking_uri``, else the checkpoint config's, else ``$MLFLOW_TRACKING_URI`` or the embedded
    store.
    """
    config, weights, meta = load_for_eval(checkpoint_url)
    model = build_model(config.model)
    model.load_state_dict(weights)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    batches = iter_eval_batches(storage.join(config.data.url, "eval"), config, batch_size)
    metrics = score_tasks(model, batches, load_tasks(), config.model.context_length,
                          progress_every=progress_every)
    report.write_metrics(checkpoint_url, meta, metrics, "zeroshot")
    run_id = meta.get("mlflow_run_id")
    if run_id:
        uri = tracking_uri or config.tracking.uri or default_tracking_uri()
        report.log_metrics(uri, run_id, metrics, int(meta["step"]))
    return metrics

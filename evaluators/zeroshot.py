"""Zero-shot classification of a checkpoint's image features against prompt-built text classifiers.

CLIP's protocol (Radford et al. 2021, §3.1.4; open_clip ``zero_shot_classifier``): each class is the
renormalised mean of its L2-normalised prompt embeddings, and an image's prediction is the class of highest
cosine similarity. Tasks (class names, the label they score, templates) are data in ``assets/``. A checkpoint
is scored by streaming its corpus' eval split once, so every task reuses the same image features.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer import storage

log = logging.getLogger(__name__)
SHAPES_TASKS = Path(__file__).parent / "assets" / "shapes.json"


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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module, classnames: Sequence[str], templates: Sequence[str], context_length: int
) -> torch.Tensor:
    """(C, E) unit-norm class embeddings: per class, the renormalised mean of its normalised prompt embeddings.

    Averaging over several templates ("prompt ensembling") is what CLIP reports as worth several points of
    ImageNet accuracy (Radford et al. 2021, §3.1.4); open_clip's ``build_zero_shot_classifier`` does the same.
    """
    from trainer.data.tokenizer import tokenize

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
        if label not in task.classnames:
            raise ValueError(f"{task.name}: label '{label}' is not one of its classes {list(task.classnames)}")
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
        features.append(model.encode_image(batch["image"].to(device)).float().cpu())
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
    features, labels = _encode_split(model, batches, tasks, progress_every)
    metrics: dict[str, float] = {}
    for task in tasks:
        classifier = zero_shot_classifier(model, task.classnames, task.templates, context_length)
        for name, value in zero_shot_accuracy(features, classifier, labels[task.name]).items():
            metrics[f"eval/zeroshot/{task.name}/{name}"] = value
        metrics[f"eval/zeroshot/{task.name}/chance"] = 1.0 / len(task.classnames)
    return metrics


def _log_to_mlflow(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log to the training run at the checkpoint's step; an outage is a warning, never an exception."""
    from trainer.tracking import Tracker

    tracker = Tracker(uri, run_id, max_attempts=3)
    tracker.log_metrics(metrics, step)
    if tracker.close():
        log.warning("zero-shot metrics of step %d not logged to MLflow run %s at %s; metrics.json has them",
                    step, run_id, uri)


def evaluate_checkpoint(
    checkpoint_url: str, *, batch_size: int = 256, tracking_uri: str | None = None, progress_every: int = 10
) -> dict[str, float]:
    """Score a committed checkpoint on the shapes tasks; write ``metrics.json`` beside it and log to MLflow.

    The metrics file is written before MLflow is tried, so an unreachable tracking server loses nothing. The
    MLflow run is the training run recorded in the checkpoint's meta (none: no MLflow logging); the tracking
    URI is ``tracking_uri``, else the checkpoint config's, else ``$MLFLOW_TRACKING_URI`` or the embedded store.
    """
    from trainer.checkpoint import load_for_eval
    from trainer.data.loader import iter_eval_batches
    from trainer.models import build_model
    from trainer.tracking import default_tracking_uri

    config, weights, meta = load_for_eval(checkpoint_url)
    model = build_model(config.model)
    model.load_state_dict(weights)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    batches = iter_eval_batches(storage.join(config.data.url, "eval"), config, batch_size)
    metrics = score_tasks(model, batches, load_tasks(), config.model.context_length,
                          progress_every=progress_every)
    step = int(meta["step"])
    report = {"step": step, "samples_seen": meta.get("samples_seen"), "metrics": metrics}
    storage.write_text(storage.join(checkpoint_url, "metrics.json"), json.dumps(report, indent=1))
    run_id = meta.get("mlflow_run_id")
    if run_id:
        _log_to_mlflow(tracking_uri or config.tracking.uri or default_tracking_uri(), run_id, metrics, step)
    return metrics

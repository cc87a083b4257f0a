"""Zero-shot classification of a checkpoint's image features against prompt-built text classifiers.

CLIP's protocol (Radford et al. 2021, §3.1.4; open_clip ``zero_shot_classifier``; clip_benchmark's
``zeroshot_classification``): each class is the renormalised mean of its L2-normalised prompt embeddings, and an
image's prediction is the class of highest cosine similarity. Tasks (class names, the label they score,
templates) are data: the shapes tasks in ``assets/shapes.json``, the others from task files
(``evaluators.tasks``). ``ZeroShot`` scores every task of one split from the split's image embeddings, kept
once for all of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.features import device_of
from evaluators.protocol import Batch, Context, Outcome, Source, absent
from trainer.data.tokenizer import tokenize

SHAPES_TASKS = Path(__file__).parent / "assets" / "shapes.json"
# OpenAI's ImageNet-1k names and templates, and the wnids that order ImageNet folders (evaluators.tasks).
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


@torch.no_grad()
def zero_shot_classifier(
    model: nn.Module, classnames: Sequence[str], templates: Sequence[str], context_length: int
) -> torch.Tensor:
    """(C, E) unit-norm class embeddings: per class, the renormalised mean of its prompt embeddings.

    Averaging over several templates ("prompt ensembling") is what CLIP reports as worth several points of
    ImageNet accuracy (Radford et al. 2021, §3.1.4); open_clip's ``build_zero_shot_classifier`` does the same.
    """
    device = device_of(model)
    rows = []
    for name in classnames:
        tokens = tokenize([fill(template, name) for template in templates], context_length).to(device)
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


def label_indices(task: Task, labels: Iterable[Any]) -> list[int]:
    """Each label as an index into the task's classes: class indices as they are (ImageFolder, webdataset
    ``cls``), class names by position (the shapes corpus)."""
    indices = []
    for label in labels:
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(task.classnames):
            indices.append(label)
            continue
        if label not in task.classnames:
            classes = list(task.classnames)
            raise ValueError(f"{task.name}: label '{label}' is not one of its classes {classes}")
        indices.append(task.classnames.index(label))
    return indices


def fill(template: str, classname: str) -> str:
    """A prompt: ours write the class as ``{}``, clip_benchmark's template files as ``{c}``."""
    return template.format(classname, c=classname)


def mean_per_class_recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the classes present in ``labels`` of the fraction of their images predicted right
    (clip_benchmark's ``mean_per_class_recall``, scikit-learn's balanced accuracy)."""
    hits = logits.argmax(dim=1) == labels
    return torch.stack([hits[labels == c].float().mean() for c in labels.unique()]).mean().item()


class ZeroShot:
    """Zero-shot top-1/top-5 (and mean per-class recall) of every task on one split.

    Metrics: ``eval/zeroshot/<task>/{top1,top5,mean_per_class_recall,chance}``. A task whose label some image of
    the split lacks is skipped, with a line saying so.
    """

    name = "zeroshot"
    needs_text = True

    def __init__(self, context: Context, source: Source, tasks: Sequence[Task]) -> None:
        self.context, self.source, self.tasks = context, source, tuple(tasks)
        self.features: list[torch.Tensor] = []
        self.labels: dict[str, list[Any]] = {task.label_key: [] for task in self.tasks}

    def reads(self) -> dict[str, tuple[Source, int | None]]:
        return {"test": (self.source, None)}

    def collect(self, role: str, batch: Batch) -> None:
        self.features.append(batch.embeddings())
        for key, found in self.labels.items():
            found.extend(batch.labels(key))

    def finish(self) -> Outcome:
        outcome = Outcome()
        features = torch.cat(self.features)
        for task in self.tasks:
            if why := absent(task.label_key, self.labels[task.label_key]):
                outcome.skip(self.name, f"skipping {task.name}: the {self.source.split} split has {why}")
                continue
            classifier = zero_shot_classifier(self.context.model, task.classnames, task.templates,
                                              self.context.config.model.context_length).cpu()
            labels = torch.tensor(label_indices(task, self.labels[task.label_key]))
            prefix = f"eval/zeroshot/{task.name}"
            for name, value in zero_shot_accuracy(features, classifier, labels).items():
                outcome.metrics[f"{prefix}/{name}"] = value
            outcome.metrics[f"{prefix}/mean_per_class_recall"] = mean_per_class_recall(features @ classifier.T,
                                                                                      labels)
            outcome.metrics[f"{prefix}/chance"] = 1.0 / len(task.classnames)
        return outcome

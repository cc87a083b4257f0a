"""Linear probes on frozen features: multinomial logistic regression fitted in torch with L-BFGS.

CLIP's linear-probe protocol (Radford et al. 2021, appendix A.3): L-BFGS logistic regression on frozen
features, its L2 strength chosen by a sweep on a validation split held out of the training data, then refit on
train + validation and scored once on the test split. We fit in torch rather than scikit-learn so the probe
runs where the features are (GPU or CPU) and depends on nothing else. Features are standardised with the
training split's mean and std so one weight-decay grid suits towers of any width. k-shot probes keep the
first k training examples of each class (deterministic, so runs compare). ``LinearProbe`` probes one eval set's
tasks: features of its train split (up to a sample limit) and of its test split, for each pooling asked for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evaluators.heads import single_thread
from evaluators.protocol import Batch, Context, Outcome, Source, absent
from evaluators.zeroshot import SHAPES_TASKS

# Log-spaced L2 strengths, as CLIP's sweep is log-spaced (it searches C = 1/λ over 1e-6…1e6, appendix A.3).
DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class Probe:
    """A fitted probe: standardisation, then ``x @ weight.T + bias``."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return (((features.float() - self.mean) / self.std) @ self.weight.T + self.bias).argmax(dim=1)


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 100
) -> Probe:
    """Minimise mean cross-entropy + ``weight_decay``·‖W‖² over (W, b) with full-batch L-BFGS."""
    x = features.float()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp(min=1e-6)
    x = (x - mean) / std
    y = labels.long().to(x.device)
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    # A probe is thousands of tiny ops: on 2 busy CPU cores one thread fitted 5-25x faster.
    with torch.enable_grad(), single_thread():
        optimizer.step(closure)
    return Probe(mean, std, weight.detach(), bias.detach())


def accuracy(probe: Probe, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (probe.predict(features) == labels.to(features.device)).float().mean().item()


def split_validation(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a seeded random ``fraction`` held out, at least one example."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = max(1, round(len(labels) * fraction)) if len(labels) > 1 else 0
    return order[held:], order[:held]


def k_shot_indices(labels: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the first ``k`` examples of every class, in their original order."""
    seen: dict[int, int] = {}
    chosen = []
    for index, label in enumerate(labels.tolist()):
        if seen.get(label, 0) < k:
            seen[label] = seen.get(label, 0) + 1
            chosen.append(index)
    return torch.tensor(chosen, dtype=torch.long)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, float]:
    """``{"top1", "weight_decay"}``: sweep on a validation split, refit on all training data, test once.

    Ties in validation accuracy go to the larger weight decay (the simpler model). With one weight decay
    there is nothing to sweep and every training example is fitted at once.
    """
    fit_idx, val_idx = split_validation(train_labels, val_fraction, seed)
    best, best_acc = weight_decays[0], -1.0
    if len(weight_decays) > 1 and len(val_idx) and len(fit_idx):
        for decay in sorted(weight_decays):
            probe = fit_logistic(train_features[fit_idx], train_labels[fit_idx], num_classes, decay)
            found = accuracy(probe, train_features[val_idx], train_labels[val_idx])
            if found >= best_acc:
                best, best_acc = decay, found
    probe = fit_logistic(train_features, train_labels, num_classes, best)
    return {"top1": accuracy(probe, test_features, test_labels), "weight_decay": best}


@dataclass(frozen=True)
class ProbeTask:
    """One probe task: the meta label it predicts and its VTAB group (natural/specialized/structured; "" for
    none)."""

    name: str
    label_key: str
    group: str = ""


def load_probe_tasks(path: Path = SHAPES_TASKS) -> list[ProbeTask]:
    """The ``probe_tasks`` of an assets file."""
    entries = json.loads(path.read_text())["probe_tasks"]
    return [ProbeTask(t["name"], t["label_key"], t["group"]) for t in entries]


def _indexed(labels: Sequence[Any], classes: dict[Any, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that have a label, their class indices); a label unseen in training gets -1 (always wrong)."""
    rows = [i for i, label in enumerate(labels) if label is not None]
    return torch.tensor(rows, dtype=torch.long), torch.tensor([classes.get(labels[i], -1) for i in rows])


def score_probe_tasks(
    train_features: dict[str, torch.Tensor],
    train_labels: dict[str, list[Any]],
    test_features: dict[str, torch.Tensor],
    test_labels: dict[str, list[Any]],
    tasks: Sequence[ProbeTask],
    trained_pool: str,
    k_shots: Sequence[int] = (),
) -> dict[str, float]:
    """Probe every task on every pooling's features; k-shot probes on the trained pooling.

    Names: ``eval/linear/<task>/{top1,weight_decay,top1_<k>shot}`` for the pooling the model was trained with,
    ``eval/linear-<pool>/<task>/top1`` for the diagnostic poolings. Samples without a label for a task (a
    one-object scene has no relation) are left out of that task; a task with fewer than two classes in training
    is skipped.
    """
    metrics: dict[str, float] = {}
    for task in tasks:
        names = {v for v in train_labels[task.label_key] if v is not None}
        classes = {c: i for i, c in enumerate(sorted(names, key=str))}
        if len(classes) < 2:
            continue
        train_rows, train_y = _indexed(train_labels[task.label_key], classes)
        test_rows, test_y = _indexed(test_labels[task.label_key], classes)
        for pool, features in train_features.items():
            prefix = "eval/linear" if pool == trained_pool else f"eval/linear-{pool}"
            found = linear_probe(features[train_rows], train_y, test_features[pool][test_rows], test_y,
                                 len(classes))
            metrics[f"{prefix}/{task.name}/top1"] = found["top1"]
            if pool == trained_pool:
                metrics[f"{prefix}/{task.name}/weight_decay"] = found["weight_decay"]
        # k-shot probes reuse the full probe's weight decay: a 1-shot split has nothing to hold out.
        decay = (metrics[f"eval/linear/{task.name}/weight_decay"],)
        for k in k_shots:
            shots = k_shot_indices(train_y, k)
            found = linear_probe(train_features[trained_pool][train_rows[shots]], train_y[shots],
                                 test_features[trained_pool][test_rows], test_y, len(classes),
                                 weight_decays=decay)
            metrics[f"eval/linear/{task.name}/top1_{k}shot"] = found["top1"]
    return metrics


def group_means(grouped: Sequence[tuple[str, float]]) -> dict[str, float]:
    """VTAB's summary: ``eval/linear/group-<group>/top1``, the mean of each group's task accuracies, and
    ``eval/linear/groups/top1``, the mean over groups (so a group of many tasks weighs as much as one of few)."""
    groups: dict[str, list[float]] = {}
    for group, value in grouped:
        groups.setdefault(group, []).append(value)
    means = {group: sum(values) / len(values) for group, values in groups.items()}
    metrics = {f"eval/linear/group-{group}/top1": mean for group, mean in means.items()}
    if means:
        metrics["eval/linear/groups/top1"] = sum(means.values()) / len(means)
    return metrics


class LinearProbe:
    """Linear (and k-shot) probes of one eval set's tasks on the tower's ``pools`` (the trained pooling first).

    Features of up to ``train_limit`` training samples fit each probe; every test sample scores it. A task whose
    labels the test split lacks entirely is skipped, with a line saying so.
    """

    name = "linear"
    needs_text = False

    def __init__(self, context: Context, train: Source, test: Source, tasks: Sequence[ProbeTask],
                 pools: Sequence[str], train_limit: int | None, k_shots: Sequence[int]) -> None:
        self.context, self.train, self.test = context, train, test
        self.tasks, self.pools, self.train_limit, self.k_shots = tuple(tasks), tuple(pools), train_limit, k_shots
        self.features: dict[str, dict[str, list[torch.Tensor]]] = {r: {p: [] for p in pools} for r in ("train", "test")}
        self.labels: dict[str, dict[str, list[Any]]] = {
            r: {t.label_key: [] for t in self.tasks} for r in ("train", "test")}

    def reads(self) -> dict[str, tuple[Source, int | None]]:
        return {"train": (self.train, self.train_limit), "test": (self.test, None)}

    def collect(self, role: str, batch: Batch) -> None:
        for pool, found in self.features[role].items():
            found.append(batch.pooled(pool))
        for key, found in self.labels[role].items():
            found.extend(batch.labels(key))

    def finish(self) -> Outcome:
        outcome = Outcome()
        tasks = []
        for task in self.tasks:
            labels = self.labels["test"][task.label_key]
            if all(label is None for label in labels):  # some missing is normal: one object has no relation
                outcome.skip(self.name, f"skipping {task.name}: the {self.test.split} split has "
                                        f"{absent(task.label_key, labels)}")
            else:
                tasks.append(task)
        train = {pool: torch.cat(found) for pool, found in self.features["train"].items()}
        test = {pool: torch.cat(found) for pool, found in self.features["test"].items()}
        outcome.metrics = score_probe_tasks(train, self.labels["train"], test, self.labels["test"], tasks,
                                            self.pools[0], self.k_shots)
        outcome.grouped = [(task.group, outcome.metrics[f"eval/linear/{task.name}/top1"]) for task in tasks
                           if task.group and f"eval/linear/{task.name}/top1" in outcome.metrics]
        return outcome

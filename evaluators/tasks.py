"""Task files: evaluations on eval sets other than the checkpoint's corpus, as data (``maeclip eval --tasks FILE``).

A task file (YAML) names its eval sets, then what to compute on them::

    datasets:
      cifar10: {format: webdataset}     # url: a storage URL, or a path under --root; none: --root itself
    evaluations:
      - {kind: zeroshot, dataset: cifar10}                     # split: test
      - {kind: linear, dataset: cifar10, group: natural}       # train_split: train, split: test
    include: [other.yaml]                                      # further task files, beside this one or shipped

Kinds: ``zeroshot`` (``classnames``: ``dataset`` (the set's own; ImageNet's 1,000 wnid folders get OpenAI's names)
| ``imagenet1k`` | a list; ``templates``: ``dataset`` (the set's own, else CLIP's 80 ImageNet ones) |
``openai-imagenet`` | ``simple-imagenet`` | a list), ``linear`` (``train_split``, ``train_samples`` (default all),
``k_shots``, ``group``: a VTAB group, whose mean the report gives) and ``retrieval`` (image↔text recall@1/5/10
over every caption of each image). Every entry's ``name`` (default: its dataset's) names its metrics:
``eval/<kind>/<name>/...``. Formats are ``trainer.data.eval_sets``': ``mds``, ``imagefolder``, ``webdataset``
(clip_benchmark's layout) and ``karpathy`` (COCO / Flickr30k captions); none given: detected. Shipped files
(``evaluators/assets/tasks/``: ``imagenet1k``, ``cifar10``, ``cifar100``, ``coco-karpathy``, ``flickr30k-karpathy``)
need only ``--root``.

Task files are read like configs (bounded, no YAML tags or aliases): a wrong key, kind or value is one
``ConfigError`` line naming the file and the entry, before any checkpoint is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from evaluators.linear_probe import LinearProbe, ProbeTask
from evaluators.protocol import Context, Evaluation, Source
from evaluators.retrieval import Retrieval
from evaluators.zeroshot import IMAGENET_TASKS, Task, ZeroShot
from trainer import storage
from trainer.config import ConfigError, read_yaml_file
from trainer.data import eval_sets

SHIPPED = Path(__file__).parent / "assets" / "tasks"
KINDS = ("zeroshot", "linear", "retrieval")
MAX_INCLUDES = 32  # a file that includes itself, directly or not, ends here
_DATASET_KEYS = {"format", "url", "annotations", "images"}
_COMMON_KEYS = {"kind", "dataset", "name", "split"}
_KIND_KEYS = {"zeroshot": {"classnames", "templates"}, "linear": {"train_split", "train_samples", "k_shots", "group"},
              "retrieval": set()}
GROUPS = ("natural", "specialized", "structured")


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation of a task file, its eval set resolved (not yet opened)."""

    kind: str
    name: str
    eval_set: eval_sets.EvalSet
    split: str
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the task file, for messages


def shipped_task_files() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def _locate(name: str, beside: Path | None) -> Path:
    """A task file by path, beside the including file, or by shipped name (``imagenet1k``)."""
    for candidate in ([beside / name] if beside else []) + [Path(name), SHIPPED / f"{name}.yaml"]:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no task file '{name}' (a path, or one of: {', '.join(shipped_task_files())})")


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a mapping, got {type(value).__name__}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 1024:
        raise ConfigError(f"{what}: expected a non-empty string of at most 1024 characters")
    return value.strip()


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or len(value) > 100_000:
        raise ConfigError(f"{what}: expected a non-empty list")
    return tuple(_text(item, what) for item in value)


def _dataset(name: str, entry: Any, root: str, where: str) -> eval_sets.EvalSet:
    entry = _mapping(entry or {}, where)
    if unknown := set(entry) - _DATASET_KEYS:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_DATASET_KEYS)})")
    url = _text(entry["url"], f"{where}.url") if "url" in entry else ""
    if "://" not in url:
        if not root:
            raise ConfigError(f"{where}: no url, and no --root to find '{url or name}' under")
        url = storage.join(root, url) if url else root
    try:
        return eval_sets.open_eval_set(url, str(entry.get("format", "")), str(entry.get("annotations", "")),
                                       str(entry.get("images", "")))
    except ValueError as err:  # DataError included: a missing or unreadable set is bad input too
        raise ConfigError(f"{where}: {err}") from None


def _options(kind: str, entry: dict[str, Any], where: str) -> dict[str, Any]:
    options = {key: entry[key] for key in _KIND_KEYS[kind] if key in entry}
    for key in ("classnames", "templates"):
        if isinstance(options.get(key), list):
            options[key] = _strings(options[key], f"{where}.{key}")
        elif key in options:
            options[key] = _text(options[key], f"{where}.{key}")
    if "train_samples" in options:
        samples = options["train_samples"]
        if not isinstance(samples, int) or isinstance(samples, bool) or not 2 <= samples <= 1 << 30:
            raise ConfigError(f"{where}.train_samples: expected an integer from 2 to {1 << 30}")
    if "k_shots" in options:
        shots = options["k_shots"]
        if not isinstance(shots, list) or not all(isinstance(k, int) and 1 <= k <= 10_000 for k in shots):
            raise ConfigError(f"{where}.k_shots: expected a list of integers from 1 to 10000")
        options["k_shots"] = tuple(shots)
    if "group" in options and options["group"] not in GROUPS:
        raise ConfigError(f"{where}.group: '{options['group']}' is not one of {', '.join(GROUPS)}")
    if "train_split" in options:
        options["train_split"] = _text(options["train_split"], f"{where}.train_split")
    return options


def load_task_file(name: str, root: str = "", *, _beside: Path | None = None, _depth: int = 0) -> list[TaskSpec]:
    """The evaluations of a task file (a path or a shipped name) and of the files it includes, in order."""
    if _depth > MAX_INCLUDES:
        raise ConfigError(f"task file '{name}': includes nest deeper than {MAX_INCLUDES}")
    path = _locate(name, _beside)
    source = str(path)
    data = _mapping(read_yaml_file(path, source), source)
    if unknown := set(data) - {"datasets", "evaluations", "include"}:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)} (known: datasets, evaluations, include)")
    datasets = {key: _dataset(key, entry, root, f"{source}: datasets.{key}")
                for key, entry in _mapping(data.get("datasets", {}), f"{source}: datasets").items()}
    entries = data.get("evaluations", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: evaluations: expected a list")
    specs = []
    for number, entry in enumerate(entries):
        where = f"{source}: evaluations[{number}]"
        entry = _mapping(entry, where)
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}: kind '{kind}' is not one of {', '.join(KINDS)}")
        if unknown := set(entry) - _COMMON_KEYS - _KIND_KEYS[kind]:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} for kind {kind}")
        dataset = entry.get("dataset")
        if dataset not in datasets:
            raise ConfigError(f"{where}: dataset '{dataset}' is not one of the file's datasets {sorted(datasets)}")
        specs.append(TaskSpec(kind, _text(entry.get("name", dataset), f"{where}.name"), datasets[dataset],
                              _text(entry.get("split", "test"), f"{where}.split"), _options(kind, entry, where),
                              source))
    includes = data.get("include", [])
    if not isinstance(includes, list):
        raise ConfigError(f"{source}: include: expected a list")
    for included in includes:
        specs += load_task_file(_text(included, f"{source}: include"), root, _beside=path.parent,
                                _depth=_depth + 1)
    if not specs:
        raise ConfigError(f"{source}: no evaluations")
    return specs


@cache
def _imagenet() -> dict[str, Any]:
    """The shipped ImageNet names, templates and wnids, read once (every zero-shot task file entry asks)."""
    return json.loads(IMAGENET_TASKS.read_text())


def classnames_of(spec: TaskSpec) -> tuple[str, ...]:
    """The task's class names by label index (see the module docstring for the choices)."""
    chosen = spec.options.get("classnames", "dataset")
    if isinstance(chosen, tuple):
        return chosen
    imagenet = _imagenet()
    if chosen == "imagenet1k":
        return tuple(imagenet["tasks"][0]["classnames"])
    if chosen != "dataset":
        raise ConfigError(f"{spec.source}: {spec.name}: classnames '{chosen}' is not dataset, imagenet1k or a list")
    names = eval_sets.classnames(spec.eval_set, spec.split)
    if names == imagenet["wnids"]:  # an ImageNet-1k folder tree: OpenAI's curated names, in the same order
        return tuple(imagenet["tasks"][0]["classnames"])
    if not names:
        raise ConfigError(f"{spec.source}: {spec.name}: {spec.eval_set.url} has no class names: give classnames")
    return tuple(names)


def templates_of(spec: TaskSpec) -> tuple[str, ...]:
    chosen = spec.options.get("templates", "dataset")
    if isinstance(chosen, tuple):
        return chosen
    imagenet = _imagenet()
    shipped = {"openai-imagenet": imagenet["tasks"][0]["templates"], "simple-imagenet": imagenet["simple_templates"]}
    if chosen == "dataset":
        return tuple(eval_sets.templates(spec.eval_set) or shipped["openai-imagenet"])
    if chosen not in shipped:
        raise ConfigError(f"{spec.source}: {spec.name}: templates '{chosen}' is not dataset, "
                          f"{', '.join(shipped)} or a list")
    return tuple(shipped[chosen])


def build(spec: TaskSpec, context: Context) -> Evaluation:
    """The evaluation a task-file entry asks for."""
    test = Source(spec.eval_set, spec.split)
    if spec.kind == "zeroshot":
        return ZeroShot(context, test, [Task(spec.name, "label", classnames_of(spec), templates_of(spec))])
    if spec.kind == "linear":
        train = Source(spec.eval_set, spec.options.get("train_split", "train"))
        location = eval_sets.split_location(spec.eval_set, spec.split)
        if eval_sets.split_location(spec.eval_set, train.split) == location:
            # A probe fitted on the samples it is scored on measures memory, not the features.
            raise ConfigError(f"{spec.source}: {spec.name}: the train split '{train.split}' and the split "
                              f"'{spec.split}' are the same samples ({location})")
        task = ProbeTask(spec.name, "label", spec.options.get("group", ""))
        return LinearProbe(context, train, test, [task], (context.tower.pool,), spec.options.get("train_samples"),
                           spec.options.get("k_shots", context.options.k_shots))
    return Retrieval(context, test, spec.name)

"""Named evaluation suites, and the one streaming loop that runs any list of evaluations on a checkpoint.

Suites on the checkpoint's own corpus (``maeclip eval --checkpoint URL --suite NAME``):

- ``quick``: zero-shot classification (the shapes tasks).
- ``default``: zero-shot, linear probes on the trained pooling (full and k-shot), image↔text retrieval,
  grounding, the VQA probe and the linear segmentation probe.
- ``full``: ``default`` with the linear probes also on every other pooling, as a diagnostic of what the tokens
  hold.

Task files (``evaluators.tasks``; ``--tasks FILE``) add evaluations on other eval sets: ImageNet, CIFAR,
COCO / Flickr30k, a VTAB-style group of probes. Each evaluation owns what it keeps and how it finishes
(``evaluators.protocol``); the loop here streams each split once for all the evaluations that read it, so memory
grows with ``samples × width``, never with pixels (the dense probes keep every token of a bounded number of
images). Objectives without a text tower (mae, m3ae) skip zero-shot, retrieval and grounding; an evaluation whose
labels a split lacks (a caption-only corpus has none of the shapes labels) is skipped with a line saying why, and
the suite goes on. Results are merged into ``metrics.json`` beside the checkpoint and logged to the training run
at the checkpoint's step; grounding, VQA and segmentation overlays go to MLflow as PNGs.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from evaluators import report
from evaluators.features import has_text_embedding, probe_pools
from evaluators.grounding import Grounding
from evaluators.linear_probe import LinearProbe, group_means, load_probe_tasks
from evaluators.protocol import DEFAULT_OPTIONS, Batch, Context, Evaluation, Source, SuiteOptions
from evaluators.retrieval import Retrieval
from evaluators.segmentation import SegmentationProbe
from evaluators.tasks import build, load_task_file
from evaluators.vqa import VqaProbe
from evaluators.zeroshot import ZeroShot, load_tasks
from trainer.checkpoint import load_for_eval
from trainer.data.eval_sets import EvalSet, iter_eval_set
from trainer.data.loader import DataError
from trainer.models import build_model
from trainer.tracking import default_tracking_uri

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018 - musl and macOS have no malloc_trim
except (OSError, AttributeError):
    _LIBC = None

# A corpus suite's entries, each an evaluation of the corpus' (train, eval) splits.
Entry = Callable[[Context, Source, Source], Evaluation]


def _linear(diagnostic: bool) -> Entry:
    return lambda c, train, test: LinearProbe(c, train, test, load_probe_tasks(), probe_pools(c.tower, diagnostic),
                                              c.options.probe_train_samples, c.options.k_shots)


ENTRIES: dict[str, Entry] = {
    "zeroshot": lambda c, train, test: ZeroShot(c, test, load_tasks()),
    "linear": _linear(diagnostic=False),
    "linear-diagnostic": _linear(diagnostic=True),
    "retrieval": lambda c, train, test: Retrieval(c, test, "corpus"),
    "grounding": lambda c, train, test: Grounding(c, test),
    "vqa": VqaProbe,
    "seg": SegmentationProbe,
}
SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("zeroshot",),
    "default": ("zeroshot", "linear", "retrieval", "grounding", "vqa", "seg"),
    "full": ("zeroshot", "linear-diagnostic", "retrieval", "grounding", "vqa", "seg"),
}


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


def suite_evaluations(context: Context, suite: str) -> list[Evaluation]:
    """The evaluations of a corpus suite, on the splits of the checkpoint's corpus."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite '{suite}' (suites: {', '.join(SUITES)})")
    corpus = EvalSet(context.config.data.url, "mds")
    train, test = Source(corpus, "train"), Source(corpus, "eval")
    return [ENTRIES[entry](context, train, test) for entry in SUITES[suite]]


Reader = tuple[Evaluation, str, int | None]


@torch.no_grad()
def _stream(context: Context, source: Source, readers: Sequence[Reader]) -> None:
    """One pass over a split, showing each reader its batches up to its own sample limit."""
    limits = [limit for _, _, limit in readers]
    limit = None if None in limits else max(limits)
    taken = [0] * len(readers)
    seen = 0
    batches = iter_eval_set(source.eval_set, source.split, context.config, context.options.batch_size, limit)
    for number, raw in enumerate(batches, start=1):
        batch = Batch(context, raw)
        for index, (evaluation, role, wanted) in enumerate(readers):
            room = len(batch) if wanted is None else min(len(batch), wanted - taken[index])
            if room > 0:
                evaluation.collect(role, batch if room == len(batch) else batch.head(room))
                taken[index] += room
        seen += len(batch)
        del batch
        _release_freed_memory()
        if number % context.options.progress_every == 0:
            print(f"[eval] {source.describe()}: {number} batches, {seen} images", file=sys.stderr, flush=True)
    if seen == 0:
        raise DataError(f"{source.describe()} holds no samples")


def evaluate(context: Context, evaluations: Sequence[Evaluation]) -> tuple[dict[str, float], dict[str, Image.Image]]:
    """(metrics, overlays by evaluation name) of ``evaluations``: every split streamed once, then each finished.

    Says on stderr, as it goes, what it skips and why, and at the end the list of everything skipped.
    """
    context.model.eval()
    texts = [e.name for e in evaluations if e.needs_text]
    if texts and not context.has_text:
        print(f"[eval] {context.config.model.objective} has no text embedding: skipping {sorted(set(texts))}",
              file=sys.stderr, flush=True)
    active = [e for e in evaluations if context.has_text or not e.needs_text]
    readers: dict[Source, list[Reader]] = {}
    for evaluation in active:
        for role, (source, limit) in evaluation.reads().items():
            readers.setdefault(source, []).append((evaluation, role, limit))
    for source, members in readers.items():
        _stream(context, source, members)
    metrics: dict[str, float] = {}
    overlays: dict[str, Image.Image] = {}
    grouped: list[tuple[str, float]] = []
    skipped = [f"{name} (no text tower)" for name in sorted(set(texts))] if not context.has_text else []
    for evaluation in active:
        outcome = evaluation.finish()
        metrics |= outcome.metrics
        grouped += outcome.grouped
        skipped += outcome.skipped
        if outcome.overlay is not None:
            overlays[evaluation.name] = outcome.overlay
    metrics |= group_means(grouped)
    if skipped:
        print(f"[eval] skipped {len(skipped)}: " + "; ".join(skipped), file=sys.stderr, flush=True)
    return metrics, overlays


def run_suite(
    checkpoint_url: str,
    suite: str | None = "default",
    *,
    tasks: Sequence[str] = (),
    root: str = "",
    tracking_uri: str | None = None,
    options: SuiteOptions = DEFAULT_OPTIONS,
) -> dict[str, float]:
    """Evaluate a committed checkpoint on a corpus ``suite`` (None: none) and on task files; merge into its
    ``metrics.json``, log metrics and overlays to MLflow.

    Task files are read (and their eval sets found) before the checkpoint is loaded, so a bad one costs nothing.
    Returns the flat ``{metric name: value}``, the shape the kfp components read.
    """
    if suite is not None and suite not in SUITES:
        raise ValueError(f"unknown suite '{suite}' (suites: {', '.join(SUITES)})")
    if suite is None and not tasks:
        raise ValueError("nothing to evaluate: give a suite or task files")
    specs = [spec for name in tasks for spec in load_task_file(name, root)]
    config, weights, meta = load_for_eval(checkpoint_url)
    model = build_model(config.model)
    model.load_state_dict(weights)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu")).eval()
    context = Context(model, config, options, has_text_embedding(model, config.model.context_length))
    evaluations = (suite_evaluations(context, suite) if suite else []) + [build(spec, context) for spec in specs]
    metrics, overlays = evaluate(context, evaluations)
    step = int(meta["step"])
    report.write_metrics(checkpoint_url, meta, metrics, [*([suite] if suite else []), *(f"tasks:{t}" for t in tasks)])
    run_id = meta.get("mlflow_run_id")
    if run_id:
        uri = tracking_uri or config.tracking.uri or default_tracking_uri()
        report.log_metrics(uri, run_id, metrics, step)
        for name, image in overlays.items():
            report.log_png(uri, run_id, image, f"{name}/step-{step:09d}", "overlays.png")
    return metrics

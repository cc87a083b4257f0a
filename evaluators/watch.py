"""Watch mode: evaluate each new committed checkpoint of a training run as it lands, until training is done.

A checkpoint counts as evaluated when its ``metrics.json`` lists the suite, so a restarted watcher resumes
where the last one stopped and never scores a checkpoint twice. Training is done when the run has a ``DONE``
marker or its newest committed checkpoint has reached the run's ``train.steps``; "done" is decided *before*
the last look for checkpoints, so the final checkpoint is always evaluated. A checkpoint pruned by retention
between listing and loading is skipped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator

from evaluators import report
from evaluators.suite import SuiteOptions, run_suite
from trainer import storage
from trainer.checkpoint import committed_checkpoints
from trainer.config import from_yaml

DONE = "DONE"


def training_done(run_url: str) -> bool:
    if storage.exists(storage.join(run_url, DONE)):
        return True
    found = committed_checkpoints(run_url)
    if not found:
        return False
    step, url = found[-1]
    return step >= from_yaml(storage.read_text(storage.join(url, "config.yaml"))).train.steps


def pending(run_url: str, suite: str) -> list[tuple[int, str]]:
    """Committed checkpoints (oldest first) whose ``metrics.json`` does not list ``suite`` yet."""
    return [(step, url) for step, url in committed_checkpoints(run_url)
            if suite not in report.read_metrics(url).get("suites", [])]


def watch(
    run_url: str,
    suite: str = "default",
    *,
    tracking_uri: str | None = None,
    options: SuiteOptions | None = None,
    poll_s: float = 30.0,
    timeout_s: float | None = None,
    evaluate: Callable[..., dict[str, float]] = run_suite,
) -> Iterator[tuple[str, dict[str, float]]]:
    """Yield (checkpoint URL, metrics) for each checkpoint evaluated; return once training is done.

    ``timeout_s`` bounds the whole watch (None: no bound); on expiry it stops with a line on stderr.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        done = training_done(run_url)
        for step, url in pending(run_url, suite):
            try:
                metrics = evaluate(url, suite, tracking_uri=tracking_uri, options=options or SuiteOptions())
            except FileNotFoundError:
                print(f"[watch] step {step} was removed before it was evaluated; skipped", file=sys.stderr)
                continue
            yield url, metrics
        if done:
            return
        if deadline is not None and time.monotonic() > deadline:
            print(f"[watch] stopped after {timeout_s} s; training at {run_url} is not done", file=sys.stderr)
            return
        time.sleep(poll_s)

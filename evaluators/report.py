"""Where evaluation results go: ``metrics.json`` beside the checkpoint and the training run in MLflow.

Every evaluator merges its metrics into the one ``metrics.json`` (the gate reads it), so running the quick
suite after the default one never loses the default suite's numbers. The file is written before MLflow is
tried, so an unreachable tracking server loses nothing; MLflow metrics go to the training run recorded in
the checkpoint's meta at the checkpoint's step (docs/contracts.md §5).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer import storage
from trainer.checkpoint import COMMITTED
from trainer.tracking import Tracker, client

log = logging.getLogger(__name__)


def read_metrics(checkpoint_url: str) -> dict[str, Any]:
    """The checkpoint's ``metrics.json`` report, or an empty one when it has none yet."""
    url = storage.join(checkpoint_url, "metrics.json")
    return json.loads(storage.read_text(url)) if storage.exists(url) else {"metrics": {}}


def write_metrics(checkpoint_url: str, meta: dict[str, Any], metrics: dict[str, float], suites: Sequence[str]
                  ) -> None:
    """Merge ``metrics`` into ``metrics.json``, recording the step, samples seen and which suites (and task files,
    as ``tasks:<name>``) ran.

    Only into a committed checkpoint (FileNotFoundError otherwise): a folder without ``COMMITTED`` is not one
    maeclip wrote, or not yet, and its files are not ours to overwrite (docs/contracts.md §8).
    """
    if not storage.exists(storage.join(checkpoint_url, COMMITTED)):
        raise FileNotFoundError(f"no committed checkpoint at {checkpoint_url}: metrics.json is written only there")
    report = read_metrics(checkpoint_url)
    report.update(step=int(meta["step"]), samples_seen=meta.get("samples_seen"))
    report["metrics"] = {**report.get("metrics", {}), **metrics}
    report["suites"] = sorted({*report.get("suites", []), *suites})
    storage.write_text(storage.join(checkpoint_url, "metrics.json"), json.dumps(report, indent=1))


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log to the training run at ``step``; an outage is a warning, never an exception."""
    tracker = Tracker(uri, run_id, max_attempts=3)
    tracker.log_metrics(metrics, step)
    if tracker.close():
        log.warning("eval metrics of step %d not logged to MLflow run %s at %s; metrics.json has them",
                    step, run_id, uri)


def log_png(uri: str, run_id: str, image: Any, artifact_path: str, name: str) -> None:
    """Log a PIL image as a PNG artifact of the run; an outage is a warning, never an exception."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        image.save(path, format="PNG")
        try:
            client(uri).log_artifact(run_id, str(path), artifact_path)
        except Exception as err:  # the metrics are already safe in metrics.json
            log.warning("overlay %s not logged to MLflow run %s: %s", name, run_id, err)

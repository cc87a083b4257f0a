"""MLflow tracking from rank 0 that never stops training (docs/contracts.md §5).

Calls go through one background thread with a queue: a tracking server that is down or slow delays metrics,
it never blocks or kills the training loop. Failed calls are retried with backoff; what cannot be delivered
before ``close`` gives up is counted and reported as dropped.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded sqlite store ``./.maeclip/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    path = Path(".maeclip").absolute()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def client(uri: str):
    """An MlflowClient for tracking and registry at ``uri`` whose calls fail within seconds, not minutes.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeouts) keep a call to a closed port going
    for about four minutes. The Tracker retries with its own backoff, and the gate should report an
    unreachable server promptly, so one retry and a 15 s timeout (both still overridable by environment).
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from mlflow import MlflowClient  # imported lazily: mlflow is slow to import and only rank 0 needs it

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_or_resume_run(uri: str, experiment: str, run_id: str | None, run_name: str, tags: dict[str, str]) -> str:
    """The run id to log to: ``run_id`` when resuming, else a new run in ``experiment``."""
    mlflow_client = client(uri)
    if run_id:
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id
    experiment_id = ensure_experiment(mlflow_client, experiment)
    return mlflow_client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


# MLflow 3's UI opens an experiment by its kind; without the tag it guesses, and shows ours as GenAI (traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _artifact_location(tracking_uri: str, name: str) -> str | None:
    """Beside a local sqlite store, its experiments' artifacts (``<store folder>/artifacts/<name>``): MLflow's
    default for a database store is ``./mlruns`` in whatever folder the process runs in. None for a server,
    which has its own artifact root."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
    return (folder / "artifacts" / re.sub(r"[^A-Za-z0-9._-]", "_", name)).as_uri()


def ensure_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing: a training-kind experiment whose artifacts, on a
    local sqlite store, lie beside the store.

    Concurrent jobs (a study's variants) may create it at the same moment: the loser's create fails, and it
    reads the winner's experiment instead of training untracked.
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(client.tracking_uri, name),
                                        tags=EXPERIMENT_KIND)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class Tracker:
    """Asynchronous, retrying metric/param logger for one MLflow run."""

    def __init__(self, uri: str, run_id: str, *, max_attempts: int = 8, backoff_s: float = 0.5) -> None:
        self.uri, self.run_id = uri, run_id
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.dropped = 0
        self._queue: queue.Queue[Callable[[Any], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self._submit(lambda c: [c.log_batch(self.run_id, params=items[i:i + 100]) for i in range(0, len(items), 100)])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._submit(lambda c: c.log_batch(self.run_id, metrics=items))

    def set_terminated(self, status: str = "FINISHED") -> None:
        self._submit(lambda c: c.set_terminated(self.run_id, status=status))

    @property
    def pending(self) -> int:
        """Calls queued and not yet taken up for delivery."""
        return self._queue.qsize()

    def close(self, timeout_s: float = 60.0) -> int:
        """Deliver what is queued within ``timeout_s``; return how many calls were dropped."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        self.dropped += self._queue.qsize()
        if self.dropped:
            log.warning("MLflow: %d tracking calls could not be delivered and were dropped", self.dropped)
        return self.dropped

    def _submit(self, call: Callable[[Any], None]) -> None:
        self._queue.put(call)

    def _work(self) -> None:
        mlflow_client = None
        while (call := self._queue.get()) is not None:
            for attempt in range(self.max_attempts):
                try:
                    mlflow_client = mlflow_client or client(self.uri)
                    call(mlflow_client)
                    break
                except Exception as err:  # a tracking outage must never reach the training loop
                    delay = min(self.backoff_s * 2**attempt, 30.0)
                    log.warning("MLflow call failed (%s); retry %d in %.1fs", err, attempt + 1, delay)
                    time.sleep(delay)
            else:
                self.dropped += 1

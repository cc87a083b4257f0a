"""The MLflow model registry side of the gate: one model version per checkpoint that passed, and aliases.

Each registration gets its own MLflow run (experiment ``<model>-registry``) holding the checkpoint's
``weights.safetensors``, ``config.yaml`` and ``metrics.json`` as artifacts and its eval metrics at the
checkpoint's step; the version's source is that run's ``checkpoint`` folder. A version's metrics are read back
from its run, which is how a later gate compares a candidate with the ``champion``. Aliases (``candidate``,
``champion``) are MLflow's registered-model aliases, so consumers load ``models:/<name>@champion``. Nothing
here writes to stdout: the gate's decision must be the only line there.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import storage
from trainer.tracking import client, ensure_experiment

CANDIDATE, CHAMPION = "candidate", "champion"
_ARTIFACTS = ("weights.safetensors", "config.yaml", "metrics.json")


@dataclass(frozen=True)
class Version:
    """A registered model version and the metrics it was registered with."""

    version: str
    checkpoint_url: str
    metrics: dict[str, float]


class Registry:
    """One registered model in one MLflow tracking/registry server."""

    def __init__(self, uri: str, model_name: str) -> None:
        self.uri, self.name = uri, model_name
        self.client = client(uri)

    def by_alias(self, alias: str) -> Version | None:
        """The version an alias points at, or None when the model or the alias does not exist yet."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        run = self.client.get_run(found.run_id)
        return Version(found.version, found.tags.get("checkpoint_url", ""), dict(run.data.metrics))

    def register(self, checkpoint_url: str, metrics: dict[str, float], meta: dict[str, Any]) -> Version:
        """A new version for a checkpoint: its own run with weights, config and metrics as artifacts."""
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        experiment_id = ensure_experiment(self.client, f"{self.name}-registry")
        step = int(meta["step"])
        tags = {"checkpoint_url": checkpoint_url, "step": str(step),
                "training_run_id": str(meta.get("mlflow_run_id") or "")}
        run = self.client.create_run(experiment_id, run_name=f"step-{step:09d}", tags=tags)
        run_id = run.info.run_id
        items = [Metric(k, float(v), 0, step) for k, v in metrics.items()]
        for start in range(0, len(items), 500):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=items[start:start + 500])
        with tempfile.TemporaryDirectory() as folder:
            for name in _ARTIFACTS:
                (Path(folder) / name).write_bytes(storage.read_bytes(storage.join(checkpoint_url, name)))
            self.client.log_artifacts(run_id, folder, "checkpoint")
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run at ..." on stdout
            self.client.set_terminated(run_id)
        try:
            self.client.create_registered_model(self.name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        created = self.client.create_model_version(
            self.name, f"{run.info.artifact_uri}/checkpoint", run_id=run_id, tags=tags,
            description=json.dumps({"checkpoint_url": checkpoint_url, "step": step}),
        )
        return Version(created.version, checkpoint_url, dict(metrics))

    def set_alias(self, alias: str, version: Version) -> None:
        self.client.set_registered_model_alias(self.name, alias, version.version)

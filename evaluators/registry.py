"""The MLflow model registry side of the gate: one model version per checkpoint that passed, and aliases.

Each registration gets its own MLflow run (experiment ``<model>-registry``) holding the checkpoint's
``weights.safetensors``, ``config.yaml`` and ``metrics.json`` as artifacts and its eval metrics at the
checkpoint's step; the version's source is that run's ``checkpoint`` folder. A version's metrics are read back
from its run, which is how a later gate compares a candidate with the ``champion``. Aliases (``candidate``,
``champion``) are MLflow's registered-model aliases, so consumers load ``models:/<name>@champion``. Nothing
here writes to stdout: the gate's decision must be the only line there.

maeclip writes only into a registered model it created (docs/contracts.md §8): the model and each version it
creates carry the tag ``maeclip.created_by=maeclip``. A model of that name without the tag is someone else's:
it is refused (``RegistryInUse``) before anything is registered or an alias moved, and an alias is only ever
pointed at a version maeclip created. Nothing here deletes a model or a version.
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
OWNER_TAG, OWNER = "maeclip.created_by", "maeclip"


class RegistryInUse(ValueError):
    """A registered model or version of that name that maeclip did not create: never written to."""


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
        self._ours = False  # set once the registered model is known to be maeclip's

    def _refuse(self, what: str, action: str) -> RegistryInUse:
        # The tracking URI is not named: it may hold credentials.
        return RegistryInUse(f"{what} was not created by maeclip (it has no tag {OWNER_TAG}={OWNER}): refusing "
                             f"to {action}")

    def _exists_as_ours(self) -> bool:
        """Whether the registered model exists (False: not yet); RegistryInUse when it exists but is not ours."""
        from mlflow.exceptions import MlflowException

        if self._ours:
            return True
        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        if (model.tags or {}).get(OWNER_TAG) != OWNER:
            raise self._refuse(f"registered model {self.name[:200]!r}",
                               "register into it or move its aliases; choose another model name (--model-name)")
        self._ours = True
        return True

    def _ensure_ours(self) -> None:
        """Create the registered model, tagged as ours, unless it exists; refuse one that is not ours."""
        from mlflow.exceptions import MlflowException

        if self._exists_as_ours():
            return
        try:
            self.client.create_registered_model(self.name, tags={OWNER_TAG: OWNER})
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            self._exists_as_ours()  # created meanwhile, by a concurrent gate (ours) or by someone else
            return
        self._ours = True

    def by_alias(self, alias: str) -> Version | None:
        """The version an alias points at, or None when the model or the alias does not exist yet.

        Raises RegistryInUse when the registered model exists but maeclip did not create it.
        """
        from mlflow.exceptions import MlflowException

        if not self._exists_as_ours():
            return None
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

        self._ensure_ours()  # before anything is logged: a refused model leaves no run behind
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
        created = self.client.create_model_version(
            self.name, f"{run.info.artifact_uri}/checkpoint", run_id=run_id, tags={**tags, OWNER_TAG: OWNER},
            description=json.dumps({"checkpoint_url": checkpoint_url, "step": step}),
        )
        return Version(created.version, checkpoint_url, dict(metrics))

    def set_alias(self, alias: str, version: Version) -> None:
        """Point ``alias`` at ``version``: only in our registered model, and only at a version maeclip created."""
        self._exists_as_ours()
        found = self.client.get_model_version(self.name, version.version)
        if (found.tags or {}).get(OWNER_TAG) != OWNER:
            raise self._refuse(f"version {version.version} of registered model {self.name[:200]!r}",
                               f"point alias {alias!r} at it")
        self.client.set_registered_model_alias(self.name, alias, version.version)

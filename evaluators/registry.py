"""The MLflow model registry side of the gate: one model version per checkpoint that passed, and aliases.

A version belongs to the run that trained its checkpoint: the checkpoint's ``weights.safetensors``,
``config.yaml`` and ``metrics.json`` are logged to that run under ``registered/step-<step>``, the version's
source is that folder, and its ``run_id`` is the training run, so MLflow links the version to the run and the run
to its experiment (a study's variant, under the study). A checkpoint trained without tracking (or on another
server) gets a run of its own in one experiment, ``maeclip-registry``. A version's metrics are read back from
its ``metrics.json``, which is how a later gate compares a candidate with the ``champion``. Aliases
(``candidate``, ``champion``) are MLflow's registered-model aliases, so consumers load
``models:/<name>@champion``. Nothing here writes to stdout: the gate's decision must be the only line there.

maeclip writes only into a registered model it created (docs/contracts.md §8): the model and each version it
creates carry the tag ``maeclip.created_by=maeclip``. A model of that name without the tag is someone else's:
it is refused (``RegistryInUse``) before anything is registered or an alias moved, and an alias is only ever
pointed at a version maeclip created. Nothing here deletes a model or a version.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import storage
from trainer.tracking import client, ensure_experiment

CANDIDATE, CHAMPION = "candidate", "champion"
_ARTIFACTS = ("weights.safetensors", "config.yaml", "metrics.json")
REGISTRY_EXPERIMENT = "maeclip-registry"  # versions of checkpoints that no run of this server trained
MAX_METRICS_BYTES = 4 << 20  # a version's metrics.json: anyone with access to the store could have written it
_ARTIFACT_PATH = re.compile(r"checkpoint|registered/step-\d{9}")  # where register() puts a version's files
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
        return Version(found.version, found.tags.get("checkpoint_url", ""), self._metrics(found))

    def _metrics(self, found: Any) -> dict[str, float]:
        """The metrics a version was registered with: its ``metrics.json``, read bounded."""
        folder_path = found.tags.get("artifact_path", "checkpoint")  # "checkpoint": versions before 2026-12
        if not _ARTIFACT_PATH.fullmatch(folder_path):  # a tag anyone with access could have rewritten
            raise ValueError(f"version {found.version}'s artifact_path tag is not one maeclip writes")
        path = f"{folder_path}/metrics.json"
        listed = {info.path: info.file_size for info in self.client.list_artifacts(found.run_id, folder_path)}
        if path not in listed or (listed[path] or 0) > MAX_METRICS_BYTES:
            raise ValueError(f"version {found.version} has no metrics.json of at most {MAX_METRICS_BYTES} bytes")
        with tempfile.TemporaryDirectory() as folder:
            local = Path(self.client.download_artifacts(found.run_id, path, folder))
            loaded = json.loads(local.read_bytes()[:MAX_METRICS_BYTES])
        metrics = loaded.get("metrics") if isinstance(loaded, dict) else None
        if not isinstance(metrics, dict):
            raise ValueError(f"version {found.version}'s metrics.json holds no metrics")
        try:
            return {str(k): float(v) for k, v in metrics.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"version {found.version}'s metrics.json holds a value that is not a number") from err

    def _training_run(self, meta: dict[str, Any]) -> Any | None:
        """The run that trained the checkpoint, if this server has it (and it is not deleted)."""
        from mlflow.exceptions import MlflowException

        run_id = str(meta.get("mlflow_run_id") or "")
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return run if run.info.lifecycle_stage == "active" else None

    def register(self, checkpoint_url: str, metrics: dict[str, float], meta: dict[str, Any]) -> Version:
        """A new version for a checkpoint, its weights, config and metrics logged to the run that trained it."""
        self._ensure_ours()  # before anything is logged: a refused model leaves no run behind
        step = int(meta["step"])
        folder_name = f"registered/step-{step:09d}"
        run = self._training_run(meta)
        if run is None:
            experiment_id = ensure_experiment(self.client, REGISTRY_EXPERIMENT)
            run = self.client.create_run(experiment_id, run_name=f"{self.name}-step-{step:09d}",
                                         tags={"checkpoint_url": checkpoint_url})
            with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run at ..." on stdout
                self.client.set_terminated(run.info.run_id)
        run_id, artifact_uri = run.info.run_id, run.info.artifact_uri
        with tempfile.TemporaryDirectory() as folder:
            for name in _ARTIFACTS:
                (Path(folder) / name).write_bytes(storage.read_bytes(storage.join(checkpoint_url, name)))
            self.client.log_artifacts(run_id, folder, folder_name)
        tags = {"checkpoint_url": checkpoint_url, "step": str(step), "artifact_path": folder_name}
        created = self.client.create_model_version(
            self.name, f"{artifact_uri}/{folder_name}", run_id=run_id, tags={**tags, OWNER_TAG: OWNER},
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

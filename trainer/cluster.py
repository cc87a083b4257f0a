"""A training run request turned into what TorchX needs to launch it: the scheduler's options, the job's
environment, its image, its per-pod resources and its retry budget. The one place that decides these, for
``maeclip train`` and the pipelines' training step alike (k8s/README.md, "Training pods", says what a cluster
gets and why).

On ``local_cwd`` the job is this machine's processes and inherits this environment; only torchrun's folder is
put on PATH. On ``kubernetes`` a pod gets none of the launching machine's environment (its PATH, home or virtual
environment mean nothing in the image): only the MLflow tracking URI and the storage endpoint settings named in
``FORWARDED_ENV``, never credentials, which the pods read from Secrets of their own namespace.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from trainer.components import DEFAULT_IMAGE
from trainer.config import Config, ConfigError, quote

# Settings of the launcher's environment that a training pod needs to reach the same services: the MLflow server
# and S3-compatible endpoints and regions (botocore and s3fs read these). Credentials are never forwarded: a value
# in the job spec is readable by anyone who can read the job, and the pods have their own identity.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION", "GOOGLE_CLOUD_PROJECT")
# dist.torchrun reads LOGLEVEL from the launcher's environment when the job does not set it: the job sets the
# value torchrun falls back to.
POD_LOGLEVEL = "WARNING"
# The training pods' MLflow identity (k8s/README.md, "Identities"), and the storage keys of clusters without
# workload identity, both Secrets of the job's namespace; the storage one is optional, as for pipeline steps.
TRACKING_SECRET = "mlflow-trainer"
STORAGE_SECRET = "maeclip-storage"
# infra/docker/Dockerfile: the image's user has this HOME, which is also its working directory.
IMAGE_HOME = "/home/maeclip"
# Jobs at this priority class (k8s/base/scheduling.yaml) are preempted first and resume from their checkpoint,
# so they may also run on spot nodes, which infra/terraform taints as GKE documents for spot pools.
PREEMPTIBLE_PRIORITY_CLASS = "maeclip-study"
SPOT_TOLERATION = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}

# What one pod asks for, part by part: torchrun's agent, nproc_per_node training processes (one per GPU) and
# data.num_workers data-loader processes for each of them.
# The agent, with room for the container runtime's and kubelet's per-pod overhead.
AGENT_CPU, AGENT_MEMORY_MB = 1, 2048
# A training process: its CUDA context, pinned host buffers, and the host copy of its model and optimizer state
# while a checkpoint is staged (ViT-B/16 CLIP with AdamW: about 2 GB).
RANK_CPU, RANK_MEMORY_MB = 1, 8192
# A loader worker decodes and augments on one core; its memory holds Streaming's shard buffers.
WORKER_CPU, WORKER_MEMORY_MB = 1, 1024
# /dev/shm carries each worker's prefetched batches (prefetch_factor 2 x a ViT-B/16 batch of 256 x 3 x 224 x 224
# float32 = 154 MB, with 3x headroom), and NCCL's intra-node transport per process. It is memory, counted
# against the pod's memory limit, so it is part of the memory asked for.
WORKER_SHM_MB, RANK_SHM_MB = 1024, 512

# Kubernetes object names: DNS-1123 subdomains (service accounts, priority classes, queues) and labels
# (namespaces).
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")
_LIMITS = {"cpu": (1, 1024), "memory_mb": (1, 1 << 24), "gpus": (0, 64), "shm_mb": (1, 1 << 24),
           "max_retries": (0, 100)}


@dataclass(frozen=True)
class Cluster:
    """Where, as whom and with what the training job runs on Kubernetes (ignored by ``local_cwd``).

    The names default to k8s/base's objects. Resources left at None are derived from the launch
    (``pod_resources``); ``max_retries`` is Volcano's budget of job restarts after an evicted or failed pod,
    apart from torchrun's ``--max-restarts`` of the worker processes inside a pod.
    """

    namespace: str = "maeclip"
    queue: str = "maeclip"
    service_account: str = "maeclip-trainer"
    priority_class: str = "maeclip-train"
    image: str = DEFAULT_IMAGE
    cpu: int | None = None
    memory_mb: int | None = None
    gpus: int | None = None
    shm_mb: int | None = None
    max_retries: int = 3

    def __post_init__(self) -> None:
        for name, pattern, limit in (("namespace", _LABEL, 63), ("queue", _SUBDOMAIN, 253),
                                     ("service_account", _SUBDOMAIN, 253), ("priority_class", _SUBDOMAIN, 253),
                                     ("image", _IMAGE, 512)):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > limit or not pattern.fullmatch(value):
                raise ConfigError(f"cluster.{name}: {quote(value)} is not a valid "
                                  f"{'image reference' if name == 'image' else 'Kubernetes name'}")
        for name, (low, high) in _LIMITS.items():
            value = getattr(self, name)
            if value is None and name != "max_retries":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"cluster.{name}: {quote(value)} is not an integer within [{low}, {high}]")
        if self.shm_mb is not None and self.memory_mb is not None and self.shm_mb >= self.memory_mb:
            raise ConfigError(f"cluster.shm_mb: {self.shm_mb} MB of /dev/shm does not fit in the pod's "
                              f"{self.memory_mb} MB: it is memory, counted against the pod's limit")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Cluster:
        """A Cluster from a mapping (a pipeline parameter, CLI flags); an unknown key names the closest one.

        kfp passes a dict's numbers as floats: an integral float counts as its integer.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        settings = {}
        for key, value in values.items():
            if key not in names:
                match = difflib.get_close_matches(str(key)[:100], names, n=1, cutoff=0.0)
                raise ConfigError(f"cluster: unknown setting {quote(key)}; did you mean '{match[0]}'?")
            settings[key] = int(value) if isinstance(value, float) and value.is_integer() else value
        return cls(**settings)


@dataclass(frozen=True)
class PodResources:
    """What each pod of the job asks for: CPUs, memory and /dev/shm in MB (TorchX's unit), GPUs."""

    cpu: int
    memory_mb: int
    gpus: int
    shm_mb: int


def pod_resources(nproc_per_node: int, num_workers: int, cluster: Cluster) -> PodResources:
    """Per-pod resources for ``nproc_per_node`` processes with ``num_workers`` loader workers each; a setting of
    ``cluster`` that is not None wins over the derived value."""
    shm = cluster.shm_mb or nproc_per_node * (RANK_SHM_MB + num_workers * WORKER_SHM_MB)
    derived = PodResources(
        cpu=AGENT_CPU + nproc_per_node * (RANK_CPU + num_workers * WORKER_CPU),
        memory_mb=AGENT_MEMORY_MB + nproc_per_node * (RANK_MEMORY_MB + num_workers * WORKER_MEMORY_MB) + shm,
        gpus=nproc_per_node,  # one GPU per process
        shm_mb=shm)
    chosen = PodResources(**{f.name: getattr(cluster, f.name) if getattr(cluster, f.name) is not None
                             else getattr(derived, f.name) for f in dataclasses.fields(PodResources)})
    if chosen.shm_mb >= chosen.memory_mb:
        raise ConfigError(f"cluster.memory_mb: {chosen.memory_mb} MB leaves no room beside the {chosen.shm_mb} MB "
                          "of /dev/shm, which counts against the pod's memory limit")
    return chosen


@dataclass(frozen=True)
class LaunchPlan:
    """What TorchX is given: the scheduler and its options, the job's environment and, on Kubernetes, the
    cluster settings and the resources each pod gets (None on ``local_cwd``: the job is this machine's
    processes)."""

    scheduler: str
    options: dict[str, Any]
    env: dict[str, str]
    cluster: Cluster | None = None
    resources: PodResources | None = None


def tracking_uri_for_pods(config: Config, cluster: Cluster, environ: Mapping[str, str]) -> str:
    """The MLflow server the training pods log to: ``tracking.uri``, else the launcher's ``MLFLOW_TRACKING_URI``,
    else the namespace's own server (k8s/base). A local store (sqlite, a file) would live and die inside a pod,
    so it is refused."""
    uri, source = config.tracking.uri, "tracking.uri"
    if not uri:
        uri, source = environ.get("MLFLOW_TRACKING_URI", ""), "MLFLOW_TRACKING_URI"
    if not uri:
        return f"http://mlflow.{cluster.namespace}.svc.cluster.local:5000"
    if urlparse(uri).scheme not in ("http", "https"):
        raise ConfigError(f"{source}: {quote(uri)} is a store on this machine, which training pods cannot reach; "
                          "give an http(s) MLflow server, or leave it unset for the namespace's own")
    return uri


def plan_launch(config: Config, *, scheduler: str, nproc_per_node: int, cluster: Cluster | None = None,
                environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """How TorchX launches this run on ``scheduler``; ``environ`` is the launcher's environment (os.environ)."""
    environ = os.environ if environ is None else environ
    if scheduler != "kubernetes":
        # torchrun lives beside this interpreter, in the virtual environment; the job inherits the rest.
        env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + environ.get("PATH", "")}
        if config.tracking.uri:
            env["MLFLOW_TRACKING_URI"] = config.tracking.uri
        return LaunchPlan(scheduler, {}, env)
    cluster = cluster or Cluster()
    env = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    env["MLFLOW_TRACKING_URI"] = tracking_uri_for_pods(config, cluster, environ)
    env["LOGLEVEL"] = POD_LOGLEVEL
    # validate_spec off: TorchX would send the job to the API server before harden_job finishes it (and a dry run
    # has no server); the submission itself is what the API server and its admission policies judge.
    options = {"queue": cluster.queue, "namespace": cluster.namespace, "service_account": cluster.service_account,
               "priority_class": cluster.priority_class, "validate_spec": False}
    return LaunchPlan(scheduler, options, env, cluster, pod_resources(nproc_per_node, config.data.num_workers, cluster))


def harden_job(volcano_job: dict, plan: LaunchPlan) -> dict:
    """Finish the pods of a TorchX-rendered Volcano job where TorchX's options cannot reach.

    - The namespace's *restricted* Pod Security profile: non-root, the runtime's seccomp profile, no privilege
      escalation, no capabilities; and a read-only root filesystem, with ``/tmp`` (temporary files, Streaming's
      shard cache) and the image's home (``~/.cache``, compiler caches, the working directory) as emptyDir
      volumes.
    - A size on the memory-backed ``/dev/shm``, which TorchX leaves unbounded.
    - The pods' identity: no API token (training never calls Kubernetes), the priority class on every pod, and
      credentials from the namespace's Secrets by reference, never by value; k8s/base/admission.yaml admits
      exactly such jobs.
    - Preemptible jobs tolerate spot nodes.
    """
    from kubernetes.client import (
        V1Capabilities,
        V1EmptyDirVolumeSource,
        V1EnvVar,
        V1EnvVarSource,
        V1PodSecurityContext,
        V1SeccompProfile,
        V1SecretKeySelector,
        V1SecurityContext,
        V1Toleration,
        V1Volume,
        V1VolumeMount,
    )

    def secret(name: str, secret_name: str, key: str, optional: bool) -> V1EnvVar:
        selector = V1SecretKeySelector(name=secret_name, key=key, optional=optional or None)
        return V1EnvVar(name=name, value_from=V1EnvVarSource(secret_key_ref=selector))

    credentials = [secret("MLFLOW_TRACKING_USERNAME", TRACKING_SECRET, "username", False),
                   secret("MLFLOW_TRACKING_PASSWORD", TRACKING_SECRET, "password", False),
                   secret("AWS_ACCESS_KEY_ID", STORAGE_SECRET, "AWS_ACCESS_KEY_ID", True),
                   secret("AWS_SECRET_ACCESS_KEY", STORAGE_SECRET, "AWS_SECRET_ACCESS_KEY", True)]
    scratch = {"tmp": "/tmp", "home": IMAGE_HOME}
    # TorchX submits into the namespace of its options; the manifest names it too, so a dry run shows where.
    volcano_job["metadata"]["namespace"] = plan.cluster.namespace
    for task in volcano_job["spec"]["tasks"]:
        pod = task["template"].spec
        pod.security_context = V1PodSecurityContext(run_as_non_root=True,
                                                    seccomp_profile=V1SeccompProfile(type="RuntimeDefault"))
        pod.automount_service_account_token = False
        pod.priority_class_name = plan.cluster.priority_class
        if plan.cluster.priority_class == PREEMPTIBLE_PRIORITY_CLASS:
            pod.tolerations = [*(pod.tolerations or []), V1Toleration(**SPOT_TOLERATION)]
        for volume in pod.volumes:
            if volume.name == "dshm":  # TorchX's memory-backed /dev/shm (kubernetes_scheduler.role_to_pod)
                volume.empty_dir.size_limit = f"{plan.resources.shm_mb}M"
        pod.volumes += [V1Volume(name=name, empty_dir=V1EmptyDirVolumeSource()) for name in scratch]
        for container in pod.containers:
            container.security_context = V1SecurityContext(
                allow_privilege_escalation=False, capabilities=V1Capabilities(drop=["ALL"]),
                read_only_root_filesystem=True)
            container.volume_mounts += [V1VolumeMount(name=name, mount_path=path) for name, path in scratch.items()]
            container.env += credentials
    return volcano_job

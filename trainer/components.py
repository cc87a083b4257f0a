"""TorchX components: the training job as an AppDef, for ``local_cwd`` on one machine and Volcano on Kubernetes.

Built on TorchX's ``dist.torchrun`` so the same elastic torchrun launch runs everywhere, with torchrun's
agent started as ``trainer.agent``.
"""

from __future__ import annotations

import shlex

from torchx import specs
from torchx.components import dist

TRAIN_MODULE = "trainer.train"
AGENT = ("python", "-m", "trainer.agent")
DEFAULT_IMAGE = "maeclip:0.1.0"


def train(
    preset: str,
    *overrides: str,
    nnodes: str = "1",
    nproc_per_node: int = 2,
    image: str = DEFAULT_IMAGE,
    cpu: int = 2,
    gpus: int = 0,
    memory_mb: int = 8192,
    env: dict[str, str] | None = None,
    max_restarts: int = 3,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """The maeclip training job.

    Args:
        preset: a preset name from ``trainer/configs`` or a YAML path.
        overrides: ``key.path=value`` config overrides (``--set``).
        nnodes: nodes, or ``MIN:MAX`` for an elastic job (e.g. ``1:4``).
        nproc_per_node: processes per node (one per GPU).
        image: container image (ignored by ``local_cwd``).
        cpu: CPUs per node.
        gpus: GPUs per node.
        memory_mb: memory per node in MiB.
        env: extra environment (MLflow URI, storage endpoints).
        max_restarts: how often torchrun elastic restarts the worker group after a failure.
        max_retries: how often the scheduler restarts the whole job after one of its nodes was evicted or
            failed (Volcano: ``RestartJob`` on ``PodEvicted`` and ``PodFailed``); every node is recreated, so
            the job comes back at its max node count as capacity allows.
        rdzv_port: c10d rendezvous port on the rank-0 node.
    """
    script_args = ["--config", preset]
    for override in overrides:
        script_args += ["--set", override]
    app = dist.torchrun(
        *script_args,
        m=TRAIN_MODULE,
        image=image,
        name=f"maeclip/{preset.replace('.', '-').replace('/', '-')}",
        cpu=cpu,
        gpu=gpus,
        memMB=memory_mb,
        j=f"{nnodes}x{nproc_per_node}",
        env=dict(env or {}),
        rdzv_port=rdzv_port,
    )
    role = app.roles[0]
    # torchrun runs as trainer.agent, for which SIGTERM (the kubelet's stop) is a stop and not a failure; exec
    # makes it the pod's first process. dist.torchrun has no --max-restarts option: it goes right after.
    command = shlex.split(role.args[1])
    role.args[1] = "exec " + shlex.join([*AGENT, "--max-restarts", str(max_restarts), *command[1:]])
    # TorchX renders APPLICATION as Volcano task policies PodEvicted/PodFailed -> RestartJob with the job's
    # maxRetry as their budget (kubernetes_scheduler.app_to_resource).
    role.max_retries, role.retry_policy = max_retries, specs.RetryPolicy.APPLICATION
    return app


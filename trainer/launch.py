"""Launch the training AppDef through a TorchX scheduler, stream its logs, wait and report the outcome."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence

from torchx.runner import get_runner
from torchx.specs import AppState

from trainer import components


class TrainingFailed(RuntimeError):
    """The training job ended in a state other than SUCCEEDED."""


def launch_training(
    preset: str,
    overrides: Sequence[str] = (),
    *,
    nnodes: str = "1",
    nproc_per_node: int = 2,
    scheduler: str = "local_cwd",
    scheduler_cfg: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    image: str = components.DEFAULT_IMAGE,
    gpus: int = 0,
) -> str:
    """Run the training job to completion; return its TorchX app handle or raise TrainingFailed.

    ``image`` and ``gpus`` (per node) matter on container schedulers; ``local_cwd`` ignores the image.
    """
    env = dict(env or {})
    # torchrun must be on PATH: it lives beside this interpreter in the virtual environment.
    env.setdefault("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    app = components.train(preset, *overrides, nnodes=nnodes, nproc_per_node=nproc_per_node, env=env, image=image,
                           gpus=gpus)
    with get_runner() as runner:
        request = runner.dryrun(app, scheduler, cfg=scheduler_cfg or {})
        if scheduler == "kubernetes":
            components.harden_pod_templates(request.request.resource)
        handle = runner.schedule(request)
        role = app.roles[0]
        tails = [
            threading.Thread(target=_tail, args=(runner, handle, role.name, replica), daemon=True)
            for replica in range(role.num_replicas)
        ]
        for tail in tails:
            tail.start()
        status = runner.wait(handle, wait_interval=1)
        for tail in tails:
            tail.join(timeout=5)
    if status is None or status.state != AppState.SUCCEEDED:
        state = status.state.name if status else "UNKNOWN"
        raise TrainingFailed(f"training job {handle} ended {state}")
    return handle


def _tail(runner, handle: str, role: str, replica: int) -> None:
    try:
        for line in runner.log_lines(handle, role, replica, should_tail=True):
            print(line, end="" if line.endswith("\n") else "\n", flush=True)
    except Exception as err:  # logs are a convenience; the job's state is what counts
        print(f"[launch] log stream ended: {err}", file=sys.stderr)

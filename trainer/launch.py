"""Launch the training AppDef through a TorchX scheduler, stream its logs, wait and report the outcome."""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Sequence

from torchx.runner import get_runner
from torchx.specs import AppState

from trainer import components
from trainer.config import Config, ConfigError, quote

# The TorchX schedulers we build AppDefs for: local_cwd (one machine) and kubernetes (Volcano).
SCHEDULERS = ("local_cwd", "kubernetes")
MAX_NODES = 4096
MAX_PROCS_PER_NODE = 1024


class TrainingFailed(RuntimeError):
    """The training job ended in a state other than SUCCEEDED."""


def parse_nnodes(nnodes: str | int) -> tuple[int, int]:
    """``"N"`` -> (N, N), ``"MIN:MAX"`` (elastic) -> (MIN, MAX), with 1 <= MIN <= MAX; else ConfigError."""
    text = str(nnodes) if isinstance(nnodes, int) and not isinstance(nnodes, bool) else nnodes
    # [0-9], not \d: int() would also read other scripts' digits, which torchrun does not.
    match = re.fullmatch(r"([0-9]{1,9})(?::([0-9]{1,9}))?", text) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(f"--nnodes: {quote(nnodes)} is not N or MIN:MAX (for example 2, or 1:4 for an elastic job)")
    low, high = int(match[1]), int(match[2] or match[1])
    if not 1 <= low <= high <= MAX_NODES:
        raise ConfigError(f"--nnodes: {quote(nnodes)} needs 1 <= MIN <= MAX <= {MAX_NODES}")
    return low, high


def check_launch(config: Config, *, nnodes: str | int, nproc_per_node: int, scheduler: str) -> None:
    """Check the launch arguments against each other and the config, before anything starts; raise ConfigError.

    Each check stands for an error the job would otherwise hit after it was scheduled: torchrun refusing the
    node spec, TorchX an unknown scheduler, and ``train.accumulation_steps`` a global batch that the world size
    does not divide.
    """
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler: {quote(scheduler)} is not one of {', '.join(SCHEDULERS)}")
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int):
        raise ConfigError(f"--nproc-per-node: expected an integer, got {quote(nproc_per_node)}")
    if not 1 <= nproc_per_node <= MAX_PROCS_PER_NODE:
        raise ConfigError(f"--nproc-per-node: {nproc_per_node} is outside [1, {MAX_PROCS_PER_NODE}]")
    low, high = parse_nnodes(nnodes)
    wanted, per_rank = config.train.global_batch_size, config.data.batch_size
    if not wanted:
        return  # 0: one micro-batch per step, whatever the world size
    # An elastic job can (re)start on any node count from MIN to MAX, and must make the global batch on each.
    for nodes in range(high, low - 1, -1):
        per_pass = per_rank * nodes * nproc_per_node
        if wanted % per_pass:
            raise ConfigError(
                f"train.global_batch_size: {wanted} is not a multiple of data.batch_size x world size = {per_rank} x "
                f"{nodes * nproc_per_node} = {per_pass} ({nodes} node(s) x {nproc_per_node} per node"
                f"{', which the elastic --nnodes ' + quote(nnodes) + ' allows' if low < high else ''})")


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

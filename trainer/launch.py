"""Launching training: check everything that can be checked first (config, launch arguments, dataset, run URL,
the checkpoint it would resume from), run the TorchX AppDef on a scheduler, stream its logs, wait, and report
the outcome (a committed checkpoint, or why not). What ``maeclip train`` and the pipelines' training step run."""

from __future__ import annotations

import re
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torchx.runner import Runner, get_runner
from torchx.specs import AppDryRunInfo, AppState

from trainer import components, storage
from trainer.checkpoint import (
    checkpoint_step,
    claim_run,
    committed_checkpoints,
    latest_checkpoint,
    verify_checkpoint,
)
from trainer.cluster import Cluster, LaunchPlan, harden_job, plan_launch
from trainer.config import Config, ConfigError, load_config, quote
from trainer.data.loader import dataset_size
from trainer.train import read_divergence

# The TorchX schedulers we build AppDefs for: local_cwd (one machine) and kubernetes (Volcano).
SCHEDULERS = ("local_cwd", "kubernetes")
MAX_NODES = 4096
MAX_PROCS_PER_NODE = 1024


class TrainingFailed(RuntimeError):
    """The training job ended in a state other than SUCCEEDED."""


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the run's checkpoints end before that step."""


class TrainingStopped(RuntimeError):
    """The job was stopped (and committed) before the step it was asked to reach."""


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


def render_job(runner: Runner, preset: str, overrides: Sequence[str], *, nnodes: str, nproc_per_node: int,
               plan: LaunchPlan) -> AppDryRunInfo:
    """TorchX's request for the training job on ``plan.scheduler``; on Kubernetes the Volcano job, its pods
    finished by ``harden_job``. Renders only: nothing is submitted and no cluster is asked."""
    pods = {}
    if plan.resources is not None:
        pods = {"image": plan.cluster.image, "cpu": plan.resources.cpu, "memory_mb": plan.resources.memory_mb,
                "gpus": plan.resources.gpus, "max_retries": plan.cluster.max_retries}
    app = components.train(preset, *overrides, nnodes=nnodes, nproc_per_node=nproc_per_node, env=plan.env, **pods)
    with warnings.catch_warnings():
        # Said for every job with retries: Volcano 1.4 deleted the failed pods of a job's last retry
        # (volcano-sh/volcano#1651, fixed by #1657 in 2021), long before the 1.15.1 that k8s/README.md installs.
        warnings.filterwarnings("ignore", message=r"\s*Role .* configured with restarts", category=UserWarning)
        request = runner.dryrun(app, plan.scheduler, cfg=plan.options)
    if plan.cluster is not None:
        harden_job(request.request.resource, plan)
    return request


def launch_training(
    preset: str,
    overrides: Sequence[str] = (),
    *,
    nnodes: str = "1",
    nproc_per_node: int = 2,
    plan: LaunchPlan,
) -> str:
    """Run the training job to completion as ``plan`` says; return its TorchX app handle or raise TrainingFailed."""
    with get_runner() as runner:
        request = render_job(runner, preset, overrides, nnodes=nnodes, nproc_per_node=nproc_per_node, plan=plan)
        handle = runner.schedule(request)
        role = request.app.roles[0]
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


def preflight(preset: str, overrides: Sequence[str]) -> Config:
    """Validate the config, the dataset, the run URL and the checkpoint training would resume from; return
    the resolved Config. A tampered checkpoint raises CheckpointRefused here, a run URL holding data maeclip
    did not write RunInUse, before anything is launched."""
    config = load_config(preset, overrides)
    dataset_size(storage.join(config.data.url, "train"), config.data.max_samples)
    storage.check_writable(config.train.run_url)
    claim_run(config.train.run_url)  # a run URL holding others' data is refused (RunInUse) before any launch
    # Newest first, as resume tries them: one with a file missing is skipped there too, a refused one is not.
    for _, url in reversed(committed_checkpoints(config.train.run_url)):
        try:
            verify_checkpoint(url)
        except FileNotFoundError:
            continue
        break
    return config


def _checked_plan(preset: str, overrides: Sequence[str], *, nnodes: str, nproc_per_node: int, scheduler: str,
                  cluster: Cluster | None, environ: Mapping[str, str] | None) -> LaunchPlan:
    """The launch arguments checked against the config, and the plan for them: every bad input found here, before
    anything reads the dataset or the run URL."""
    config = load_config(preset, overrides)
    check_launch(config, nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler)
    return plan_launch(config, scheduler=scheduler, nproc_per_node=nproc_per_node, cluster=cluster, environ=environ)


def dryrun_training(
    preset: str,
    overrides: Sequence[str] = (),
    *,
    nnodes: str = "1",
    nproc_per_node: int = 2,
    cluster: Cluster | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The Volcano job that ``run_training(..., scheduler="kubernetes")`` would submit, as a manifest.

    The same checks and rendering as a launch, with the launcher's environment ``environ`` (default os.environ);
    no storage is read and no cluster is asked, so it works wherever the config is valid.
    """
    from kubernetes.client import ApiClient

    plan = _checked_plan(preset, overrides, nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler="kubernetes",
                         cluster=cluster, environ=environ)
    with get_runner() as runner:
        request = render_job(runner, preset, overrides, nnodes=nnodes, nproc_per_node=nproc_per_node, plan=plan)
    return ApiClient().sanitize_for_serialization(request.request.resource)


def run_training(
    preset: str,
    overrides: Sequence[str] = (),
    *,
    nnodes: str = "1",
    nproc_per_node: int = 2,
    scheduler: str = "local_cwd",
    cluster: Cluster | None = None,
) -> str:
    """Preflight, launch through TorchX, wait; return the newest committed checkpoint URL.

    On ``kubernetes`` the job runs as ``cluster`` says (k8s/base's names, resources derived from the launch when
    not given; ``trainer/cluster.py``).
    """
    plan = _checked_plan(preset, overrides, nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler,
                         cluster=cluster, environ=None)
    config = preflight(preset, overrides)
    launch_training(preset, list(overrides), nnodes=nnodes, nproc_per_node=nproc_per_node, plan=plan)
    diverged = read_divergence(config.train.run_url)
    if diverged is not None:
        raise TrainingDiverged(f"training diverged at step {diverged['step']} (loss {diverged['loss']}); nothing "
                               f"after step {diverged['last_committed_step']} was saved")
    latest = latest_checkpoint(config.train.run_url)
    if latest is None:
        raise RuntimeError(f"training finished without a committed checkpoint under {config.train.run_url}")
    return latest


def segment_end(total_steps: int, segment: int, segments: int) -> int:
    """The step segment ``segment`` of ``segments`` trains to: the next multiple of ``total_steps / segments``."""
    if not 1 <= segment <= segments:
        raise ConfigError(f"segment {segment} is not within 1..{segments}")
    return -(-total_steps * segment // segments)


def run_training_segment(
    preset: str,
    overrides: Sequence[str],
    *,
    segment: int,
    segments: int,
    nnodes: str = "1",
    nproc_per_node: int = 2,
    scheduler: str = "local_cwd",
    cluster: Cluster | None = None,
) -> str:
    """Train to the end of one segment (resuming from the run's newest checkpoint); return that checkpoint.

    A job stopped early (SIGTERM: a preemption) has committed a checkpoint and exited 0, but the segment is not
    done: that raises TrainingStopped, so the pipeline step fails (and its retry resumes) instead of evaluating
    a shorter run, which would give this variant less compute than the others.
    """
    train = load_config(preset, overrides).train
    end = segment_end(train.steps, segment, segments)
    schedule = train.schedule_steps or train.steps  # one warmup + cosine over the whole run, not per segment
    latest = run_training(preset, [*overrides, f"train.steps={end}", f"train.schedule_steps={schedule}"],
                          nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler, cluster=cluster)
    reached = checkpoint_step(latest)
    if reached < end:
        raise TrainingStopped(f"training stopped at step {reached}, before the end of segment {segment} of "
                              f"{segments} (step {end}); run it again to resume from {latest}")
    return latest

"""The training entry point: ``python -m trainer.train --config PRESET --set key=value ...`` under torchrun.

One loop for every objective: the objective module returns a dict of named losses whose ``loss`` entry is the
total, so this file never knows which model runs. Resume is automatic from the newest committed checkpoint
of ``train.run_url``; SIGTERM finishes the step, checkpoints and exits 0. A non-finite loss stops every rank
before the update, saves nothing and records ``diverged.json`` in the run URL for the launcher.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import torch
import torch.distributed as dist

from trainer import checkpoint, storage, tracking
from trainer.agent import STOPPED_FILE
from trainer.config import Config, ConfigError, load_config, to_yaml
from trainer.data.loader import build_train_loader
from trainer.distributed import StopSignal, parallelize, setup_distributed
from trainer.models import ClipObjective, build_model
from trainer.models.flops import flops_per_sample, mfu
from trainer.optim import at_batch, build_optimizer, lr_at
from trainer.step import gradient_sync, train_step

log = logging.getLogger("trainer.train")
# Written into the run URL when the loss is not finite; read by the launcher (pipelines/cli.py).
DIVERGED = "diverged.json"


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed for the randomness of one step on one rank (masks, dropout): resume needs no RNG state."""
    return (seed * 1_000_003 + step) * 4099 + rank


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def system_metrics(device: torch.device) -> dict[str, float]:
    """Host and accelerator memory and host load, logged beside throughput: what to look at when it drops."""
    metrics = {
        "system/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "system/load_avg_1m": os.getloadavg()[0],
    }
    if device.type == "cuda":
        metrics["system/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        metrics["system/cuda_reserved_gb"] = torch.cuda.memory_reserved(device) / 2**30
    return metrics


def _tags(config: Config) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        commit = ""
    return {
        "objective": config.model.objective,
        "image_pool": config.model.image_pool,
        "dataset": config.data.url,
        "git_commit": commit or "unknown",
        "versions": f"torch={version('torch')} streaming={version('mosaicml-streaming')} mlflow={version('mlflow')}",
    }


def read_divergence(run_url: str) -> dict[str, Any] | None:
    """What the last launch on ``run_url`` recorded when its loss stopped being finite, or None."""
    url = storage.join(run_url, DIVERGED)
    return json.loads(storage.read_text(url)) if storage.exists(url) else None


def _record_divergence(config: Config, step: int, loss: float, last_saved: int) -> None:
    record = {"step": step, "loss": str(loss), "last_committed_step": last_saved, "config_digest": config.digest()}
    storage.write_text(storage.join(config.train.run_url, DIVERGED), json.dumps(record))
    print(f"[train] error: the loss is {loss} at step {step}; stopping without saving the diverged state "
          f"(last committed step: {last_saved})", flush=True)


def _report_stopped(step: int) -> None:
    """Tell the agent (trainer.agent) that this node's workers stopped after a committed checkpoint."""
    path = os.environ.get(STOPPED_FILE)
    if path and os.environ.get("LOCAL_RANK", "0") == "0":
        with open(path, "w") as handle:
            handle.write(f"checkpoint of step {step} committed\n")


class SampleAudit:
    """Optional record of the sample keys each step consumed (``$MAECLIP_SAMPLE_AUDIT`` = a folder).

    One JSON line per step and rank, tagged with torchrun's restart count, so a fault test (or an auditor) can
    check that the steps that survived restarts saw every sample of the epoch exactly once.
    """

    def __init__(self, folder: str, rank: int) -> None:
        self.path = os.path.join(folder, f"rank-{rank}.jsonl") if folder else ""
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def record(self, step: int, keys: list[str]) -> None:
        if self.path:
            with open(self.path, "a") as handle:
                record = {"step": step, "attempt": self.attempt, "pid": os.getpid(), "keys": list(keys)}
                handle.write(json.dumps(record) + "\n")


class Saver:
    """Checkpoints at most one at a time: synchronous, or asynchronous (``train.async_checkpoint``), where a
    save is committed by the ``wait`` before the next one, or at the end of training."""

    def __init__(self, config: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
        self.config, self.model, self.optimizer, self.rank = config, model, optimizer, rank
        self.pending: checkpoint.PendingCheckpoint | None = None
        asynchronous = config.train.async_checkpoint
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None

    def save(self, step: int, meta: dict[str, Any], final: bool) -> None:
        run_url = self.config.train.run_url
        if self.config.train.async_checkpoint and not final:  # the last one is waited for anyway
            self.pending = checkpoint.save_async(run_url, step, self.model, self.optimizer, self.config, meta,
                                                 process_group=self.group)
        else:
            self._report(checkpoint.save(run_url, step, self.model, self.optimizer, self.config, meta))

    def wait(self) -> None:
        if self.pending is not None:
            self._report(self.pending.wait())
            self.pending = None

    def _report(self, url: str) -> None:
        if self.rank == 0:
            print(f"[train] checkpoint {url}", flush=True)


def _batches(loader) -> Iterator[dict[str, Any]]:
    while True:  # epochs follow one another; Streaming's loader state knows where in the epoch we are
        yield from loader


def accumulation_steps(config: Config, world_size: int) -> int:
    """Micro-batches per optimizer step that make ``train.global_batch_size`` from this world size."""
    per_pass = config.data.batch_size * world_size
    wanted = config.train.global_batch_size or per_pass
    if wanted % per_pass:
        raise ConfigError(f"train.global_batch_size: {wanted} is not a multiple of data.batch_size x world size "
                          f"= {per_pass}")
    return wanted // per_pass


def train(config: Config) -> None:
    rank, world_size, device = setup_distributed()
    stop = StopSignal()
    cfg_t = config.train
    if cfg_t.deterministic:
        torch.use_deterministic_algorithms(True)
    micro_steps = accumulation_steps(config, world_size)
    global_batch = config.data.batch_size * world_size * micro_steps
    torch.manual_seed(cfg_t.seed)  # identical initial weights on every rank
    model = build_model(config.model).to(device)
    contrastive = isinstance(model, ClipObjective)  # its loss is over the whole global batch (trainer.step)
    module = parallelize(model, config, world_size)
    optim = at_batch(config.optim, global_batch)  # the published rates, scaled to this run's global batch
    optimizer = build_optimizer(model, optim, fused=cfg_t.parallelism != "fsdp" or world_size == 1)
    resumed = checkpoint.resume(cfg_t.run_url, model, optimizer)
    start = resumed.step if resumed else 0
    meta = resumed.meta if resumed else {}
    forward = torch.compile(module) if cfg_t.compile else module

    loader = build_train_loader(config)
    if meta.get("loader_state"):
        loader.load_state_dict(meta["loader_state"])

    tracker = None
    run_id = meta.get("mlflow_run_id")
    flops = flops_per_sample(config.model)
    if rank == 0:
        # Before the first write: this entry point may be started without the CLI's preflight.
        checkpoint.claim_run(cfg_t.run_url)
        storage.write_text(storage.join(cfg_t.run_url, "config.yaml"), to_yaml(config))
        storage.remove(storage.join(cfg_t.run_url, DIVERGED))  # an earlier launch's record, written by us
        uri = config.tracking.uri or tracking.default_tracking_uri()
        try:
            run_id = tracking.start_or_resume_run(uri, config.tracking.experiment, run_id, config.name, _tags(config))
            tracker = tracking.Tracker(uri, run_id)
            if not resumed:
                tracker.log_params(config.flat() | {"flops_per_sample": flops, "optim.effective_lr": optim.lr})
        except Exception as err:  # tracking is never a reason not to train
            log.warning("MLflow unavailable (%s); training without tracking", err)
        where = f"step {start} from {resumed.url}" if resumed else "scratch"
        negatives = f", {global_batch} pairs per contrastive loss" if contrastive else ""
        print(f"[train] {config.name}: {world_size} rank(s) x {micro_steps} micro-batch(es), global batch "
              f"{global_batch}{negatives}, from {where}", flush=True)
        if config.optim.reference_batch:
            print(f"[train] lr {config.optim.lr:.3g} at batch {config.optim.reference_batch} -> {optim.lr:.3g} at "
                  f"batch {global_batch} ({config.optim.lr_scaling} scaling)", flush=True)

    saver = Saver(config, model, optimizer, rank)
    audit = SampleAudit(os.environ.get("MAECLIP_SAMPLE_AUDIT", ""), rank)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = _batches(loader)
    step, last_saved = start, start
    stopping = diverged = False
    window_start, data_wait = time.perf_counter(), 0.0
    while step < cfg_t.steps:
        torch.manual_seed(step_seed(cfg_t.seed, step, rank))
        lr = lr_at(step, optim, cfg_t.schedule_steps or cfg_t.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = []
        for _ in range(micro_steps):
            fetch_start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - fetch_start
            audit.record(step + 1, batch["key"])
            micro_batches.append({k: v.to(device, non_blocking=True) for k, v in batch.items()
                                  if isinstance(v, torch.Tensor)})
        totals = train_step(forward, micro_batches, gradient_sync(module), autocast, device, contrastive)
        # Checked every step, before the update: a diverged state is never stepped into, saved or resumed from.
        loss = totals["loss"].item()
        stopping, diverged = stop.agreed(not math.isfinite(loss))
        if diverged:
            if rank == 0:
                _record_divergence(config, step + 1, loss, last_saved)
            break
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if rank == 0 and (step % cfg_t.log_every == 0 or step == cfg_t.steps):
            elapsed = time.perf_counter() - window_start
            steps_in_window = step - max(start, step - cfg_t.log_every) or 1
            samples_per_s = steps_in_window * global_batch / elapsed
            metrics = {f"train/{k}": v.item() for k, v in totals.items()}
            if contrastive:  # what the loss contrasts each pair with: the global batch, accumulated or not
                metrics["train/contrastive_batch"] = global_batch
            metrics |= {
                "train/lr": lr,
                "train/samples_per_s": samples_per_s,
                "train/data_wait_frac": data_wait / elapsed,
            }
            metrics |= system_metrics(device)
            utilisation = mfu(samples_per_s, flops, _device_name(device), world_size)
            if utilisation is not None:
                metrics["train/mfu"] = utilisation
            if tracker:
                tracker.log_metrics(metrics, step)
            print(f"[train] step {step}/{cfg_t.steps} loss {metrics['train/loss']:.4f} lr {lr:.2e} "
                  f"{samples_per_s:.1f} samples/s", flush=True)
            window_start, data_wait = time.perf_counter(), 0.0

        if step % cfg_t.checkpoint_every == 0 or step == cfg_t.steps or stopping:
            saver.wait()  # the previous checkpoint commits before the next one starts
            seen = meta.get("samples_seen", 0) + (step - start) * global_batch  # the world size may have changed
            state = {"samples_seen": seen, "mlflow_run_id": run_id, "world_size": world_size,
                     "loader_state": loader.state_dict()}
            saver.save(step, state, final=step == cfg_t.steps or stopping)
            last_saved = step
        if stopping:
            break
    saver.wait()
    if stopping:
        _report_stopped(last_saved)

    if tracker:
        tracker.set_terminated("FAILED" if diverged else "FINISHED" if step >= cfg_t.steps else "KILLED")
        tracker.close()
    if rank == 0 and not diverged:
        print(f"[train] {'done' if step >= cfg_t.steps else 'stopped'} at step {last_saved}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__)
    parser.add_argument("--config", required=True, help="preset name or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    train(load_config(args.config, args.overrides))


if __name__ == "__main__":
    main(sys.argv[1:])

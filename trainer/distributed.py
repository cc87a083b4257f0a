"""The distributed set-up of a training run: the process group on torchrun's store, the model wrapped for DDP or
FSDP2, and the stop signal every rank agrees on. ``trainer.train`` runs the loop; this is what it stands on.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.config import Config
from trainer.models.vit import Block


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """torchrun's rendezvous store, namespaced by restart attempt.

    torch-elastic keeps one store for every restart of a job (dynamic_rendezvous shares its TCPStore across
    rounds), so without a namespace a restarted worker can read the address a dead peer published in the
    previous attempt and fail to connect, which ends the job after max_restarts.
    """
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_it, multi_tenant=True)
    return dist.PrefixStore(f"maeclip/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def setup_distributed() -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        rank = int(os.environ["RANK"])
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=_attempt_store(rank, world_size),
                                rank=rank, world_size=world_size)
    return (dist.get_rank() if dist.is_initialized() else 0), world_size, device


class StopSignal:
    """SIGTERM (preemption) seen by any rank, or a non-finite loss on any rank: every rank agrees to stop.

    Ranks receive the signal at different moments, and a loss can overflow on one rank only, so they agree
    through an all-reduce on a CPU (gloo) group, which costs no device synchronisation.
    """

    def __init__(self) -> None:
        self.received = False
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "received", True))
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def agreed(self, diverged: bool) -> tuple[bool, bool]:
        """(stop requested, diverged), each true when it is true on any rank."""
        flags = torch.tensor([int(self.received), int(diverged)])
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flags[0]), bool(flags[1])


def parallelize(model: torch.nn.Module, config: Config, world_size: int) -> torch.nn.Module:
    """The module the loop calls: DDP over replicas, or FSDP2 with each transformer block sharded."""
    if world_size > 1 and config.train.parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block)
        return fully_shard(model)
    if world_size > 1:
        return DistributedDataParallel(model)
    return model

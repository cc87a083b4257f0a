"""The TorchX training component: the torchrun command it builds and the retries it asks the scheduler for.
The Volcano job that maeclip renders from it is tests/test_cluster.py's."""

import shlex

from torchx.specs import RetryPolicy

from trainer.components import train


def _command(app) -> list[str]:
    return shlex.split(app.roles[0].args[1].removeprefix("exec "))


def test_local_component_runs_trainer_module_under_elastic_torchrun():
    app = train("tiny-clip", "optim.lr=0.002", "model.image_pool=gap", nnodes="1:2", nproc_per_node=2,
                max_restarts=5)
    command = _command(app)
    assert app.roles[0].args[1].startswith("exec ")  # the agent is the pod's first process
    assert command[:5] == ["python", "-m", "trainer.agent", "--max-restarts", "5"]
    assert command[command.index("--nnodes") + 1] == "1:2"
    assert command[command.index("--nproc_per_node") + 1] == "2"
    tail = command[command.index("trainer.train") - 1:]
    assert tail == ["-m", "trainer.train", "--config", "tiny-clip", "--set", "optim.lr=0.002",
                    "--set", "model.image_pool=gap"]


def test_scheduler_retries_restart_the_whole_job_apart_from_torchruns_restarts():
    local = train("tiny-clip", nnodes="1", nproc_per_node=1).roles[0]
    assert local.max_retries == 0  # local_cwd: this machine's processes, never resubmitted
    role = train("tiny-clip", nnodes="2:4", nproc_per_node=8, max_restarts=2, max_retries=5).roles[0]
    assert (role.max_retries, role.retry_policy) == (5, RetryPolicy.APPLICATION)
    assert _command(train("tiny-clip", max_restarts=2, max_retries=5))[3:5] == ["--max-restarts", "2"]

"""Build, compile, run locally or submit the kfp pipelines: what ``maeclip pipeline`` and the demo call."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from typing import TextIO

from pipelines.exit_codes import UsageError
from pipelines.progress import TaskLog

PIPELINES = ("train_eval", "study")


class PipelineFailed(RuntimeError):
    """A pipeline run (local, or submitted) ended in a state other than success."""


def build_pipeline(name: str, segments: int):
    """The pipeline ``name`` with ``segments`` gated training segments per chain."""
    if not 1 <= segments <= 1000:
        raise UsageError(f"--segments: {segments} is not within 1..1000")
    if name == "train_eval":
        from pipelines.train_eval import make_train_eval

        return make_train_eval(segments)
    if name == "study":
        from pipelines.study import make_study

        return make_study(segments)
    raise UsageError(f"unknown pipeline '{name}' (pipelines: {', '.join(PIPELINES)})")


def run_local_pipeline(name: str = "train_eval", segments: int = 2, pipeline_root: str = ".maeclip/kfp",
                       verbose: bool = False, out: TextIO | None = None, **arguments) -> str:
    """Run a pipeline with kfp's local SubprocessRunner in this interpreter (no network); return its output.

    Unless ``verbose``, each task is one line as it starts and one as it ends on ``out`` (stdout), with the
    training step lines and a study's progress; the tasks' whole output goes to ``<pipeline_root>/../logs/``
    (``pipelines.progress``). A failed task raises PipelineFailed, naming its log.

    kfp.local runs two ParallelFor iterations at a time (its executor's cap), so each study variant gets half
    the cores: two torch processes that each spin up a thread per core ran 10× slower on 2 cores.
    """
    import kfp.local

    if name == "study":
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    # Said once per task: the image placeholder and accelerator settings only matter on a cluster.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner", category=UserWarning)
    pipeline = build_pipeline(name, segments)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=os.path.abspath(pipeline_root))
    if verbose:
        return pipeline(**arguments).output
    stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = os.path.join(os.path.dirname(os.path.abspath(pipeline_root)), "logs", stamp)
    tasks = TaskLog(logs, out, variants=len(arguments.get("variants") or []))
    try:
        with tasks.installed():
            return pipeline(**arguments).output
    except RuntimeError as err:
        if not tasks.failed:
            raise
        who, log = tasks.failed[-1]
        raise PipelineFailed(f"task {who} failed; its log: {log}") from err


def compile_pipeline(out: str, name: str = "train_eval", segments: int = 2) -> str:
    """Compile to kfp IR YAML at the path ``out``, which must not exist yet (we overwrite nothing)."""
    from kfp import compiler

    if os.path.exists(out):
        raise UsageError(f"--out: {out} already exists (choose a new file name)")
    if not out.endswith((".yaml", ".yml", ".json")):
        raise UsageError(f"--out: {out} must end in .yaml, .yml or .json (kfp picks the format by it)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UsageError(f"--out: the folder of {out} does not exist")
    compiler.Compiler().compile(build_pipeline(name, segments), package_path=out)
    return out


def submit_pipeline(host: str, name: str, segments: int, arguments: dict, *, experiment: str | None = None,
                    service_account: str | None = None, wait_s: float | None = None, poll_s: float = 10.0) -> dict:
    """Compile and submit a run to a Kubeflow Pipelines host; with ``wait_s``, wait for it to finish.

    Returns ``{"run_id", "state"}``; a run that does not succeed raises PipelineFailed.
    """
    import kfp

    with warnings.catch_warnings():  # an advisory that this client needs a v2 server, which we submit to
        warnings.filterwarnings("ignore", message="This client only works", category=FutureWarning)
        client = kfp.Client(host=host)
    with tempfile.TemporaryDirectory() as folder:
        package = compile_pipeline(os.path.join(folder, f"{name}.yaml"), name, segments)
        result = client.create_run_from_pipeline_package(
            package, arguments=arguments, experiment_name=experiment, service_account=service_account,
            run_name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    state = None
    if wait_s is not None:
        state = client.wait_for_run_completion(result.run_id, timeout=wait_s, sleep_duration=poll_s).state
        if state.lower() != "succeeded":
            raise PipelineFailed(f"pipeline run {result.run_id} ended {state}")
    return {"run_id": result.run_id, "state": state}

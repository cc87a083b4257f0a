"""``maeclip``: one command line for data, training, evaluation, gating, pipelines and the demo.

Every check that can fail before a job starts (config keys and values, storage URLs, an empty or missing
dataset) runs first. Exit statuses: 0 success; 2 bad input (one line, nothing launched); 3 the gate rejected
the checkpoint; 1 the job could not finish (infrastructure, or a diverged training run), one line with the
cause and the traceback only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import typing
import warnings
from collections.abc import Sequence
from typing import Any

from trainer import storage
from trainer.config import ConfigError, load_config, normalize_url

INFRASTRUCTURE_FAILURE, USAGE_ERROR, GATE_REJECTED = 1, 2, 3


class UsageError(Exception):
    """A problem with what the user asked for; reported on one line with exit status 2."""


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the run's checkpoints end before that step."""


class GateRejected(Exception):
    """The gate's decision was "no"; the decision line is already printed (exit status 3)."""


def _data_errors() -> tuple[type[BaseException], ...]:
    from evaluators.gate import PolicyError
    from trainer.checkpoint import CheckpointRefused
    from trainer.data.loader import DataError

    return (ConfigError, DataError, UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            storage.NotWritable, PolicyError, CheckpointRefused)


# ---------------------------------------------------------------------------------------------------------
# Functions shared by the CLI and the kfp components.


def preflight(preset: str, overrides: Sequence[str]):
    """Validate the config, the dataset, the run URL and the checkpoint training would resume from; return
    the resolved Config. A tampered checkpoint raises CheckpointRefused here, before anything is launched."""
    from trainer.checkpoint import committed_checkpoints, verify_checkpoint
    from trainer.data.loader import dataset_size

    config = load_config(preset, overrides)
    dataset_size(storage.join(config.data.url, "train"))
    storage.check_writable(config.train.run_url)
    # Newest first, as resume tries them: one with a file missing is skipped there too, a refused one is not.
    for _, url in reversed(committed_checkpoints(config.train.run_url)):
        try:
            verify_checkpoint(url)
        except FileNotFoundError:
            continue
        break
    return config


# TorchX's kubernetes scheduler submits Volcano jobs; queue and namespace are k8s/base's.
KUBERNETES_CFG = {"queue": "maeclip", "namespace": "maeclip"}


def run_training(
    preset: str,
    overrides: Sequence[str] = (),
    *,
    nnodes: str = "1",
    nproc_per_node: int = 2,
    scheduler: str = "local_cwd",
    image: str | None = None,
) -> str:
    """Preflight, launch through TorchX, wait; return the newest committed checkpoint URL.

    On ``kubernetes`` each process gets a GPU (``nproc_per_node`` GPUs per node) and the job runs ``image``.
    """
    from trainer.checkpoint import latest_checkpoint
    from trainer.components import DEFAULT_IMAGE
    from trainer.launch import check_launch, launch_training
    from trainer.train import read_divergence

    # Launch arguments before preflight: a bad one is reported without reading the dataset or the run URL.
    check_launch(load_config(preset, overrides), nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler)
    config = preflight(preset, overrides)
    env = {}
    if config.tracking.uri:
        env["MLFLOW_TRACKING_URI"] = config.tracking.uri
    on_cluster = scheduler == "kubernetes"
    launch_training(preset, list(overrides), nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler,
                    scheduler_cfg=KUBERNETES_CFG if on_cluster else None, env=env, image=image or DEFAULT_IMAGE,
                    gpus=nproc_per_node if on_cluster else 0)
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
        raise UsageError(f"segment {segment} is not within 1..{segments}")
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
    image: str | None = None,
) -> str:
    """Train to the end of one segment (resuming from the run's newest checkpoint); return that checkpoint."""
    train = load_config(preset, overrides).train
    end = segment_end(train.steps, segment, segments)
    schedule = train.schedule_steps or train.steps  # one warmup + cosine over the whole run, not per segment
    return run_training(preset, [*overrides, f"train.steps={end}", f"train.schedule_steps={schedule}"],
                        nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler, image=image)


PIPELINES = ("train_eval", "study")


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
                       **arguments) -> str:
    """Run a pipeline with kfp's local SubprocessRunner in this interpreter (no network); return its output.

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
    return pipeline(**arguments).output


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


class PipelineFailed(RuntimeError):
    """A submitted pipeline run ended in a state other than SUCCEEDED."""


def submit_pipeline(host: str, name: str, segments: int, arguments: dict, *, experiment: str | None = None,
                    service_account: str | None = None, wait_s: float | None = None, poll_s: float = 10.0) -> dict:
    """Compile and submit a run to a Kubeflow Pipelines host; with ``wait_s``, wait for it to finish.

    Returns ``{"run_id", "state"}``; a run that does not succeed raises PipelineFailed.
    """
    import tempfile

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


# ---------------------------------------------------------------------------------------------------------
# Subcommands.


def _cmd_data_shapes(args: argparse.Namespace) -> None:
    from trainer.data.shapes import write_shapes

    out = normalize_url(args.out, "--out")
    if args.n < 1 or args.n_eval < 1:
        raise UsageError("--n and --n-eval must be at least 1")
    manifest = write_shapes(out, n_train=args.n, n_eval=args.n_eval, seed=args.seed)
    print(json.dumps({"url": out, "counts": manifest.get("counts", manifest.get("splits"))}))


def ingest_source(src: str, out: str, *, on_error: str = "skip", workers: int = 1, **options: Any) -> dict[str, Any]:
    """Ingest ``src`` into the corpus at ``out`` (``options``: ``IngestOptions`` fields); return its summary.

    What ``maeclip data ingest`` and the pipelines' ``ingest_corpus`` step both run.
    """
    from trainer.data.ingest import IngestOptions, ingest

    out = normalize_url(out, "--out")
    if options.get("allowed_prefixes"):  # bare paths become file:// URLs, as SRC and --out do
        options["allowed_prefixes"] = tuple(normalize_url(p, "--allow-prefix") for p in options["allowed_prefixes"])
    manifest = ingest(normalize_url(src, "SRC"), out, IngestOptions(**options), on_error=on_error, workers=workers)
    return {"url": out, "counts": manifest["counts"], "splits": manifest["splits"]}


def _cmd_data_ingest(args: argparse.Namespace) -> None:
    options = {key: getattr(args, key) for key in ("format", "split", "resize", "jpeg_quality", "max_pixels",
                                                     "image_column", "caption_column", "key_column",
                                                     "caption_template", "max_image_bytes", "max_caption_bytes",
                                                     "duplicate_keys")}
    options["allowed_prefixes"] = tuple(args.allow_prefix)
    print(json.dumps(ingest_source(args.src, args.out, on_error=args.on_error, workers=args.workers, **options)))


def _cmd_train(args: argparse.Namespace) -> None:
    print(run_training(args.config, args.overrides, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                       scheduler=args.scheduler))


def _resolve_checkpoint(url: str) -> str:
    from trainer.checkpoint import COMMITTED, latest_checkpoint

    url = normalize_url(url, "--checkpoint")
    if storage.exists(storage.join(url, COMMITTED)):
        return url
    latest = latest_checkpoint(url)  # a run URL: its newest committed checkpoint
    if latest is None:
        raise UsageError(f"no committed checkpoint at {url}")
    return latest


def _cmd_eval(args: argparse.Namespace) -> None:
    from evaluators.suite import SUITES, SuiteOptions, run_suite

    if args.suite not in SUITES:
        raise UsageError(f"unknown suite '{args.suite}' (suites: {', '.join(SUITES)})")
    if not 1 <= args.batch_size <= 1 << 16:
        raise UsageError(f"--batch-size: {args.batch_size} is not within 1..65536")
    options = SuiteOptions(batch_size=args.batch_size)
    if args.watch:
        from evaluators.watch import watch

        run_url = normalize_url(args.checkpoint, "--checkpoint")
        for url, metrics in watch(run_url, args.suite, tracking_uri=args.tracking_uri, options=options,
                                  poll_s=args.poll_s, timeout_s=args.timeout_s):
            print(json.dumps({"checkpoint": url, "metrics": metrics}), flush=True)
        return
    metrics = run_suite(_resolve_checkpoint(args.checkpoint), args.suite, tracking_uri=args.tracking_uri,
                        options=options)
    print(json.dumps(metrics, indent=1))


def _cmd_gate(args: argparse.Namespace) -> None:
    from evaluators.gate import load_policy, run_gate
    from trainer.checkpoint import verify_checkpoint
    from trainer.tracking import default_tracking_uri

    checkpoint = _resolve_checkpoint(args.checkpoint)
    if not storage.exists(storage.join(checkpoint, "metrics.json")):
        raise UsageError(f"no metrics.json at {checkpoint}: run `maeclip eval --checkpoint URL` first")
    policy = load_policy(args.policy)
    config, _ = verify_checkpoint(checkpoint)
    uri = args.tracking_uri or config.tracking.uri or default_tracking_uri()
    decision = run_gate(checkpoint, policy, model_name=args.model_name, tracking_uri=uri,
                        register=not args.no_register)
    print(decision.to_json())
    if not decision.passed:
        raise GateRejected


def _cmd_export(args: argparse.Namespace) -> None:
    from trainer.export import ExportError, export_open_clip

    out = normalize_url(args.out, "--out")
    try:
        print(export_open_clip(_resolve_checkpoint(args.checkpoint), out))
    except ExportError as err:  # an existing --out, or a model open_clip cannot hold: bad input
        raise UsageError(str(err)) from err


def _policy(path: str | None) -> dict | None:
    """The gate policy file as the pipeline's ``gate_policy`` mapping (validated first), or None for the default."""
    if path is None:
        return None
    from evaluators.gate import load_policy

    return load_policy(path).to_dict()


def _pipeline_arguments(args: argparse.Namespace, local: bool) -> dict:
    """Pipeline parameters from the command line; unset ones keep the pipeline's defaults.

    Local runs get a fresh run URL and the embedded MLflow store; on a cluster the components fall back to
    ``$MLFLOW_TRACKING_URI`` of their pods.
    """
    from trainer.tracking import default_tracking_uri

    preset = args.preset or ("tiny-{objective}" if args.pipeline == "study" else "tiny-clip")
    objectives, pools = args.objectives or ["clip", "maeclip"], args.pools or ["cls", "gap"]
    if args.pipeline == "study":  # every grid point's config must load: fail here, before kfp starts anything
        for objective in objectives:
            for pool in pools:
                load_config(preset.format(objective=objective), [*args.overrides, f"model.image_pool={pool}"])
    config = load_config(preset.format(objective=objectives[0]), args.overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    given = {
        "overrides": list(args.overrides),
        "data_url": normalize_url(args.data_url, "--data-url") if args.data_url else config.data.url,
        "tracking_uri": args.tracking_uri or (config.tracking.uri or default_tracking_uri() if local else None),
        "nnodes": args.nnodes, "nproc_per_node": args.nproc_per_node, "scheduler": args.scheduler,
        "suite": args.suite, "gate_policy": _policy(args.policy), "n_train": args.n_train, "n_eval": args.n_eval,
    }
    if args.pipeline == "study":
        from pipelines.study import grid

        name = args.study_name or f"study-{stamp}"
        given |= {"preset_pattern": preset, "study_name": name, "experiment": name,
                  "runs_url": normalize_url(args.run_url or f".maeclip/runs/{name}", "--run-url"),
                  "variants": grid(objectives, pools, args.seeds or [0])}
    else:
        given |= {"preset": preset,
                  "run_url": normalize_url(args.run_url or f".maeclip/runs/{config.name}-{stamp}", "--run-url")}
    return {k: v for k, v in given.items() if v is not None}


def _cmd_pipeline(args: argparse.Namespace) -> None:
    if args.action == "compile":
        print(compile_pipeline(args.out or f"{args.pipeline}.yaml", args.pipeline, args.segments))
    elif args.action == "run":
        if not args.local:
            raise UsageError("pipeline run needs --local (use `pipeline submit --host URL` for a cluster)")
        print(run_local_pipeline(args.pipeline, args.segments, **_pipeline_arguments(args, local=True)))
    else:
        if not args.host:
            raise UsageError("pipeline submit needs --host URL (the Kubeflow Pipelines API endpoint)")
        try:
            print(json.dumps(submit_pipeline(args.host, args.pipeline, args.segments,
                                             _pipeline_arguments(args, local=False), experiment=args.experiment,
                                             service_account=args.service_account,
                                             wait_s=args.timeout_s if args.wait else None, poll_s=args.poll_s)))
        except PipelineFailed as err:
            print(f"maeclip: error: {err}", file=sys.stderr)
            sys.exit(1)


# The demo fits 10 minutes on 2 CPU cores: a 2-segment train_eval of tiny-clip, then the 2 x 2 mini-study with
# shorter, single-process variants (step counts measured in README's Results).
DEMO_TRAIN = ["train.steps=200", "optim.warmup_steps=20"]
DEMO_STUDY = ["train.steps=60", "optim.warmup_steps=10", "data.num_workers=1"]


def _cmd_demo(args: argparse.Namespace) -> None:
    from trainer.tracking import default_tracking_uri

    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config = load_config(args.preset, [*DEMO_TRAIN, *args.overrides])
    uri = config.tracking.uri or default_tracking_uri()
    run_url = normalize_url(f".maeclip/runs/{config.name}-{stamp}")
    data_url = normalize_url(config.data.url)
    print(f"[demo] train_eval: shapes corpus → 2 × (train → zero-shot eval → gate) → register ({run_url})",
          flush=True)
    record = json.loads(run_local_pipeline("train_eval", 2, preset=args.preset,
                                           overrides=[*DEMO_TRAIN, *args.overrides], data_url=data_url,
                                           run_url=run_url, tracking_uri=uri, nproc_per_node=2))
    _print_chain(run_url, record)
    name = f"demo-study-{stamp}"
    print(f"\n[demo] study {name}: (clip, maeclip) × (cls, gap), 1 seed, each a gated chain", flush=True)
    table = run_local_pipeline("study", 1, preset_pattern="tiny-{objective}", overrides=DEMO_STUDY,
                               data_url=data_url, runs_url=normalize_url(f".maeclip/runs/{name}"),
                               tracking_uri=uri, experiment=name, study_name=name, nproc_per_node=1)
    print(f"\n[demo] finished in {time.time() - started:.0f} s\n\n{table}")
    print(f"\nOpen the MLflow UI on these runs:\n  .venv/bin/mlflow ui --backend-store-uri {uri}")


def _print_chain(run_url: str, record: dict) -> None:
    """Each segment's checkpoint, its gate marker and zero-shot metrics, and what was registered."""
    from evaluators.report import read_metrics
    from trainer.checkpoint import committed_checkpoints

    print(f"\n{'checkpoint':16s} {'gate':9s} metrics")
    for step, url in committed_checkpoints(run_url):
        gate = next((m for m in ("PROMOTED", "REJECTED") if storage.exists(storage.join(url, m))), "-")
        shown = {k.removeprefix("eval/zeroshot/"): round(v, 3)
                 for k, v in read_metrics(url)["metrics"].items() if k.endswith("top1")}
        print(f"step {step:<11d} {gate:9s} {shown}")
    decision = record["decision"]
    if decision is None:
        print("registered: nothing (no segment passed the gate)")
    elif decision["passed"]:
        registry = decision["registry"]
        print(f"registered: {registry['model']} version {registry['version']} as {', '.join(registry['aliases'])} "
              f"({record['checkpoint']})")
    else:
        print(f"not registered ({record['checkpoint']}): {'; '.join(decision['reasons'])}")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``maeclip: error: ...``) and exit status 2, as every other
    bad input; subcommand parsers are of the same class."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"maeclip: error: {self.prog.removeprefix('maeclip ')}: {_one_line(message)} "
              f"(see {self.prog} --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maeclip", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build corpora").add_subparsers(dest="data_command", required=True)
    shapes = data.add_parser("shapes", help="write the synthetic shapes corpus as MDS")
    shapes.add_argument("--out", required=True, help="corpus URL (file://, gs://, s3://)")
    shapes.add_argument("--n", type=int, default=4096, help="training samples")
    shapes.add_argument("--n-eval", type=int, default=512, help="evaluation samples")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.set_defaults(func=_cmd_data_shapes)
    ingest = data.add_parser("ingest", help="convert webdataset tars, parquet, CSV or image folders to MDS")
    ingest.add_argument("src", help="source folder or file (path, file://, gs://, s3://)")
    ingest.add_argument("--format", required=True, choices=["webdataset", "parquet", "csv", "imagefolder"])
    ingest.add_argument("--out", required=True, help="corpus URL; samples go to OUT/SPLIT")
    ingest.add_argument("--split", default="train")
    ingest.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    ingest.add_argument("--resize", type=int, default=256, help="shorter side in px (0 keeps images as stored)")
    ingest.add_argument("--jpeg-quality", type=int, default=90)
    ingest.add_argument("--max-pixels", type=int, default=89_478_485, help="larger images are skipped")
    ingest.add_argument("--image-column", default="image")
    ingest.add_argument("--caption-column", default="caption")
    ingest.add_argument("--key-column", default="key")
    ingest.add_argument("--caption-template", default="a photo of a {class}.", help="imagefolder captions")
    ingest.add_argument("--max-image-bytes", type=int, default=32 << 20, help="larger encoded images are skipped")
    ingest.add_argument("--max-caption-bytes", type=int, default=16 << 10, help="longer captions are skipped")
    ingest.add_argument("--allow-prefix", action="append", default=[], metavar="URL",
                        help="a storage prefix that table cells may name images under, besides the source "
                             "(repeatable; other paths and URLs are skipped as forbidden_path)")
    ingest.add_argument("--duplicate-keys", choices=["skip", "suffix"], default="skip",
                        help="a key seen earlier in the split: skip the sample, or store it as KEY-dupN")
    ingest.add_argument("--workers", type=int, default=1, help="input shards converted in parallel")
    ingest.set_defaults(func=_cmd_data_ingest)

    def add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", "--preset", dest="config", required=required, default="tiny-clip",
                       help="preset name or YAML path")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    train = sub.add_parser("train", help="launch training through TorchX")
    add_config_args(train)
    train.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for elastic")
    train.add_argument("--nproc-per-node", type=int, default=2)
    train.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler (local_cwd, kubernetes)")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint (or a run's newest one)")
    evaluate.add_argument("--checkpoint", required=True,
                          help="a checkpoint, or a run URL (its newest; with --watch: each one)")
    evaluate.add_argument("--suite", default="default", help="quick (zero-shot), default, full")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--watch", action="store_true",
                          help="evaluate each new COMMITTED checkpoint of the run until training is done")
    evaluate.add_argument("--poll-s", type=float, default=30.0, help="--watch: seconds between looks")
    evaluate.add_argument("--timeout-s", type=float, default=None, help="--watch: give up after this long")
    evaluate.add_argument("--tracking-uri", default=None)
    evaluate.set_defaults(func=_cmd_eval)

    gate = sub.add_parser("gate", help="gate a checkpoint's metrics against a policy")
    gate.add_argument("--checkpoint", required=True)
    gate.add_argument("--policy", required=True, help="YAML or JSON policy file")
    gate.add_argument("--model-name", default="maeclip", help="registered model of the passing checkpoints")
    gate.add_argument("--tracking-uri", default=None, help="MLflow tracking and registry URI")
    gate.add_argument("--no-register", action="store_true",
                      help="thresholds and finiteness only: no champion comparison, no registration")
    gate.set_defaults(func=_cmd_gate)

    export = sub.add_parser("export", help="write a CLIP checkpoint's weights as an open_clip state dict")
    export.add_argument("--checkpoint", required=True, help="a checkpoint, or a run URL (its newest)")
    export.add_argument("--out", required=True, help="output .safetensors path or URL (never overwritten)")
    export.set_defaults(func=_cmd_export)

    pipeline = sub.add_parser("pipeline", help="compile, run locally or submit a kfp pipeline")
    pipeline.add_argument("action", choices=["compile", "run", "submit"])
    pipeline.add_argument("--pipeline", choices=PIPELINES, default="train_eval")
    pipeline.add_argument("--segments", type=int, default=2, help="gated training segments per chain (K)")
    pipeline.add_argument("--out", default=None, help="compile: output YAML (default PIPELINE.yaml)")
    pipeline.add_argument("--local", action="store_true", help="run: with kfp.local and TorchX local_cwd")
    pipeline.add_argument("--host", default=None, help="submit: Kubeflow Pipelines API URL")
    pipeline.add_argument("--experiment", default=None, help="submit: Kubeflow Pipelines experiment")
    pipeline.add_argument("--service-account", default=None, help="submit: service account of the run's pods")
    pipeline.add_argument("--wait", action="store_true", help="submit: wait until the run finishes")
    pipeline.add_argument("--timeout-s", type=float, default=24 * 3600, help="submit --wait: give up after")
    pipeline.add_argument("--poll-s", type=float, default=10.0, help="submit --wait: seconds between looks")
    pipeline.add_argument("--data-url", default=None, help="corpus URL (default: the preset's)")
    pipeline.add_argument("--run-url", default=None,
                          help="train_eval: the run URL; study: the folder of the variants' runs")
    pipeline.add_argument("--tracking-uri", default=None, help="MLflow tracking and registry URI")
    pipeline.add_argument("--scheduler", default=None, help="TorchX scheduler (local_cwd, kubernetes)")
    pipeline.add_argument("--nnodes", default=None, help="nodes, or MIN:MAX for elastic")
    pipeline.add_argument("--nproc-per-node", type=int, default=None, help="processes (GPUs) per node")
    pipeline.add_argument("--suite", default=None, help="evaluation suite after each segment")
    pipeline.add_argument("--policy", default=None, help="gate policy YAML/JSON (default: colour top-1 ≥ 0.3)")
    pipeline.add_argument("--n-train", type=int, default=None, help="shapes corpus training samples")
    pipeline.add_argument("--n-eval", type=int, default=None, help="shapes corpus evaluation samples")
    pipeline.add_argument("--objectives", nargs="+", default=None, help="study: objectives")
    pipeline.add_argument("--pools", nargs="+", default=None, help="study: image poolings")
    pipeline.add_argument("--seeds", nargs="+", type=int, default=None, help="study: seeds")
    pipeline.add_argument("--study-name", default=None, help="study: name and MLflow experiment")
    pipeline.add_argument("--config", "--preset", dest="config", default=None,
                          help="preset (study: a pattern such as tiny-{objective})")
    pipeline.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pipeline.set_defaults(func=_cmd_pipeline, preset=None)

    demo = sub.add_parser("demo", help="the whole pipeline locally on the embedded defaults")
    add_config_args(demo, required=False)
    demo.set_defaults(func=_cmd_demo)
    return parser


def _one_line(err: BaseException) -> str:
    """An error as one bounded line: servers and libraries put newlines and whole responses in messages."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:400] + "…"


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) is not None:
        args.preset = args.config
    try:
        args.func(args)
    except _data_errors() as err:
        print(f"maeclip: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except GateRejected:
        sys.exit(GATE_REJECTED)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:  # storage, tracking, a failed job: what broke, on one line
        if args.verbose:
            traceback.print_exc()
        print(f"maeclip: error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        sys.exit(INFRASTRUCTURE_FAILURE)


if __name__ == "__main__":
    main()

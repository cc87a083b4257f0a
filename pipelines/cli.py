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
from collections.abc import Sequence

from pipelines.exit_codes import (
    GATE_REJECTED,
    INFRASTRUCTURE_FAILURE,
    USAGE_ERROR,
    GateRejected,
    UsageError,
    bad_input_errors,
)
from pipelines.runner import PIPELINES, PipelineFailed, compile_pipeline, run_local_pipeline, submit_pipeline
from trainer import storage
from trainer.config import load_config, normalize_url

# ---------------------------------------------------------------------------------------------------------
# Subcommands.


def _cmd_data_shapes(args: argparse.Namespace) -> None:
    from trainer.data.shapes import write_shapes

    out = normalize_url(args.out, "--out")
    if args.n < 1 or args.n_eval < 1:
        raise UsageError("--n and --n-eval must be at least 1")
    manifest = write_shapes(out, n_train=args.n, n_eval=args.n_eval, seed=args.seed)
    print(json.dumps({"url": out, "counts": manifest.get("counts", manifest.get("splits"))}))


def _cmd_data_ingest(args: argparse.Namespace) -> None:
    options = {key: getattr(args, key) for key in ("format", "split", "resize", "jpeg_quality", "max_pixels",
                                                     "image_column", "caption_column", "key_column",
                                                     "caption_template", "max_image_bytes", "max_caption_bytes",
                                                     "duplicate_keys")}
    options["allowed_prefixes"] = tuple(args.allow_prefix)
    from trainer.data.ingest import ingest_source

    print(json.dumps(ingest_source(args.src, args.out, on_error=args.on_error, workers=args.workers, **options)))


# The flags of a Kubernetes training job (trainer.cluster.Cluster), by their setting names. `pipeline` has all
# but the service account: its --service-account is the pipeline run's, and training pods keep maeclip-trainer.
TRAIN_CLUSTER_FLAGS = ("image", "namespace", "queue", "service_account", "priority_class", "cpu", "memory_mb",
                       "gpus", "shm_mb", "max_retries")
PIPELINE_CLUSTER_FLAGS = tuple(name for name in TRAIN_CLUSTER_FLAGS if name != "service_account")


def _cluster_settings(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """The cluster flags ``names`` that were given, as ``Cluster.from_dict`` takes them."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _cmd_train(args: argparse.Namespace) -> None:
    import yaml

    from trainer.cluster import Cluster
    from trainer.launch import dryrun_training, run_training

    settings = _cluster_settings(args, TRAIN_CLUSTER_FLAGS)
    if args.scheduler != "kubernetes" and (settings or args.dryrun):
        given = "--dryrun" if args.dryrun else "--" + next(iter(settings)).replace("_", "-")
        raise UsageError(f"{given} applies to --scheduler kubernetes; {args.scheduler} runs on this machine")
    cluster = Cluster.from_dict(settings)
    if args.dryrun:  # what would be submitted, and nothing is
        print(yaml.safe_dump(dryrun_training(args.config, args.overrides, nnodes=args.nnodes,
                                             nproc_per_node=args.nproc_per_node, cluster=cluster), sort_keys=False),
              end="")
        return
    print(run_training(args.config, args.overrides, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node,
                       scheduler=args.scheduler, cluster=cluster))


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

    suite = args.suite or (None if args.tasks else "default")
    if suite is not None and suite not in SUITES:
        raise UsageError(f"unknown suite '{suite}' (suites: {', '.join(SUITES)})")
    if not 1 <= args.batch_size <= 1 << 16:
        raise UsageError(f"--batch-size: {args.batch_size} is not within 1..65536")
    options = SuiteOptions(batch_size=args.batch_size)
    if args.watch:
        from evaluators.watch import watch

        if args.tasks:
            raise UsageError("--watch runs a suite on each new checkpoint; run --tasks on the checkpoints it scored")
        run_url = normalize_url(args.checkpoint, "--checkpoint")
        for url, metrics in watch(run_url, suite, tracking_uri=args.tracking_uri, options=options,
                                  poll_s=args.poll_s, timeout_s=args.timeout_s):
            print(json.dumps({"checkpoint": url, "metrics": metrics}), flush=True)
        return
    root = normalize_url(args.root, "--root") if args.root else ""
    metrics = run_suite(_resolve_checkpoint(args.checkpoint), suite, tasks=args.tasks, root=root,
                        tracking_uri=args.tracking_uri, options=options)
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
    ``$MLFLOW_TRACKING_URI`` of their pods. A study is planned here, so every variant's config is validated
    (and a study without its baseline refused) before kfp starts anything.
    """
    from trainer.cluster import Cluster
    from trainer.tracking import default_tracking_uri

    study = args.pipeline == "study"
    preset = args.preset or ("tiny-{arm}" if study else "tiny-clip")
    config = load_config(preset.format(arm="clip"), args.overrides)
    data_url = normalize_url(args.data_url, "--data-url") if args.data_url else config.data.url
    if local:  # what the corpus step would refuse, before any step starts (the URL is reachable from here)
        from trainer.data.corpus import check_corpus_target

        check_corpus_target(args.corpus, data_url)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cluster = _cluster_settings(args, PIPELINE_CLUSTER_FLAGS)
    Cluster.from_dict(cluster)  # a bad setting is refused here, before kfp starts anything
    image = cluster.pop("image", None)  # the pipeline's image parameter: its steps and the training job run it
    given = {
        "corpus": args.corpus, "data_url": data_url, "source_url": args.source_url,
        "source_format": args.source_format,
        "tracking_uri": args.tracking_uri or (config.tracking.uri or default_tracking_uri() if local else None),
        "nnodes": args.nnodes, "nproc_per_node": args.nproc_per_node, "scheduler": args.scheduler,
        "n_train": args.n_train, "n_eval": args.n_eval, "image": image,
    }
    if study:
        from pipelines.study import plan_study

        name = args.study_name or f"study-{stamp}"
        runs_url = normalize_url(args.run_url or f".maeclip/runs/{name}", "--run-url")
        try:
            variants = plan_study(args.arms or ["clip", "maeclip"], args.pools or ["cls", "gap"],
                                  args.data_sizes or [0], args.seeds or [0], preset_pattern=preset,
                                  overrides=list(args.overrides), runs_url=runs_url, experiment=name,
                                  model_name="maeclip-study", suite=args.suite or "", policy=_policy(args.policy),
                                  cluster=cluster)
        except ValueError as err:
            raise UsageError(str(err)) from err
        given |= {"study_name": name, "experiment": name, "runs_url": runs_url, "variants": variants}
    else:
        from evaluators.policies import policy_for, suite_for

        objective = config.model.objective  # mae and m3ae are gated on probes, the others zero-shot
        given |= {"preset": preset, "overrides": list(args.overrides), "suite": args.suite or suite_for(objective),
                  "gate_policy": _policy(args.policy) or policy_for(objective), "cluster": cluster or None,
                  "run_url": normalize_url(args.run_url or f".maeclip/runs/{config.name}-{stamp}", "--run-url")}
    return {k: v for k, v in given.items() if v is not None}


def _cmd_pipeline(args: argparse.Namespace) -> None:
    if args.action == "compile":
        print(compile_pipeline(args.out or f"{args.pipeline}.yaml", args.pipeline, args.segments))
    elif args.action == "run":
        if not args.local:
            raise UsageError("pipeline run needs --local (use `pipeline submit --host URL` for a cluster)")
        print(run_local_pipeline(args.pipeline, args.segments, verbose=args.verbose,
                                 **_pipeline_arguments(args, local=True)))
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
                                           run_url=run_url, tracking_uri=uri, nproc_per_node=2,
                                           verbose=args.verbose))
    _print_chain(run_url, record)
    name = f"demo-study-{stamp}"
    runs_url = normalize_url(f".maeclip/runs/{name}")
    print(f"\n[demo] study {name}: matched arms (clip, maeclip) × (cls, gap), 1 seed, every variant trained "
          "alike", flush=True)
    from pipelines.study import plan_study

    variants = plan_study(["clip", "maeclip"], ["cls", "gap"], [0], [0], preset_pattern="tiny-{arm}",
                          overrides=DEMO_STUDY, runs_url=runs_url, experiment=name, model_name="maeclip-demo")
    table = run_local_pipeline("study", 1, variants=variants, data_url=data_url, runs_url=runs_url,
                               tracking_uri=uri, experiment=name, study_name=name, nproc_per_node=1,
                               verbose=args.verbose)
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
    parser.add_argument("--verbose", action="store_true",
                        help="stream every pipeline task's whole output; print the traceback of a failure")
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

    def add_cluster_args(p: argparse.ArgumentParser) -> None:
        """Where and with what a Kubernetes training job runs; unset: k8s/base's names, resources derived from
        --nproc-per-node and data.num_workers (k8s/README.md, "Training pods")."""
        p.add_argument("--image", default=None, help="kubernetes: image of the training job")
        p.add_argument("--namespace", default=None, help="kubernetes: namespace (default maeclip)")
        p.add_argument("--queue", default=None, help="kubernetes: Volcano queue (default maeclip)")
        p.add_argument("--priority-class", default=None, help="kubernetes: maeclip-train or maeclip-study")
        p.add_argument("--cpu", type=int, default=None, help="kubernetes: CPUs per pod")
        p.add_argument("--memory-mb", type=int, default=None, help="kubernetes: memory per pod, MB (with /dev/shm)")
        p.add_argument("--gpus", type=int, default=None, help="kubernetes: GPUs per pod (default --nproc-per-node)")
        p.add_argument("--shm-mb", type=int, default=None, help="kubernetes: size of /dev/shm per pod, MB")
        p.add_argument("--max-retries", type=int, default=None,
                       help="kubernetes: Volcano restarts of the job after an evicted or failed pod (default 3)")

    train = sub.add_parser("train", help="launch training through TorchX")
    add_config_args(train)
    train.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for elastic")
    train.add_argument("--nproc-per-node", type=int, default=2)
    train.add_argument("--scheduler", default="local_cwd", help="TorchX scheduler (local_cwd, kubernetes)")
    train.add_argument("--dryrun", action="store_true",
                       help="kubernetes: print the Volcano job that would be submitted, and submit nothing")
    train.add_argument("--service-account", default=None, help="kubernetes: service account of the training pods")
    add_cluster_args(train)
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint (or a run's newest one)")
    evaluate.add_argument("--checkpoint", required=True,
                          help="a checkpoint, or a run URL (its newest; with --watch: each one)")
    evaluate.add_argument("--suite", default=None,
                          help="on the checkpoint's corpus: quick (zero-shot), default, full (default: default, "
                               "or none when --tasks is given)")
    evaluate.add_argument("--tasks", nargs="+", default=[], metavar="FILE",
                          help="task files of evaluations on other eval sets: paths, or shipped names "
                               "(imagenet1k, cifar10, cifar100, coco-karpathy, flickr30k-karpathy)")
    evaluate.add_argument("--root", default="", help="--tasks: the URL or path their eval sets lie under")
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
    add_cluster_args(pipeline)
    pipeline.add_argument("--suite", default=None, help="evaluation suite after each segment")
    pipeline.add_argument("--policy", default=None, help="gate policy YAML/JSON (default: colour top-1 ≥ 0.3)")
    pipeline.add_argument("--n-train", type=int, default=None, help="shapes corpus training samples")
    pipeline.add_argument("--n-eval", type=int, default=None, help="shapes corpus evaluation samples")
    pipeline.add_argument("--corpus", choices=["shapes", "existing", "ingest"], default="shapes",
                          help="shapes: write the synthetic corpus (only into an empty URL or one holding shapes); "
                               "existing: validate --data-url, never write; ingest: ingest --source-url into it")
    pipeline.add_argument("--source-url", default="", help="--corpus ingest: the source to ingest")
    pipeline.add_argument("--source-format", default="", help="--corpus ingest: webdataset, parquet, csv, imagefolder")
    pipeline.add_argument("--arms", nargs="+", default=None,
                          help="study: matched arms (clip, the baseline, and e.g. maeclip flip-matched)")
    pipeline.add_argument("--pools", nargs="+", default=None, help="study: image poolings")
    pipeline.add_argument("--data-sizes", nargs="+", type=int, default=None,
                          help="study: training samples per variant, nested subsets of the corpus (0: all of it)")
    pipeline.add_argument("--seeds", nargs="+", type=int, default=None, help="study: seeds")
    pipeline.add_argument("--study-name", default=None, help="study: name and MLflow experiment")
    pipeline.add_argument("--config", "--preset", dest="config", default=None,
                          help="preset (study: a pattern such as tiny-{arm})")
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
    except bad_input_errors() as err:
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

"""``maeclip``: one command line for data, training, evaluation, gating, pipelines and the demo.

Every check that can fail before a job starts (config keys and values, storage URLs, an empty or missing
dataset) runs first; such errors print one line and exit with status 2, before any process is launched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from trainer import storage
from trainer.config import ConfigError, load_config, normalize_url

USAGE_ERROR = 2


class UsageError(Exception):
    """A problem with what the user asked for; reported on one line with exit status 2."""


def _data_errors() -> tuple[type[BaseException], ...]:
    from trainer.data.loader import DataError

    return (ConfigError, storage.StorageError, DataError, UsageError, FileNotFoundError)


# ---------------------------------------------------------------------------------------------------------
# Functions shared by the CLI and the kfp components.


def preflight(preset: str, overrides: Sequence[str]):
    """Validate the config, the dataset and the run URL; return the resolved Config."""
    from trainer.data.loader import dataset_size

    config = load_config(preset, overrides)
    dataset_size(storage.join(config.data.url, "train"))
    storage.check_writable(config.train.run_url)
    return config


def run_training(
    preset: str,
    overrides: Sequence[str] = (),
    *,
    nnodes: str = "1",
    nproc_per_node: int = 2,
    scheduler: str = "local_cwd",
) -> str:
    """Preflight, launch through TorchX, wait; return the newest committed checkpoint URL."""
    from trainer.checkpoint import latest_checkpoint
    from trainer.launch import launch_training

    config = preflight(preset, overrides)
    env = {}
    if config.tracking.uri:
        env["MLFLOW_TRACKING_URI"] = config.tracking.uri
    launch_training(preset, list(overrides), nnodes=nnodes, nproc_per_node=nproc_per_node, scheduler=scheduler,
                    env=env)
    latest = latest_checkpoint(config.train.run_url)
    if latest is None:
        raise RuntimeError(f"training finished without a committed checkpoint under {config.train.run_url}")
    return latest


def run_local_pipeline(pipeline_root: str = ".maeclip/kfp", **arguments) -> None:
    """Run ``train_eval`` with kfp's local SubprocessRunner in this interpreter (no network)."""
    import kfp.local

    from pipelines.train_eval import train_eval

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=os.path.abspath(pipeline_root))
    train_eval(**arguments)


def compile_pipeline(out: str) -> str:
    from kfp import compiler

    from pipelines.train_eval import train_eval

    compiler.Compiler().compile(train_eval, package_path=out)
    return out


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
    from trainer.data.ingest import IngestOptions, ingest

    options = IngestOptions(format=args.format, split=args.split, resize=args.resize,
                            jpeg_quality=args.jpeg_quality, max_pixels=args.max_pixels,
                            image_column=args.image_column, caption_column=args.caption_column,
                            key_column=args.key_column, caption_template=args.caption_template)
    manifest = ingest(normalize_url(args.src, "SRC"), normalize_url(args.out, "--out"), options,
                      on_error=args.on_error, workers=args.workers)
    print(json.dumps({"url": normalize_url(args.out, "--out"), "counts": manifest["counts"],
                      "splits": manifest["splits"]}))


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
    from evaluators.gate import PolicyError, load_policy, run_gate
    from trainer.config import from_yaml
    from trainer.tracking import default_tracking_uri

    checkpoint = _resolve_checkpoint(args.checkpoint)
    if not storage.exists(storage.join(checkpoint, "metrics.json")):
        raise UsageError(f"no metrics.json at {checkpoint}: run `maeclip eval --checkpoint URL` first")
    try:
        policy = load_policy(args.policy)
    except PolicyError as err:
        raise UsageError(str(err)) from err
    config = from_yaml(storage.read_text(storage.join(checkpoint, "config.yaml")))
    uri = args.tracking_uri or config.tracking.uri or default_tracking_uri()
    decision = run_gate(checkpoint, policy, model_name=args.model_name, tracking_uri=uri,
                        register=not args.no_register)
    print(decision.to_json())
    if not decision.passed:
        sys.exit(1)


def _cmd_pipeline(args: argparse.Namespace) -> None:
    if args.action == "compile":
        print(compile_pipeline(args.out))
        return
    run_local_pipeline(**_demo_arguments(args.preset, args.overrides))


def _demo_arguments(preset: str, overrides: Sequence[str]) -> dict:
    from trainer.tracking import default_tracking_uri

    config = load_config(preset, overrides)  # fail here, before kfp starts anything
    run_url = normalize_url(f".maeclip/runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return {
        "preset": preset,
        "overrides": list(overrides),
        "data_url": config.data.url,
        "run_url": run_url,
        "tracking_uri": config.tracking.uri or default_tracking_uri(),
    }


def _cmd_demo(args: argparse.Namespace) -> None:
    from trainer.checkpoint import latest_checkpoint

    arguments = _demo_arguments(args.preset, args.overrides)
    print(f"[demo] shapes corpus → training ({arguments['run_url']}) → zero-shot eval → gate, with kfp.local",
          flush=True)
    started = time.time()
    run_local_pipeline(**arguments)
    checkpoint = latest_checkpoint(arguments["run_url"])
    result = json.loads(storage.read_text(storage.join(checkpoint, "metrics.json")))
    gate = "passed" if storage.exists(storage.join(checkpoint, "PROMOTED")) else "failed"
    print(f"\n[demo] finished in {time.time() - started:.0f} s; checkpoint {checkpoint} (gate {gate})")
    print(f"{'metric':48s} value")
    for name, value in sorted(result["metrics"].items()):
        print(f"{name:48s} {value:.3f}")
    print(f"\nOpen the MLflow UI on these runs:\n  .venv/bin/mlflow ui --backend-store-uri {arguments['tracking_uri']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maeclip", description=__doc__.splitlines()[0])
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

    pipeline = sub.add_parser("pipeline", help="compile or run the kfp pipeline")
    pipeline.add_argument("action", choices=["compile", "run"])
    pipeline.add_argument("--out", default="train_eval.yaml", help="compile: output YAML")
    pipeline.add_argument("--local", action="store_true", help="run: with kfp.local (the only runner so far)")
    add_config_args(pipeline, required=False)
    pipeline.set_defaults(func=_cmd_pipeline, preset=None)

    demo = sub.add_parser("demo", help="the whole pipeline locally on the embedded defaults")
    add_config_args(demo, required=False)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) is not None:
        args.preset = args.config
    try:
        args.func(args)
    except _data_errors() as err:
        print(f"maeclip: error: {err}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


if __name__ == "__main__":
    main()

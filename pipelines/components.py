"""kfp v2 components: thin wrappers over the functions the ``maeclip`` CLI calls (no postponed annotations:
kfp reads the type hints).

kfp serialises each function body, so imports live inside the bodies. Components run in the maeclip image on
a cluster and in this interpreter with ``kfp.local.SubprocessRunner(use_venv=False)``; they never install
packages at run time (``install_kfp_package=False``), so local runs need no network. Where they run on a
cluster (image, GPUs, node selector, tolerations, /dev/shm, secrets) is ``Platform``'s job, applied by the
pipelines at compile time.
"""


from kfp import dsl

IMAGE = "ghcr.io/maeclip/maeclip:0.1.0"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_corpus(corpus: str, data_url: str, source_url: str, source_format: str, n_train: int, n_eval: int,
                   seed: int) -> str:
    """The corpus the pipeline trains on; return its URL. ``corpus``: ``shapes`` writes the synthetic corpus
    (only into an empty URL or one holding shapes), ``existing`` validates and never writes, ``ingest`` ingests
    ``source_url`` (a rerun skips finished shards)."""
    from pipelines.progress import summary
    from trainer.data.corpus import prepare_corpus as prepare

    url = prepare(corpus, data_url, source_url=source_url, source_format=source_format, n_train=n_train,
                  n_eval=n_eval, seed=seed)
    summary(url)
    return url


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest_corpus(source_url: str, source_format: str, out_url: str, split: str, on_error: str,
                  workers: int, duplicate_keys: str = "skip", allowed_prefixes: str = "") -> str:
    """Ingest a real corpus (webdataset tars, parquet, CSV or image folders) to MDS at ``out_url/split``; return
    ``out_url``. Bad samples follow ``on_error`` (skip: counted by reason in the manifest; fail: stop).
    ``duplicate_keys`` is --duplicate-keys; ``allowed_prefixes`` holds the --allow-prefix URLs, space-separated."""
    import json

    from pipelines.progress import summary
    from trainer.data.ingest import ingest_source

    ingested = ingest_source(source_url, out_url, on_error=on_error, workers=workers, format=source_format,
                             split=split, duplicate_keys=duplicate_keys,
                             allowed_prefixes=tuple(allowed_prefixes.split()))
    print(json.dumps(ingested))
    summary(ingested["url"])
    return ingested["url"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_segment(
    preset: str,
    overrides: list,
    data_url: str,
    run_url: str,
    tracking_uri: str,
    nnodes: str,
    nproc_per_node: int,
    scheduler: str,
    segment: int,
    segments: int,
    image: str,
    cluster: dict = {},  # noqa: B006 - kfp takes defaults from the signature
) -> str:
    """Train segment ``segment`` of ``segments`` through TorchX (logs streamed; fails when the job fails).

    Resumes from the run's newest committed checkpoint; returns the checkpoint the segment ended on. On
    ``kubernetes`` the job runs ``image`` with the ``cluster`` settings (``trainer.cluster.Cluster``: priority
    class, resources per pod, retries; unset ones are k8s/base's or derived).
    """
    from pipelines.progress import summary
    from trainer.cluster import Cluster
    from trainer.launch import run_training_segment

    checkpoint_url = run_training_segment(
        preset,
        [*overrides, f"data.url={data_url}", f"train.run_url={run_url}", f"tracking.uri={tracking_uri}"],
        segment=segment,
        segments=segments,
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        scheduler=scheduler,
        cluster=Cluster.from_dict({**cluster, "image": image}),
    )
    summary(f"→ {checkpoint_url.rsplit('/', 1)[-1]}")
    return checkpoint_url


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(checkpoint_url: str, suite: str, tracking_uri: str) -> str:
    """Run an evaluation suite on the checkpoint (``metrics.json`` + MLflow); return the checkpoint URL."""
    from evaluators.suite import run_suite
    from pipelines.progress import key_metrics, summary

    summary(key_metrics(run_suite(checkpoint_url, suite, tracking_uri=tracking_uri or None)))
    return checkpoint_url


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate(checkpoint_url: str, policy: dict) -> bool:
    """Gate the segment's checkpoint (thresholds, finiteness; marks PROMOTED/REJECTED); the scalar for dsl.If."""
    from evaluators.gate import gate_segment, load_policy
    from pipelines.progress import summary

    decision = gate_segment(checkpoint_url, load_policy(policy))
    print(decision.to_json())
    summary("PROMOTED" if decision.passed else f"REJECTED: {'; '.join(decision.reasons)}")
    return decision.passed


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(run_url: str, policy: dict, model_name: str, tracking_uri: str, variant: dict = {}) -> str:  # noqa: B006
    """Register the run's best passing checkpoint (none passed: nothing); return the record as JSON, with the
    study ``variant`` it trained (if any) and the checkpoint that was ``registered`` (or None)."""
    import json

    from evaluators.gate import load_policy, register_best
    from pipelines.progress import summary
    from trainer.tracking import default_tracking_uri

    record = register_best(run_url, load_policy(policy), model_name=model_name,
                           tracking_uri=tracking_uri or default_tracking_uri())
    passed = record["decision"] is not None and record["decision"]["passed"]
    # kfp passes a dict's numbers as floats: the grid's are integers
    record |= {k: int(v) if isinstance(v, float) else v for k, v in variant.items()}
    record["registered"] = record["checkpoint"] if passed else None
    print(json.dumps(record))
    registry = (record["decision"] or {}).get("registry") or {}
    summary(f"{registry['model']} version {registry['version']}" if passed and registry else "nothing registered")
    return json.dumps(record)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def open_study(tracking_uri: str, experiment: str) -> str:
    """Create the study's MLflow experiment before the variants start; return its id. The variants train
    concurrently: two creating the experiment, or initialising a fresh sqlite store (a duplicate-column
    migration error), at the same moment would leave one untracked."""
    from pipelines.progress import summary
    from trainer.tracking import client, default_tracking_uri, ensure_experiment

    experiment_id = ensure_experiment(client(tracking_uri or default_tracking_uri()), experiment)
    summary(f"MLflow experiment {experiment} ({experiment_id})")
    return experiment_id


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def report(records: list, tracking_uri: str, experiment: str, study_name: str, metrics: list, runs_url: str,
           baseline: str) -> str:
    """Cells (mean ± 95 % CI over seeds), paired differences against ``baseline`` and the effect plot, written
    to ``runs_url/report`` and an MLflow parent run; return the Markdown tables."""
    import json

    from evaluators.study_report import report_study
    from pipelines.progress import summary
    from trainer import storage
    from trainer.tracking import default_tracking_uri

    built = report_study([json.loads(r) for r in records], tracking_uri=tracking_uri or default_tracking_uri(),
                         experiment=experiment, study_name=study_name, metrics=metrics,
                         out_url=storage.join(runs_url, "report"), baseline=baseline)
    print(built["table"])
    summary(f"tables and plot in {storage.join(runs_url, 'report')} and the study's MLflow parent run")
    return built["table"]

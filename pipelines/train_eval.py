"""The ``train_eval`` pipeline: shapes corpus → train → zero-shot evaluation → gate (``dsl.If`` on a metric)."""


from kfp import dsl

from pipelines import components

GATE_METRIC = "eval/zeroshot/shapes-color/top1"


@dsl.pipeline(name="maeclip-train-eval", description="Train, evaluate the checkpoint, gate it on a metric.")
def train_eval(
    preset: str = "tiny-clip",
    overrides: list = [],  # noqa: B006 - kfp takes pipeline defaults from the signature
    data_url: str = "file://.maeclip/data/shapes",
    run_url: str = "file://.maeclip/runs/tiny-clip",
    tracking_uri: str = "",
    nnodes: str = "1",
    nproc_per_node: int = 2,
    scheduler: str = "local_cwd",
    n_train: int = 4096,
    n_eval: int = 512,
    seed: int = 0,
    gate_metric: str = GATE_METRIC,
    gate_threshold: float = 0.3,
) -> None:
    corpus = components.shapes_corpus(out_url=data_url, n_train=n_train, n_eval=n_eval, seed=seed)
    trained = components.train_segment(
        preset=preset,
        overrides=overrides,
        data_url=corpus.output,
        run_url=run_url,
        tracking_uri=tracking_uri,
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        scheduler=scheduler,
    ).set_caching_options(False)  # training has side effects (checkpoints, MLflow) and must always run
    evaluated = components.evaluate(
        checkpoint_url=trained.output, tracking_uri=tracking_uri, gate_metric=gate_metric
    ).set_caching_options(False)
    with dsl.If(evaluated.outputs["metric"] >= gate_threshold, name="gate-pass"):
        components.promote(checkpoint_url=trained.output, metrics_json=evaluated.outputs["metrics_json"])
    with dsl.Else(name="gate-fail"):
        components.reject(checkpoint_url=trained.output, metrics_json=evaluated.outputs["metrics_json"])

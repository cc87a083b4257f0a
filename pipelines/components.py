"""kfp v2 components: thin wrappers over the functions the ``maeclip`` CLI calls (no postponed annotations:
kfp reads the type hints).

kfp serialises each function body, so imports live inside the bodies. Components run in the maeclip image on
a cluster and in this interpreter with ``kfp.local.SubprocessRunner(use_venv=False)``; they never install
packages at run time (``install_kfp_package=False``), so local runs need no network.
"""


from typing import NamedTuple

from kfp import dsl

IMAGE = "ghcr.io/maeclip/maeclip:0.1.0"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shapes_corpus(out_url: str, n_train: int, n_eval: int, seed: int) -> str:
    """Write the synthetic shapes corpus unless one is already there; return its URL."""
    from trainer.data.shapes import ensure_shapes

    return ensure_shapes(out_url, n_train=n_train, n_eval=n_eval, seed=seed)


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
) -> str:
    """Launch the TorchX training job, stream its logs, wait; return the newest committed checkpoint URL."""
    from pipelines.cli import run_training

    return run_training(
        preset,
        [*overrides, f"data.url={data_url}", f"train.run_url={run_url}", f"tracking.uri={tracking_uri}"],
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        scheduler=scheduler,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(checkpoint_url: str, tracking_uri: str, gate_metric: str) -> NamedTuple(
    "Evaluation", [("metric", float), ("metrics_json", str)]
):
    """Zero-shot evaluation of one checkpoint; returns the gate's metric as a scalar for ``dsl.If``."""
    import json
    from collections import namedtuple

    from evaluators.zeroshot import evaluate_checkpoint

    metrics = evaluate_checkpoint(checkpoint_url, tracking_uri=tracking_uri or None)
    return namedtuple("Evaluation", ["metric", "metrics_json"])(float(metrics[gate_metric]), json.dumps(metrics))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(checkpoint_url: str, metrics_json: str) -> str:
    """Mark a checkpoint that passed the gate (kept by retention, design §5)."""
    from trainer.checkpoint import mark

    return mark(checkpoint_url, "PROMOTED", metrics_json)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def reject(checkpoint_url: str, metrics_json: str) -> str:
    """Record that a checkpoint failed the gate."""
    from trainer.checkpoint import mark

    return mark(checkpoint_url, "REJECTED", metrics_json)

"""A study's parallel variants log to an MLflow server on PostgreSQL, as on the cluster, and lose no metric.

kfp's local runner trains two variants at a time, so two trainers (and their evaluations) write to the tracking
server at once. Concurrent writers contend for a sqlite file; on the cluster MLflow keeps its store in PostgreSQL,
so here the server runs on a real PostgreSQL server and the test checks, in MLflow and in PostgreSQL's own tables,
that every variant's every logged step arrived and that no tracking call was dropped.
"""

import pytest
import sqlalchemy
from mlflow import MlflowClient
from services import free_port, start_mlflow_server, stop

from pipelines.runner import run_local_pipeline
from pipelines.study import plan_study

STEPS = 6
# log_every=1: the trainer logs every step, so the variants' writes overlap as much as they can.
TINY = [f"train.steps={STEPS}", "train.log_every=1", "data.batch_size=16", "data.num_workers=1",
        "optim.warmup_steps=1"]
COLOR = "eval/zeroshot/shapes-color/top1"
EASY = {"thresholds": [{"metric": COLOR, "min": 0.0}], "champion": {"metric": COLOR, "tolerance": 1.0}}
EXPERIMENT = "pg-study"


@pytest.fixture(scope="module")
def study(tmp_path_factory, postgres):
    """clip and flip-matched × cls and gap pooling: 4 variants, 1 segment, tracked on PostgreSQL over HTTP."""
    root = tmp_path_factory.mktemp("pg-study")
    store, port = postgres.database("study"), free_port()
    server = start_mlflow_server(root, port, backend_store_uri=store)
    uri, runs_url = f"http://127.0.0.1:{port}", f"file://{root}/runs"
    variants = plan_study(["clip", "flip-matched"], ["cls", "gap"], [128], [0], preset_pattern="tiny-{arm}",
                          overrides=TINY, runs_url=runs_url, experiment=EXPERIMENT, model_name="tiny",
                          suite="quick", policy=EASY)
    try:
        run_local_pipeline(
            "study", 1, pipeline_root=str(root / "kfp"), variants=variants, data_url=f"file://{root}/shapes",
            runs_url=runs_url, tracking_uri=uri, experiment=EXPERIMENT, study_name="pg", nproc_per_node=1,
            n_train=128, n_eval=32,
        )
        # Each task's whole output (the trainers' and evaluations' warnings included) is in a log file of its own.
        logs = {path.name: path.read_text(errors="replace") for path in (root / "logs").rglob("*.log")}
        yield {"tracking_uri": uri, "store": store, "logs": logs}
    finally:
        stop(server)


def _variant_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("maeclip.study") == "pg"]
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def test_every_variant_has_every_logged_step_and_its_evaluation(study):
    client = MlflowClient(study["tracking_uri"])
    children = _variant_runs(client)
    assert sorted(r.info.run_name for r in children) == [
        "clip-cls-n128-seed0", "clip-gap-n128-seed0", "flip-matched-cls-n128-seed0", "flip-matched-gap-n128-seed0"]
    for run in children:
        run_id = run.info.run_id
        losses = client.get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in losses) == list(range(1, STEPS + 1)), run.info.run_name
        assert [m.step for m in client.get_metric_history(run_id, COLOR)] == [STEPS], run.info.run_name
        # set_terminated is the trainer's last tracking call: FINISHED means its queue was delivered to the end.
        assert client.get_run(run_id).info.status == "FINISHED", run.info.run_name


def test_no_tracking_call_was_dropped(study):
    trained = [text for name, text in study["logs"].items() if name.startswith("train-segment-")]
    assert len(trained) == 4 and all(f"[train] done at step {STEPS}" in text for text in trained)
    # Tracker.close's warning (training) and report.log_metrics' (evaluation) when calls were given up on.
    dropped = [line for text in study["logs"].values() for line in text.splitlines()
               if "could not be delivered" in line or "not logged to MLflow" in line]
    assert dropped == []


def test_the_metrics_are_in_postgresql(study):
    """Read PostgreSQL's own tables: the store really is the database, and it holds every step of every run."""
    run_ids = [r.info.run_id for r in _variant_runs(MlflowClient(study["tracking_uri"]))]
    engine = sqlalchemy.create_engine(study["store"])
    try:
        assert engine.dialect.name == "postgresql"
        with engine.connect() as connection:
            rows = connection.execute(
                sqlalchemy.text("SELECT run_uuid, key, step FROM metrics WHERE run_uuid IN :ids AND key IN :keys")
                .bindparams(sqlalchemy.bindparam("ids", expanding=True), sqlalchemy.bindparam("keys", expanding=True)),
                {"ids": run_ids, "keys": ["train/loss", COLOR]},
            ).all()
    finally:
        engine.dispose()
    steps = {(run_id, key): sorted(s for r, k, s in rows if (r, k) == (run_id, key))
             for run_id in run_ids for key in ("train/loss", COLOR)}
    assert len(run_ids) == 4
    for run_id in run_ids:
        assert steps[run_id, "train/loss"] == list(range(1, STEPS + 1))
        assert steps[run_id, COLOR] == [STEPS]

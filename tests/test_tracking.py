"""MLflow tracking never stops training: calls are queued, retried through an outage, and counted if dropped."""

import time

import pytest
from mlflow import MlflowClient
from services import free_port, start_mlflow_server, stop

from trainer.tracking import Tracker, start_or_resume_run


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_metrics_logged_during_an_outage_arrive_once_the_server_is_back(tmp_path, request, store):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    # The restarted server opens the same store: the calls queued through the outage land beside the first.
    backend = request.getfixturevalue("postgres").database("outage") if store == "postgresql" else None
    server = start_mlflow_server(tmp_path, port, backend_store_uri=backend)
    try:
        run_id = start_or_resume_run(uri, "outage", None, "run", {"objective": "clip"})
        tracker = Tracker(uri, run_id, max_attempts=30, backoff_s=0.2)
        tracker.log_params({"optim.lr": 0.001})
        tracker.log_metrics({"train/loss": 3.0}, step=1)
        time.sleep(2)
        stop(server)
        for step in range(2, 6):  # the training loop carries on: the calls are queued, not made
            tracker.log_metrics({"train/loss": 3.0 - step * 0.1}, step=step)
        assert tracker.pending >= 3  # at most one is in the worker's hands, being retried
        time.sleep(1)
        server = start_mlflow_server(tmp_path, port, backend_store_uri=backend)
        assert tracker.close(timeout_s=120) == 0
        history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
        assert MlflowClient(uri).get_run(run_id).data.params["optim.lr"] == "0.001"
    finally:
        stop(server)


def test_undeliverable_calls_are_counted_as_dropped(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    tracker = Tracker(uri, "no-such-run", max_attempts=2, backoff_s=0.01)
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    tracker.log_metrics({"train/loss": 0.5}, step=2)
    assert tracker.close(timeout_s=60) == 2


@pytest.mark.parametrize("resume", [False, True])
def test_resumed_run_keeps_its_id(tmp_path, resume):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = start_or_resume_run(uri, "exp", None, "run", {})
    again = start_or_resume_run(uri, "exp", first if resume else None, "run", {})
    assert (again == first) is resume


def test_experiments_open_as_training_and_keep_their_artifacts_beside_a_local_store(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # MLflow's default would put ./mlruns here
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    run_id = start_or_resume_run(uri, "my study/1", None, "clip-cls-n256-seed0", {})
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("my study/1")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's training view
    (tmp_path / "note.txt").write_text("x")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    stored = list((tmp_path / "store" / "artifacts" / "my_study_1").rglob("note.txt"))
    assert len(stored) == 1 and not (tmp_path / "elsewhere" / "mlruns").exists()
    assert client.get_run(run_id).info.run_name == "clip-cls-n256-seed0"

"""``train_eval`` and ``study`` run end to end with kfp's local runner and TorchX local_cwd on the tiny presets.

Each pipeline runs once per module (they take about a minute each) and several tests read the same run: the
segments' checkpoints and gate markers, the MLflow training run, the model registry, the study's parent run.
"""

import base64
import json
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from browser import Browser, chromium_path
from mlflow import MlflowClient
from services import free_port, start_mlflow_ui, stop

from evaluators.registry import CHAMPION, Registry
from evaluators.study_report import ARTIFACT_PATH
from pipelines.runner import run_local_pipeline
from pipelines.study import plan_study
from trainer import checkpoint, storage

TINY = ["train.steps=4", "train.log_every=2", "data.batch_size=16", "data.num_workers=1", "optim.warmup_steps=1"]
COLOR = "eval/zeroshot/shapes-color/top1"
EASY = {"thresholds": [{"metric": COLOR, "min": 0.0}], "champion": {"metric": COLOR, "tolerance": 1.0}}
IMPOSSIBLE = {"thresholds": [{"metric": COLOR, "min": 1.01}]}


def _train_eval(root: Path, policy: dict) -> dict:
    """Run a 2-segment train_eval under ``root``; return its register record and where things went."""
    where = {"run_url": f"file://{root}/run", "tracking_uri": f"sqlite:///{root}/mlflow.db"}
    record = run_local_pipeline(
        "train_eval", 2, pipeline_root=str(root / "kfp"), preset="tiny-clip", overrides=TINY,
        data_url=f"file://{root}/shapes", nproc_per_node=1, n_train=128, n_eval=32, gate_policy=policy,
        model_name="tiny", **where,
    )
    return {"record": json.loads(record), **where}


@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    return _train_eval(tmp_path_factory.mktemp("passing"), EASY)


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    return _train_eval(tmp_path_factory.mktemp("failing"), IMPOSSIBLE)


def _marker(url: str) -> str:
    (found,) = [m for m in ("PROMOTED", "REJECTED") if storage.exists(storage.join(url, m))]
    return found


def test_each_segment_trains_on_from_the_last_and_is_gated(passing):
    found = checkpoint.committed_checkpoints(passing["run_url"])
    assert [step for step, _ in found] == [2, 4]  # segment ends: train.steps × k / K
    assert [_marker(url) for _, url in found] == ["PROMOTED", "PROMOTED"]
    for _, url in found:  # each segment stops at its end but follows the whole run's lr schedule
        assert "schedule_steps: 4" in storage.read_text(storage.join(url, "config.yaml"))
    runs = {checkpoint.read_meta(url)["mlflow_run_id"] for _, url in found}
    assert len(runs) == 1  # the second segment resumed the first one's MLflow run
    history = MlflowClient(passing["tracking_uri"]).get_metric_history(runs.pop(), COLOR)
    assert sorted(m.step for m in history) == [2, 4]


def test_the_best_passing_checkpoint_is_registered(passing):
    record = passing["record"]
    metrics = {url: json.loads(storage.read_text(storage.join(url, "metrics.json")))["metrics"][COLOR]
               for _, url in checkpoint.committed_checkpoints(passing["run_url"])}
    assert record["checkpoint"] == max(metrics, key=lambda url: (metrics[url], url))
    assert record["decision"]["passed"] and str(record["decision"]["registry"]["version"]) == "1"
    champion = Registry(passing["tracking_uri"], "tiny").by_alias(CHAMPION)
    assert champion.checkpoint_url == record["checkpoint"]
    assert champion.metrics[COLOR] == metrics[record["checkpoint"]]


def test_a_failed_gate_stops_the_chain_and_registers_nothing(failing):
    found = checkpoint.committed_checkpoints(failing["run_url"])
    assert [step for step, _ in found] == [2]  # the second segment never ran
    assert _marker(found[0][1]) == "REJECTED"
    decision = json.loads(storage.read_text(storage.join(found[0][1], "REJECTED")))
    assert not decision["passed"] and "below its minimum 1.01" in decision["reasons"][0]
    assert failing["record"] == {"run_url": failing["run_url"], "checkpoint": None, "decision": None,
                                 "registered": None}
    assert MlflowClient(failing["tracking_uri"]).search_registered_models() == []


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """clip and flip-matched at two data sizes, 2 segments each; flip-matched's gate cannot pass (its plan gets
    an impossible policy), so it must still train as long as clip and be reported, not registered."""
    root = tmp_path_factory.mktemp("study")
    uri, runs_url = f"sqlite:///{root}/mlflow.db", f"file://{root}/runs"
    variants = plan_study(["clip", "flip-matched"], ["cls"], [64, 128], [0], preset_pattern="tiny-{arm}",
                          overrides=TINY, runs_url=runs_url, experiment="mini", model_name="tiny", suite="quick",
                          policy=EASY)
    for planned in variants:  # a plan is data: the failing arm's policy is set per variant
        if planned["variant"]["arm"] == "flip-matched":
            planned["policy"] = IMPOSSIBLE
    table = run_local_pipeline(
        "study", 2, pipeline_root=str(root / "kfp"), variants=variants, data_url=f"file://{root}/shapes",
        runs_url=runs_url, tracking_uri=uri, experiment="mini", study_name="mini", nproc_per_node=1, n_train=128,
        n_eval=32,
    )
    return {"table": table, "tracking_uri": uri, "runs_url": runs_url, "variants": variants}


def test_every_variant_trains_the_same_steps_whatever_its_gate_says(study):
    for planned in study["variants"]:
        found = checkpoint.committed_checkpoints(planned["run_url"])
        assert [step for step, _ in found] == [2, 4], planned["variant"]
        arm, size = planned["variant"]["arm"], planned["variant"]["data_size"]
        assert f"max_samples: {size}" in storage.read_text(storage.join(found[-1][1], "config.yaml"))
        markers = [_marker(url) for _, url in found]
        assert markers == (["PROMOTED", "PROMOTED"] if arm == "clip" else ["REJECTED", "REJECTED"])


def test_the_report_takes_final_checkpoints_and_flags_what_was_not_registered(study):
    report = json.loads(storage.read_text(storage.join(study["runs_url"], "report", "study.json")))
    cells = {(c["arm"], c["data_size"]): c for c in report["cells"] if c["metric"] == COLOR}
    assert set(cells) == {("clip", 64), ("clip", 128), ("flip-matched", 64), ("flip-matched", 128)}
    for (arm, _), cell in cells.items():  # the failed gate changed registration only, not what is reported
        assert (cell["n"], cell["registered"]) == ((1, 1) if arm == "clip" else (1, 0))
    for variant in report["variants"]:
        final = checkpoint.latest_checkpoint(variant["run_url"])
        assert variant["checkpoint"] == final and final.endswith("step-000000004")
        metrics = json.loads(storage.read_text(storage.join(final, "metrics.json")))["metrics"]
        cell = cells[(variant["arm"], variant["data_size"])]
        assert cell["mean"] == pytest.approx(metrics[COLOR])  # the final checkpoint's number, one seed
    paired = {(p["arm"], p["data_size"]) for p in report["paired"] if p["metric"] == COLOR}
    assert paired == {("flip-matched", 64), ("flip-matched", 128)}
    client = MlflowClient(study["tracking_uri"])
    experiment = client.get_experiment_by_name("mini")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("maeclip.study") == "mini"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["objective"] for r in children) == ["clip", "clip", "flip", "flip"]
    # Each variant's run is named after the variant, not after the preset it shares with the others.
    assert sorted(r.info.run_name for r in children) == [
        "clip-cls-n128-seed0", "clip-cls-n64-seed0", "flip-matched-cls-n128-seed0", "flip-matched-cls-n64-seed0"]


# The runs table's run-name cells link to their runs: {run id: name shown}, once the table has ``count`` of them.
RUN_LINKS = """(() => {{
  const shown = {{}};
  for (const link of document.querySelectorAll('a[href^="#/experiments/{experiment}/runs/"]'))
    shown[link.getAttribute('href').split('/').pop()] = link.textContent.trim();
  return Object.keys(shown).length >= {count} ? shown : null;
}})()"""
# The artifact view's image, once decoded, with the bytes the browser shows (its src is a blob: URL the UI made).
SHOWN_IMAGE = """(async () => {{
  const image = document.querySelector({selector});
  if (!image || !image.complete || !image.naturalWidth) return null;
  const bytes = new Uint8Array(await (await fetch(image.src)).arrayBuffer());
  let text = '';
  for (const b of bytes) text += String.fromCharCode(b);
  return {{src: image.src, width: image.naturalWidth, png: btoa(text)}};
}})()"""


def _ui_urls(port: int, experiment: str, parent: str, plot: str) -> tuple[str, str]:
    """The study's child runs in the runs table, and the parent run's artifact view with ``plot`` selected.

    A search filter lists the children flat, sorted by name: sorted by creation (the default) MLflow nests
    them under the parent, collapsed.
    """
    query = urllib.parse.urlencode({"searchFilter": f"tags.mlflow.parentRunId = '{parent}'",
                                    "orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"},
                                   quote_via=urllib.parse.quote)
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs"
    return f"{base}?{query}", f"{base}/{parent}/artifacts/{ARTIFACT_PATH}/{plot}"


def test_the_mlflow_ui_shows_every_variant_and_the_comparison_plot(study, tmp_path):
    """Headless Chromium on ``mlflow ui`` over the study's store, as a person would look at it."""
    chromium = chromium_path()  # missing: fails saying that `make test` installs it
    client = MlflowClient(study["tracking_uri"])
    experiment = client.get_experiment_by_name("mini").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`maeclip.study` = 'mini'")
    parent_id = parent.info.run_id
    children = {r.info.run_id: r.info.run_name
                for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")}
    variants = sorted(planned["run_url"].rsplit("/", 1)[-1] for planned in study["variants"])
    report_url = storage.join(study["runs_url"], "report")
    plot = json.loads(storage.read_text(storage.join(report_url, "study.json")))["plots"][COLOR]
    port = free_port()
    runs_page, plot_page = _ui_urls(port, experiment, parent_id, plot)
    ui = start_mlflow_ui(study["tracking_uri"], port, tmp_path)
    try:
        with Browser(chromium, tmp_path / "chromium") as browser:
            shown = browser.wait_for(browser.open(runs_page),
                                     RUN_LINKS.format(experiment=experiment, count=len(variants)))
            selector = json.dumps(f'img[alt="{ARTIFACT_PATH}/{plot}"]')
            image = browser.wait_for(browser.open(plot_page), SHOWN_IMAGE.format(selector=selector))
        query = urllib.parse.urlencode({"path": f"{ARTIFACT_PATH}/{plot}", "run_uuid": parent_id})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/get-artifact?{query}", timeout=30) as answer:
            served = answer.read()  # what the UI fetched to make the image's blob: URL
    finally:
        stop(ui)
    # every variant's run, by the variant's name, on the page
    assert sorted(shown.values()) == variants, f"the runs page shows {sorted(shown.values())}"
    assert shown == children  # each name links to that variant's own run
    assert image["width"] > 0 and image["src"].startswith(f"blob:http://127.0.0.1:{port}/")
    assert served.startswith(b"\x89PNG\r\n\x1a\n")
    assert base64.b64decode(image["png"]) == served == storage.read_bytes(storage.join(report_url, plot))

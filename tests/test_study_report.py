"""The study report: cells (mean ± 95 % Student-t CI over seeds), paired differences against the baseline (by
seed), the Markdown/JSON tables and effect plots written beside the runs, the refusal to overwrite a foreign
folder, and the MLflow parent run. Inputs are real checkpoints of a tiny model with real ``metrics.json``."""

import contextlib
import io
import json
import math
import uuid

import pytest
import torch
from mlflow import MlflowClient

from evaluators import report
from evaluators.study_report import (
    MARKER,
    StudyReportError,
    VariantResult,
    cells,
    check_records,
    effect_figure,
    paired,
    report_study,
    summarize,
)
from trainer import checkpoint, storage
from trainer.config import load_config
from trainer.launch import segment_end
from trainer.models import build_model

COLOR, SHAPE = "eval/zeroshot/shapes-color/top1", "eval/zeroshot/shapes-shape/top1"
METRICS = [COLOR, SHAPE]
T2, T1 = 4.302653, 12.706205  # t(0.975, 2) and t(0.975, 1), from tables
SQRT3 = math.sqrt(3)


@pytest.mark.parametrize(("total", "segments", "ends"), [(90, 4, [23, 45, 68, 90]), (5, 2, [3, 5]), (4, 1, [4])])
def test_segments_end_on_the_next_multiple_of_steps_over_k(total, segments, ends):
    assert [segment_end(total, k, segments) for k in range(1, segments + 1)] == ends


# The study every test below reads. COLOR by arm, pool, data size and seed (SHAPE = COLOR / 2 on cls/1024 only):
# - cls/1024: clip [0.5, 0.6, 0.4], maeclip [0.6, 0.8, 0.7] (differences [0.1, 0.2, 0.3]), flip-matched
#   [0.4, 0.49, 0.28] (differences [-0.1, -0.11, -0.12]: an interval that excludes 0); clip seed 0 also has an
#   older checkpoint (0.99) that the gate registered: the final one counts, the registration only flags it;
# - gap/1024: clip seeds 0, 1, 2 [0.3, 0.4, 0.5], maeclip seeds 1, 2, 3 [0.5, 0.7, 0.1]: pairs are seeds 1, 2;
# - cls/all (data size 0): clip and maeclip seed 0 (0.45, 0.40); seed 1 of each is missing (clip: a checkpoint
#   without metrics.json; maeclip: no checkpoint at all).
GRID = {
    ("clip", "cls", 1024): {0: 0.5, 1: 0.6, 2: 0.4},
    ("maeclip", "cls", 1024): {0: 0.6, 1: 0.8, 2: 0.7},
    ("flip-matched", "cls", 1024): {0: 0.4, 1: 0.49, 2: 0.28},
    ("clip", "gap", 1024): {0: 0.3, 1: 0.4, 2: 0.5},
    ("maeclip", "gap", 1024): {1: 0.5, 2: 0.7, 3: 0.1},
    ("clip", "cls", 0): {0: 0.45, 1: None},
    ("maeclip", "cls", 0): {0: 0.40, 1: None},
}
CHILDREN = {("maeclip", "cls", 1024, 0), ("maeclip", "cls", 1024, 1), ("maeclip", "cls", 1024, 2),
            ("flip-matched", "cls", 1024, 0)}
UNKNOWN_RUN = "f" * 32  # a checkpoint tracked in some other store


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = load_config("tiny-clip", [f"train.run_url=file://{tmp_path_factory.mktemp('unused')}"])
    torch.manual_seed(0)
    model = build_model(config.model)
    return config, model, torch.optim.AdamW(model.parameters())


def _save(tiny, run_url: str, step: int, metrics: dict[str, float] | None, run_id: str | None = None) -> str:
    config, model, optimizer = tiny
    meta = {"samples_seen": step, **({"mlflow_run_id": run_id} if run_id else {})}
    url = checkpoint.save(run_url, step, model, optimizer, config, meta)
    if metrics is not None:
        report.write_metrics(url, {"step": step}, metrics, ["quick"])
    return url


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow = MlflowClient(uri)
    # Artifacts under tmp, not ./mlruns of the working directory.
    experiment = mlflow.create_experiment("study-exp", artifact_location=(root / "artifacts").as_uri())
    children = {v: mlflow.create_run(experiment, run_name="-".join(map(str, v))).info.run_id for v in CHILDREN}
    records = []
    for (arm, pool, size), seeds in GRID.items():
        for seed, color in seeds.items():
            run_url = f"file://{root}/runs/{arm}-{pool}-{size}-seed{seed}"
            registered = None
            if (arm, pool, size, seed) == ("clip", "cls", 1024, 0):
                registered = _save(tiny, run_url, 2, {COLOR: 0.99, SHAPE: 0.99})
            run_id = children.get((arm, pool, size, seed), UNKNOWN_RUN if (arm, pool) == ("clip", "gap") else None)
            if (arm, pool, size, seed) == ("maeclip", "cls", 1024, 1):
                registered = _save(tiny, run_url, 4, {COLOR: color, SHAPE: color / 2}, run_id)
            elif color is not None:
                values = {COLOR: color, **({SHAPE: color / 2} if (pool, size) == ("cls", 1024) else {})}
                _save(tiny, run_url, 4, values, run_id)
            elif arm == "clip":
                _save(tiny, run_url, 4, None)  # trained, never evaluated
            records.append({"arm": arm, "pool": pool, "data_size": size, "seed": seed, "run_url": run_url,
                            "registered": registered})
    out_url = f"file://{root}/runs/report"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        built = report_study(records, tracking_uri=uri, experiment="study-exp", study_name="grid", metrics=METRICS,
                             out_url=out_url, baseline="clip")
    return {"built": built, "records": records, "uri": uri, "root": root, "out_url": out_url, "stderr": err.getvalue(),
            "children": children, "experiment": experiment}


def _row(rows, arm, pool, size, metric=COLOR):
    (row,) = [r for r in rows if (r["arm"], r["pool"], r["data_size"], r["metric"]) == (arm, pool, size, metric)]
    return row


def test_cell_ci_is_the_student_t_interval_over_seeds(study):
    clip = _row(study["built"]["cells"], "clip", "cls", 1024)
    # [0.5, 0.6, 0.4] from the final checkpoints (not the registered 0.99): mean 0.5, sd 0.1.
    assert clip["mean"] == pytest.approx(0.5) and clip["n"] == 3 and clip["seeds"] == [0, 1, 2]
    assert clip["ci95"] == pytest.approx(T2 * 0.1 / SQRT3, rel=1e-6)  # 0.248414
    assert clip["registered"] == 1
    shape = _row(study["built"]["cells"], "maeclip", "cls", 1024, SHAPE)  # [0.3, 0.4, 0.35]: sd 0.05
    assert shape["mean"] == pytest.approx(0.35) and shape["ci95"] == pytest.approx(T2 * 0.05 / SQRT3, rel=1e-6)
    alone = _row(study["built"]["cells"], "clip", "cls", 0)
    assert (alone["mean"], alone["ci95"], alone["n"]) == (pytest.approx(0.45), None, 1)


def test_summarize_uses_the_student_t_quantile():
    two = summarize([0.0, 1.0])  # sd sqrt(0.5)
    assert two.mean == 0.5 and two.n == 2
    assert two.half_width == pytest.approx(T1 * math.sqrt(0.5) / math.sqrt(2), rel=1e-6)
    three = summarize([0.2, 0.4, 0.6])  # sd 0.2: 4.302653 * 0.2 / sqrt(3) = 0.496828
    assert three.half_width == pytest.approx(0.496828, rel=1e-5)
    assert math.isnan(summarize([0.7]).half_width)


def test_paired_ci_matches_a_hand_computation(study):
    # Differences [0.1, 0.2, 0.3]: mean 0.2, sd 0.1, half-width 4.302653 * 0.1 / sqrt(3) = 0.248414.
    row = _row(study["built"]["paired"], "maeclip", "cls", 1024)
    assert row["baseline"] == "clip" and row["n"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["mean"] == pytest.approx(0.2) and row["ci95"] == pytest.approx(0.248414, rel=1e-5)
    assert row["low"] == pytest.approx(0.2 - 0.248414, rel=1e-5) and row["high"] == pytest.approx(0.448414, rel=1e-5)
    assert row["significant"] is False  # the interval [-0.048, 0.448] holds 0
    # Differences [-0.1, -0.11, -0.12]: mean -0.11, sd 0.01, half-width 0.024841: [-0.135, -0.085] excludes 0.
    flip = _row(study["built"]["paired"], "flip-matched", "cls", 1024)
    assert flip["mean"] == pytest.approx(-0.11) and flip["ci95"] == pytest.approx(0.024841, rel=1e-4)
    assert flip["significant"] is True
    shape = _row(study["built"]["paired"], "maeclip", "cls", 1024, SHAPE)  # [0.05, 0.1, 0.15]
    assert shape["mean"] == pytest.approx(0.1) and shape["ci95"] == pytest.approx(0.124207, rel=1e-5)
    # One pair: a difference, no interval, nothing marked.
    one = _row(study["built"]["paired"], "maeclip", "cls", 0)
    assert one["mean"] == pytest.approx(-0.05) and one["n"] == 1 and one["ci95"] is None
    assert one["significant"] is False
    assert {r["arm"] for r in study["built"]["paired"]} == {"maeclip", "flip-matched"}  # never clip − clip


def test_pairs_are_matched_by_seed_not_by_position(study):
    # clip seeds 0, 1, 2 [0.3, 0.4, 0.5] and maeclip seeds 1, 2, 3 [0.5, 0.7, 0.1]: seed 1 pairs 0.5 − 0.4 and
    # seed 2 0.7 − 0.5 = [0.1, 0.2], mean 0.15, sd 0.070711, half-width 12.706205 * 0.070711 / sqrt(2) = 0.635310.
    # By position it would be [0.2, 0.3, -0.4], n 3.
    row = _row(study["built"]["paired"], "maeclip", "gap", 1024)
    assert row["seeds"] == [1, 2] and row["n"] == 2
    assert row["mean"] == pytest.approx(0.15) and row["ci95"] == pytest.approx(0.635310, rel=1e-5)
    assert _row(study["built"]["paired"], "maeclip", "gap", 1024, SHAPE)["n"] == 0  # neither side has SHAPE there


def _variant(arm: str, seed: int, value: float) -> VariantResult:
    return VariantResult(arm, "map", 256, seed, f"file:///runs/{arm}-{seed}", metrics={COLOR: value})


@pytest.mark.parametrize(("differences", "significant"), [([0.1, 0.11, 0.12], True), ([-0.3, -0.31, -0.29], True),
                                                           ([0.1, 0.2, 0.3], False), ([0.5], False)])
def test_significant_when_the_interval_excludes_zero(differences, significant):
    results = [_variant("clip", s, 0.5) for s in range(len(differences))]
    results += [_variant("mae", s, 0.5 + d) for s, d in enumerate(differences)]
    (row,) = paired(results, [COLOR], "clip")
    assert row["significant"] is significant
    assert row["mean"] == pytest.approx(sum(differences) / len(differences))


def test_cells_in_memory_match_a_hand_computation():
    results = [_variant("clip", s, v) for s, v in enumerate([0.2, 0.4, 0.6])]
    (row,) = cells(results, [COLOR])
    assert (row["arm"], row["pool"], row["data_size"], row["n"]) == ("clip", "map", 256, 3)
    assert row["mean"] == pytest.approx(0.4) and row["ci95"] == pytest.approx(T2 * 0.2 / SQRT3, rel=1e-6)


def test_missing_variants_are_reported_not_fatal(study):
    lines = [line for line in study["stderr"].splitlines() if "missing" in line]
    assert len(lines) == 2
    assert any(line.startswith("[study] clip/cls/all/seed 1 missing: no metrics.json") for line in lines)
    assert any(line.startswith("[study] maeclip/cls/all/seed 1 missing: no committed checkpoint") for line in lines)
    assert sorted((m["arm"], m["seed"]) for m in study["built"]["missing"]) == [("clip", 1), ("maeclip", 1)]
    assert _row(study["built"]["cells"], "maeclip", "cls", 0)["n"] == 1


def test_markdown_tables(study):
    table = study["built"]["table"]
    lines = table.splitlines()
    assert "| arm | pool | data size | seeds | registered | eval/zeroshot/shapes-color/top1 | " \
           "eval/zeroshot/shapes-shape/top1 |" in lines
    assert "| clip | cls | 1024 | 3 | 1/3 | 0.500 ± 0.248 | 0.250 ± 0.124 |" in lines
    assert "| clip | cls | all | 1 | 0/1 | 0.450 | — |" in lines
    assert "| clip | gap | 1024 | 3 | 0/3 | 0.400 ± 0.248 | — |" in lines
    assert "| maeclip | cls | 1024 | 3 | 1/3 | 0.700 ± 0.248 | 0.350 ± 0.124 |" in lines
    assert "| arm | pool | data size | pairs | eval/zeroshot/shapes-color/top1 | eval/zeroshot/shapes-shape/top1 |" \
        in lines
    assert "| flip-matched | cls | 1024 | 3 | -0.110 ± 0.025 * | -0.055 ± 0.012 * |" in lines
    assert "| maeclip | cls | 1024 | 3 | +0.200 ± 0.248 | +0.100 ± 0.124 |" in lines
    assert "| maeclip | gap | 1024 | 2 | +0.150 ± 0.635 | — |" in lines
    assert "| maeclip | cls | all | 1 | -0.050 | — |" in lines
    assert lines.index("| maeclip | cls | 1024 | 3 | +0.200 ± 0.248 | +0.100 ± 0.124 |") \
        < lines.index("| maeclip | cls | all | 1 | -0.050 | — |")  # the whole corpus sorts after every size
    assert any(line.startswith("- maeclip / cls / all / seed 1: no committed checkpoint") for line in lines)
    assert storage.read_text(storage.join(study["out_url"], "study.md")) == table


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_report_is_strict_and_complete(study):
    written = _strict_json(storage.read_text(storage.join(study["out_url"], "study.json")))
    assert written["study"] == "grid" and written["baseline"] == "clip" and written["metrics"] == METRICS
    assert written["cells"] == study["built"]["cells"] and written["paired"] == study["built"]["paired"]
    assert len(written["variants"]) == len(study["records"])
    (seed0,) = [v for v in written["variants"]
                if (v["arm"], v["pool"], v["data_size"], v["seed"]) == ("clip", "cls", 1024, 0)]
    assert seed0["checkpoint"].endswith("step-000000004") and seed0["registered"].endswith("step-000000002")
    one = _row(written["paired"], "maeclip", "cls", 0)
    assert one["ci95"] is None and one["low"] is None and one["significant"] is False
    assert written["plots"] == {COLOR: "effect-zeroshot-shapes-color-top1.png",
                                SHAPE: "effect-zeroshot-shapes-shape-top1.png"}
    marker = _strict_json(storage.read_text(storage.join(study["out_url"], MARKER)))
    assert marker["study"] == "grid"
    assert sorted(storage.list_dir(study["out_url"])) == sorted([MARKER, *marker["files"]])
    assert set(marker["files"]) == {"study.md", "study.json", *written["plots"].values()}


def test_effect_plot_has_one_line_per_arm_and_pool(study):
    for name in ("effect-zeroshot-shapes-color-top1.png", "effect-zeroshot-shapes-shape-top1.png"):
        assert storage.read_bytes(storage.join(study["out_url"], name))[:8] == b"\x89PNG\r\n\x1a\n"
    figure = effect_figure(study["built"]["paired"], COLOR, "clip")
    (axes,) = figure.axes
    labels = [line.get_label() for line in axes.get_lines()]
    assert sorted(labels) == ["_zero", "flip-matched / cls", "maeclip / cls", "maeclip / gap"]
    assert len(axes.collections) == 3  # one CI band per line
    assert axes.get_xscale() == "log"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1024", "all"]
    (maeclip,) = [line for line in axes.get_lines() if line.get_label() == "maeclip / cls"]
    assert list(maeclip.get_xdata()) == [1024, 2048]  # the whole corpus one octave past the largest size
    assert list(maeclip.get_ydata()) == pytest.approx([0.2, -0.05])
    (zero,) = [line for line in axes.get_lines() if line.get_label() == "_zero"]
    assert list(zero.get_ydata()) == [0, 0]
    assert "clip" in axes.get_title() and "shapes-color/top1" in axes.get_title()
    # SHAPE was measured on cls/1024 only: two lines.
    shape = effect_figure(study["built"]["paired"], SHAPE, "clip").axes[0]
    assert sorted(line.get_label() for line in shape.get_lines()) == ["_zero", "flip-matched / cls", "maeclip / cls"]


def test_mlflow_parent_run_holds_the_report_and_adopts_the_variants(study):
    mlflow = MlflowClient(study["uri"])
    parent = mlflow.get_run(study["built"]["mlflow_run_id"])
    assert parent.info.experiment_id == study["experiment"] and parent.info.status == "FINISHED"
    assert parent.data.tags["maeclip.study"] == "grid"
    artifacts = {a.path.rsplit("/", 1)[-1] for a in mlflow.list_artifacts(parent.info.run_id, "study")}
    assert artifacts == {MARKER, "study.md", "study.json", "effect-zeroshot-shapes-color-top1.png",
                         "effect-zeroshot-shapes-shape-top1.png"}
    logged = parent.data.metrics
    assert logged[f"study/maeclip-minus-clip/cls/1024/{COLOR}/mean"] == pytest.approx(0.2)
    assert logged[f"study/maeclip-minus-clip/cls/1024/{COLOR}/ci95"] == pytest.approx(0.248414, rel=1e-5)
    assert logged[f"study/clip/cls/all/{COLOR}/mean"] == pytest.approx(0.45)
    assert f"study/clip/cls/all/{COLOR}/ci95" not in logged  # NaN is not logged
    for run_id in study["children"].values():
        assert mlflow.get_run(run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert f"variant run {UNKNOWN_RUN} is not in" in study["stderr"]
    assert study["built"]["out_url"] == study["out_url"]


def _subset(study):
    return [r for r in study["records"] if (r["pool"], r["data_size"]) == ("cls", 1024) and r["arm"] != "flip-matched"]


def _report(study, out_url: str, name: str, metrics=METRICS):
    with contextlib.redirect_stderr(io.StringIO()):
        return report_study(_subset(study), tracking_uri=study["uri"], experiment="study-exp", study_name=name,
                            metrics=metrics, out_url=out_url)


def _parents(study, name: str) -> int:
    return len(MlflowClient(study["uri"]).search_runs([study["experiment"]], f"tags.`maeclip.study` = '{name}'"))


@pytest.mark.parametrize("holding", ["foreign file", "other study", "ours plus a foreign file", "tampered marker"])
def test_refuses_an_out_url_holding_what_it_did_not_write(study, holding):
    out = study["root"] / f"out-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    name = f"s-{uuid.uuid4().hex[:8]}"
    if holding == "foreign file":
        (out / "notes.txt").write_text("mine")
    elif holding == "other study":
        _report(study, out.as_uri(), "another")
    elif holding == "ours plus a foreign file":
        _report(study, out.as_uri(), name)
        (out / "notes.txt").write_text("mine")
    else:  # a marker that claims a file outside the folder: it must not be believed
        (out / MARKER).write_text(json.dumps({"generator": "maeclip-study-report-v1", "study": name,
                                              "files": ["../victim"]}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    parents = _parents(study, name)
    with pytest.raises(StudyReportError, match="refusing to write the study report to"):
        _report(study, out.as_uri(), name)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _parents(study, name) == parents  # refused before anything was logged


def test_replaces_its_own_previous_report(study):
    out = (study["root"] / "again").as_uri()
    first = _report(study, out, "again")
    assert "effect-zeroshot-shapes-shape-top1.png" in storage.list_dir(out)
    second = _report(study, out, "again", metrics=[COLOR])
    assert set(storage.list_dir(out)) == {MARKER, "effect-zeroshot-shapes-color-top1.png", "study.json",
                                          "study.md"}  # the SHAPE plot of the first report is gone
    assert storage.read_text(storage.join(out, "study.md")) == second["table"] != first["table"]
    assert SHAPE not in second["table"]
    assert _strict_json(storage.read_text(storage.join(out, MARKER)))["files"] == [
        "effect-zeroshot-shapes-color-top1.png", "study.json", "study.md"]
    assert second["mlflow_run_id"] != first["mlflow_run_id"]


@pytest.mark.parametrize(("change", "message"), [
    ({"seed": None}, "seed: expected an integer"),
    ({"pool": "mean"}, "pool: expected one of cls, map, gap, max"),
    ({"arm": "../x"}, "arm: expected a name"),
    ({"data_size": -1}, "data_size: expected an integer"),
])
def test_malformed_records_are_refused(change, message):
    record = {"arm": "clip", "pool": "cls", "data_size": 0, "seed": 0, "run_url": "file:///r", "registered": None}
    with pytest.raises(StudyReportError, match=message):
        check_records([{**record, **change}])
    with pytest.raises(StudyReportError, match="missing seed"):
        check_records([{k: v for k, v in record.items() if k != "seed"}])
    with pytest.raises(StudyReportError, match="two study records"):
        check_records([record, dict(record)])

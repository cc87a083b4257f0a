"""The study's comparison: one row per objective × pooling, each metric as mean ± 95 % CI over seeds.

Each variant is one training run; its result is the best checkpoint that passed the gate (``register_best``'s
record), or its newest checkpoint when none passed, so a failed variant still shows in the table, flagged.
The table (Markdown and JSON) and a bar plot with the CI as error bars are logged to one MLflow parent run in
the study's experiment; each variant's training run is tagged as its child, so the MLflow UI nests them.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import storage
from trainer.checkpoint import latest_checkpoint, read_meta
from trainer.config import from_yaml
from trainer.tracking import client, ensure_experiment

DEFAULT_METRICS = ("eval/zeroshot/shapes-color/top1", "eval/zeroshot/shapes-shape/top1")


@dataclass(frozen=True)
class VariantResult:
    """One training run of the study and the metrics of its reported checkpoint."""

    objective: str
    pool: str
    seed: int
    checkpoint: str
    passed: bool
    metrics: dict[str, float]
    mlflow_run_id: str | None


@dataclass(frozen=True)
class Summary:
    """Mean and 95 % CI half-width of one metric over a group's seeds (the half-width is NaN for one seed)."""

    mean: float
    half_width: float
    n: int


def plan_variant(variant: Mapping[str, Any], preset_pattern: str, overrides: Sequence[str], runs_url: str,
                 experiment: str, model_name: str) -> dict[str, Any]:
    """Preset, overrides, run URL and registered model name of one grid point ``{objective, pool, seed}``.

    Every variant logs to the study's experiment (docs/contracts.md §5); seeds of one objective × pooling share a
    registered model, whose champion is their best checkpoint.
    """
    objective, pool, seed = str(variant["objective"]), str(variant["pool"]), int(variant["seed"])
    name = f"{objective}-{pool}"
    return {
        "preset": preset_pattern.format(objective=objective),
        "overrides": [*overrides, f"model.image_pool={pool}", f"train.seed={seed}",
                      f"tracking.experiment={experiment}"],
        "run_url": storage.join(runs_url, f"{name}-seed{seed}"),
        "model_name": f"{model_name}-{name}",
    }


def open_study(tracking_uri: str, experiment: str) -> str:
    """Create the study's MLflow experiment before its variants start; return its id.

    The variants train concurrently: two of them creating the experiment, or initialising a fresh store (the
    embedded sqlite file: a duplicate-column migration error), at the same moment would leave one untracked.
    """
    return ensure_experiment(client(tracking_uri), experiment)


def load_result(record: Mapping[str, Any]) -> VariantResult:
    """A variant's result from ``register_best``'s record: the registered checkpoint, else the newest one."""
    run_url = record["run_url"]
    config = from_yaml(storage.read_text(storage.join(run_url, "config.yaml")))
    checkpoint = record.get("checkpoint") or latest_checkpoint(run_url)
    if checkpoint is None:
        raise FileNotFoundError(f"no committed checkpoint under {run_url}")
    report = json.loads(storage.read_text(storage.join(checkpoint, "metrics.json")))
    return VariantResult(
        objective=config.model.objective, pool=config.model.image_pool, seed=config.train.seed,
        checkpoint=checkpoint, passed=bool(record.get("checkpoint")), metrics=report["metrics"],
        mlflow_run_id=read_meta(checkpoint).get("mlflow_run_id"),
    )


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± the 95 % Student-t confidence half-width (small seed counts need t, not the normal quantile)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Summary(mean, math.nan, n)
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Summary(mean, half, n)


def compare(results: Sequence[VariantResult], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Rows ``{objective, pool, seeds, passed, <metric>: Summary}`` sorted by objective then pooling."""
    groups: dict[tuple[str, str], list[VariantResult]] = {}
    for result in results:
        groups.setdefault((result.objective, result.pool), []).append(result)
    rows = []
    for (objective, pool), members in sorted(groups.items()):
        row: dict[str, Any] = {"objective": objective, "pool": pool, "seeds": len(members),
                               "passed": sum(m.passed for m in members)}
        for metric in metrics:
            found = [m.metrics[metric] for m in members if metric in m.metrics]
            row[metric] = summarize(found) if found else None
        rows.append(row)
    return rows


def _cell(summary: Summary | None) -> str:
    if summary is None:
        return "—"
    if math.isnan(summary.half_width):
        return f"{summary.mean:.3f}"
    return f"{summary.mean:.3f} ± {summary.half_width:.3f}"


def format_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """The comparison as a Markdown table (mean ± 95 % CI; a single seed has no interval)."""
    header = ["objective", "pool", "seeds", "gate passed", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["objective"], row["pool"], str(row["seeds"]), f"{row['passed']}/{row['seeds']}",
                 *(_cell(row[m]) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: Path) -> Path:
    """Grouped bars per variant, one group per metric, with the 95 % CI as error bars; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a pipeline step
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(2.5 + 1.5 * len(rows) * len(metrics) / 2, 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        summaries = [row[m] for m in metrics]
        means = [s.mean if s else math.nan for s in summaries]
        errors = [s.half_width if s and not math.isnan(s.half_width) else 0.0 for s in summaries]
        positions = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
        axes.bar(positions, means, width, yerr=errors, capsize=3, label=f"{row['objective']} / {row['pool']}")
    axes.set_xticks(range(len(metrics)), [m.removeprefix("eval/") for m in metrics], fontsize=8)
    axes.set_ylabel("mean over seeds (95 % CI)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
    return path


def _jsonable(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    def value(v: Any) -> Any:
        if isinstance(v, Summary):
            return {"mean": v.mean, "ci95": None if math.isnan(v.half_width) else v.half_width, "n": v.n}
        return v

    return [{k: value(v) for k, v in row.items()} for row in rows]


def log_study(tracking_uri: str, experiment: str, study_name: str, results: Sequence[VariantResult],
              rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """Log table and plot to a new parent run of ``experiment``, adopt the variants' runs; return its id."""
    import contextlib
    import sys

    mlflow_client = client(tracking_uri)
    run_id = mlflow_client.create_run(ensure_experiment(mlflow_client, experiment), run_name=study_name,
                                      tags={"maeclip.study": study_name}).info.run_id
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "comparison.md").write_text(format_table(rows, metrics) + "\n")
        (root / "comparison.json").write_text(json.dumps(_jsonable(rows), indent=1))
        plot(rows, metrics, root / "comparison.png")
        mlflow_client.log_artifacts(run_id, folder, "study")
    for result in results:
        if result.mlflow_run_id:
            mlflow_client.set_tag(result.mlflow_run_id, "mlflow.parentRunId", run_id)
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run at ..." on stdout
        mlflow_client.set_terminated(run_id)
    return run_id


def report_study(records: Sequence[Mapping[str, Any]], *, tracking_uri: str, experiment: str, study_name: str,
                 metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, Any]:
    """Build, log and return the comparison: ``{"table": Markdown, "rows": [...], "mlflow_run_id": id}``."""
    results = [load_result(record) for record in records]
    rows = compare(results, metrics)
    run_id = log_study(tracking_uri, experiment, study_name, results, rows, metrics)
    return {"table": format_table(rows, metrics), "rows": _jsonable(rows), "mlflow_run_id": run_id}

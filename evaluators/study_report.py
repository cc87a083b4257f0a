"""The study's report: does each arm beat the baseline, at which data size, and with which pooling?

A study is a grid of variants ``{arm, pool, data_size, seed}``, each one training run of the same number of steps.
Each variant contributes its final (newest committed) checkpoint's metrics; the gate's verdict only flags it
(``registered``), so the comparison is between equally trained models, never a best-of-seeds pick. The report has

- cells: per (arm, pool, data_size) and metric, the mean ± 95 % Student-t CI over seeds;
- paired differences: per arm ≠ baseline, (pool, data_size) and metric, arm − baseline over the seeds both ran
  (paired by seed, which removes the seed-to-seed variance both share), with its 95 % t-interval and whether that
  excludes 0;
- one plot per metric of that effect against data size: the paper's question as a picture.

The tables (Markdown, strict JSON) and plots are written to ``out_url`` beside the study's runs, and logged with
summary metrics to one MLflow parent run of the study's experiment; each variant's training run becomes its child.
"""

from __future__ import annotations

import io
import json
import math
import re
import statistics
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import storage
from trainer.checkpoint import MAX_TEXT_BYTES, latest_checkpoint
from trainer.config import IMAGE_POOLS, quote
from trainer.tracking import client, ensure_experiment

DEFAULT_METRICS = ("eval/zeroshot/shapes-color/top1", "eval/zeroshot/shapes-shape/top1")
DEFAULT_BASELINE = "clip"

# The marker that makes a report folder ours: it names the study and every file written beside it, so a later
# report of the same study may replace exactly those files and nothing else (docs/contracts.md §8).
MARKER = "report.json"
GENERATOR = "maeclip-study-report-v1"
TABLE_MD, TABLE_JSON = "study.md", "study.json"
ARTIFACT_PATH = "study"
RECORD_KEYS = ("arm", "pool", "data_size", "seed", "run_url")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # arms end up in MLflow metric keys and file names
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_MLFLOW_BATCH = 1000  # MLflow's cap on metrics per log_batch call


class StudyReportError(ValueError):
    """Bad study records, or an ``out_url`` holding data maeclip did not write: the user's to fix."""


@dataclass(frozen=True)
class VariantResult:
    """One variant of the study: its final checkpoint's metrics, or why it has none (``missing``)."""

    arm: str
    pool: str
    data_size: int
    seed: int
    run_url: str
    registered: str | None = None
    checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    missing: str | None = None

    @property
    def cell(self) -> tuple[str, str, int]:
        return self.arm, self.pool, self.data_size


@dataclass(frozen=True)
class Summary:
    """Mean and 95 % CI half-width of one metric over a group's seeds (the half-width is NaN for one seed)."""

    mean: float
    half_width: float
    n: int


def _size_order(data_size: int) -> tuple[bool, int]:
    return data_size == 0, data_size  # 0 is the whole corpus: the largest size, so it sorts last


def _size_label(data_size: int) -> str:
    return "all" if data_size == 0 else str(data_size)


def _pool_order(pool: str) -> int:
    return IMAGE_POOLS.index(pool)


def _integer(record: Mapping[str, Any], key: str) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise StudyReportError(f"study record {key}: expected an integer ≥ 0, got {quote(value)}")
    return value


def check_record(record: Any) -> dict[str, Any]:
    """The record ``{arm, pool, data_size, seed, run_url, registered}`` validated; StudyReportError if malformed."""
    if not isinstance(record, Mapping):
        raise StudyReportError(f"study record: expected a mapping, got {quote(record)}")
    absent = [key for key in RECORD_KEYS if key not in record]
    if absent:
        raise StudyReportError(f"study record {quote(dict(record))}: missing {', '.join(absent)}")
    arm, pool, run_url, registered = record["arm"], record["pool"], record["run_url"], record.get("registered")
    if not isinstance(arm, str) or not _NAME.match(arm):
        raise StudyReportError(f"study record arm: expected a name of letters, digits, '.', '_', '-', got {quote(arm)}")
    if pool not in IMAGE_POOLS:
        raise StudyReportError(f"study record pool: expected one of {', '.join(IMAGE_POOLS)}, got {quote(pool)}")
    if not isinstance(run_url, str) or not run_url:
        raise StudyReportError(f"study record run_url: expected a storage URL, got {quote(run_url)}")
    if registered is not None and (not isinstance(registered, str) or not registered):
        raise StudyReportError(f"study record registered: expected a checkpoint URL or null, got {quote(registered)}")
    return {"arm": arm, "pool": pool, "data_size": _integer(record, "data_size"), "seed": _integer(record, "seed"),
            "run_url": run_url, "registered": registered}


def check_records(records: Sequence[Any]) -> list[dict[str, Any]]:
    """Every record validated; two records of the same variant would be counted twice, so they are refused."""
    checked = [check_record(record) for record in records]
    seen: set[tuple[str, str, int, int]] = set()
    for r in checked:
        variant = (r["arm"], r["pool"], r["data_size"], r["seed"])
        if variant in seen:
            raise StudyReportError(f"two study records for arm {r['arm']}, pool {r['pool']}, data size "
                                   f"{r['data_size']}, seed {r['seed']}")
        seen.add(variant)
    return checked


def _read_json(url: str) -> Any:
    """A small JSON document written by a job: bounded (docs/contracts.md §8); ValueError when it is not JSON."""
    return json.loads(storage.read_text(url, limit=MAX_TEXT_BYTES))


def _numbers(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        return {}
    return {str(k): float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def load_result(record: Mapping[str, Any]) -> VariantResult:
    """A variant's final checkpoint and its metrics; a variant with neither is ``missing``, with one stderr line.

    Storage that cannot be reached is not a missing variant: its StorageError goes up.
    """
    r = check_record(record)
    variant = {k: r[k] for k in ("arm", "pool", "data_size", "seed", "run_url", "registered")}
    checkpoint = latest_checkpoint(r["run_url"])
    reason = metrics = None
    if checkpoint is None:
        reason = f"no committed checkpoint under {r['run_url']}"
    else:
        try:
            report = _read_json(storage.join(checkpoint, "metrics.json"))
            metrics = _numbers(report.get("metrics") if isinstance(report, Mapping) else None)
            reason = None if metrics else f"no metrics in {checkpoint}/metrics.json"
        except FileNotFoundError:
            reason = f"no metrics.json in {checkpoint}: it was not evaluated"
        except ValueError as err:  # not UTF-8, not JSON, or too large: not something an evaluator wrote
            reason = f"unreadable {checkpoint}/metrics.json: {err}"
    run_id = None
    if checkpoint is not None:  # a variant without metrics still trained: it is nested in MLflow all the same
        try:
            run_id = _read_json(storage.join(checkpoint, "meta.json")).get("mlflow_run_id")
        except (FileNotFoundError, ValueError, AttributeError):  # it just cannot be nested in MLflow
            run_id = None
    run_id = run_id if isinstance(run_id, str) and run_id else None
    if reason is not None:
        print(f"[study] {r['arm']}/{r['pool']}/{_size_label(r['data_size'])}/seed {r['seed']} missing: {reason}",
              file=sys.stderr, flush=True)
        return VariantResult(**variant, checkpoint=checkpoint, missing=reason, mlflow_run_id=run_id)
    return VariantResult(**variant, checkpoint=checkpoint, metrics=metrics, mlflow_run_id=run_id)


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± the 95 % Student-t confidence half-width (small seed counts need t, not the normal quantile)."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Summary(mean, math.nan, n)
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Summary(mean, half, n)


def _present(results: Sequence[VariantResult]) -> dict[tuple[str, str, int], dict[int, VariantResult]]:
    """The variants that have metrics, by cell and then seed."""
    grouped: dict[tuple[str, str, int], dict[int, VariantResult]] = {}
    for result in results:
        if result.missing is None:
            grouped.setdefault(result.cell, {})[result.seed] = result
    return grouped


def _cell_order(cell: tuple[str, str, int]) -> tuple[str, int, tuple[bool, int]]:
    arm, pool, data_size = cell
    return arm, _pool_order(pool), _size_order(data_size)


def _summary(values: Sequence[float]) -> Summary:
    return summarize(values) if values else Summary(math.nan, math.nan, 0)


def cells(results: Sequence[VariantResult], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per (arm, pool, data_size) and metric: mean, 95 % CI half-width ``ci95`` and n over seeds.

    Rows are ``{arm, pool, data_size, metric, mean, ci95, n, seeds, registered}``; ``registered`` counts the
    cell's seeds whose run the gate registered. Means and half-widths are NaN where undefined.
    """
    rows = []
    for cell, by_seed in sorted(_present(results).items(), key=lambda item: _cell_order(item[0])):
        registered = sum(r.registered is not None for r in by_seed.values())
        for metric in metrics:
            seeds = sorted(s for s, r in by_seed.items() if metric in r.metrics)
            summary = _summary([by_seed[s].metrics[metric] for s in seeds])
            rows.append({"arm": cell[0], "pool": cell[1], "data_size": cell[2], "metric": metric,
                         "mean": summary.mean, "ci95": summary.half_width, "n": summary.n, "seeds": seeds,
                         "registered": registered})
    return rows


def paired(results: Sequence[VariantResult], metrics: Sequence[str], baseline: str = DEFAULT_BASELINE
           ) -> list[dict[str, Any]]:
    """Per arm ≠ ``baseline``, (pool, data_size) and metric: arm − baseline paired by seed, with its 95 % t-interval.

    Only seeds that both the arm and the baseline have (with that metric) are paired, so a missing seed on either
    side drops out rather than shifting the pairs. Rows are ``{arm, baseline, pool, data_size, metric, mean, ci95,
    low, high, n, seeds, significant}``; ``significant`` when the interval excludes 0 (never with fewer than two
    pairs, whose interval is NaN).
    """
    grouped = _present(results)
    rows = []
    for cell, ours in sorted(grouped.items(), key=lambda item: _cell_order(item[0])):
        arm, pool, data_size = cell
        if arm == baseline:
            continue
        theirs = grouped.get((baseline, pool, data_size), {})
        for metric in metrics:
            seeds = sorted(s for s in ours if s in theirs and metric in ours[s].metrics and metric in theirs[s].metrics)
            summary = _summary([ours[s].metrics[metric] - theirs[s].metrics[metric] for s in seeds])
            low, high = summary.mean - summary.half_width, summary.mean + summary.half_width
            rows.append({"arm": arm, "baseline": baseline, "pool": pool, "data_size": data_size, "metric": metric,
                         "mean": summary.mean, "ci95": summary.half_width, "low": low, "high": high, "n": summary.n,
                         "seeds": seeds, "significant": bool(low > 0 or high < 0)})  # NaN compares False
    return rows


def _number(value: float, signed: bool = False) -> str:
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _float(value: float | None) -> float:
    """A row's number, NaN where its strict-JSON form has None."""
    return math.nan if value is None else float(value)


def _estimate(row: Mapping[str, Any], signed: bool = False, n: int | None = None) -> str:
    mean, half = _float(row["mean"]), _float(row["ci95"])
    if row["n"] == 0 or math.isnan(mean):
        return "—" if row["n"] == 0 else "nan"  # nan: a seed diverged
    text = _number(mean, signed)
    if not math.isnan(half):
        text += f" ± {half:.3f}"
    if n is not None and row["n"] != n:
        text += f" (n={row['n']})"
    return text


def _markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(line) + " |" for line in lines)]


def _by_cell(rows: Sequence[Mapping[str, Any]], *keys: str) -> dict[tuple, dict[str, Mapping[str, Any]]]:
    """Long rows regrouped as ``{(keys...): {metric: row}}``, in their order: one Markdown line per cell."""
    grouped: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(tuple(row[k] for k in keys), {})[row["metric"]] = row
    return grouped


def format_tables(cell_rows: Sequence[Mapping[str, Any]], paired_rows: Sequence[Mapping[str, Any]],
                  metrics: Sequence[str], *, study_name: str, baseline: str = DEFAULT_BASELINE,
                  missing: Sequence[VariantResult] = ()) -> str:
    """The report as Markdown: the cells, the paired differences (``*`` where the CI excludes 0), what is missing."""
    lines = [f"# Study {study_name}", "", "## Mean ± 95 % CI over seeds (final checkpoints)", ""]
    body = []
    for (arm, pool, data_size), row in _by_cell(cell_rows, "arm", "pool", "data_size").items():
        n = max(r["n"] for r in row.values())
        body.append([arm, pool, _size_label(data_size), str(n), f"{next(iter(row.values()))['registered']}/{n}",
                     *(_estimate(row[m], n=n) if m in row else "—" for m in metrics)])
    lines += _markdown_table(["arm", "pool", "data size", "seeds", "registered", *metrics], body)
    lines += ["", f"## Arm − {baseline}, paired by seed (mean ± 95 % t-interval; * where it excludes 0)", ""]
    body = []
    for (arm, pool, data_size), row in _by_cell(paired_rows, "arm", "pool", "data_size").items():
        n = max(r["n"] for r in row.values())
        body.append([arm, pool, _size_label(data_size), str(n),
                     *(_estimate(row[m], signed=True, n=n) + (" *" if row[m]["significant"] else "") if m in row
                       else "—" for m in metrics)])
    lines += _markdown_table(["arm", "pool", "data size", "pairs", *metrics], body)
    if missing:
        lines += ["", "## Missing variants", ""]
        lines += [f"- {r.arm} / {r.pool} / {_size_label(r.data_size)} / seed {r.seed}: {r.missing}" for r in missing]
    return "\n".join(lines) + "\n"


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float as None, so that it is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _variant_json(result: VariantResult) -> dict[str, Any]:
    return {"arm": result.arm, "pool": result.pool, "data_size": result.data_size, "seed": result.seed,
            "run_url": result.run_url, "checkpoint": result.checkpoint, "registered": result.registered,
            "missing": result.missing}


def _positions(data_sizes: Sequence[int]) -> dict[int, float]:
    """x position of each data size; 0 (the whole corpus, of unknown size) sits one octave past the largest."""
    finite = [s for s in data_sizes if s > 0]
    return {s: float(s) if s > 0 else (2.0 * max(finite) if finite else 1.0) for s in data_sizes}


def effect_figure(paired_rows: Sequence[Mapping[str, Any]], metric: str, baseline: str = DEFAULT_BASELINE) -> Any:
    """The matplotlib Figure of ``metric``'s effect (arm − baseline) against data size, log x axis.

    ``paired_rows`` are ``paired``'s rows, or their strict-JSON form (None for NaN) as ``report_study`` returns.

    One line per (arm, pool) through its paired means, the 95 % t-interval as a shaded band (absent where one
    pair gives none), and a dashed zero line: a band above it is an arm that helps at that size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    rows = [r for r in paired_rows if r["metric"] == metric and r["n"] > 0 and math.isfinite(_float(r["mean"]))]
    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)  # rendered off-screen: a pipeline step has no display
    axes = figure.add_subplot()
    at = _positions(sorted({r["data_size"] for r in rows}, key=_size_order))
    lines: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        lines.setdefault((row["arm"], row["pool"]), []).append(row)
    for (arm, pool), points in sorted(lines.items(), key=lambda item: (item[0][0], _pool_order(item[0][1]))):
        points = sorted(points, key=lambda r: _size_order(r["data_size"]))
        x = [at[r["data_size"]] for r in points]
        mean = [r["mean"] for r in points]
        (line,) = axes.plot(x, mean, marker="o", label=f"{arm} / {pool}")
        axes.fill_between(x, [_float(r["low"]) for r in points], [_float(r["high"]) for r in points],
                          color=line.get_color(), alpha=0.2, linewidth=0)
    axes.axhline(0.0, color="black", linestyle="--", linewidth=0.8, label="_zero")
    if at:
        axes.set_xscale("log")
        axes.set_xticks(list(at.values()), [_size_label(s) for s in at])
        axes.xaxis.set_minor_locator(NullLocator())  # only the sizes trained, not log decades
        axes.legend(fontsize=8)
    axes.set_xlabel("training samples")
    axes.set_ylabel(f"{metric.removeprefix('eval/')}: arm − {baseline}")
    axes.set_title(f"Effect over {baseline} on {metric.removeprefix('eval/')} by data size\n"
                   f"(mean of paired seed differences, 95 % t-interval)", fontsize=10)
    figure.tight_layout()
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def plot_name(metric: str, taken: set[str]) -> str:
    """A file name for ``metric``'s plot, unique among ``taken``."""
    stem = "effect-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", metric.removeprefix("eval/")).strip("-.") or "metric")
    name, k = f"{stem[:180]}.png", 2
    while name in taken:
        name, k = f"{stem[:180]}-{k}.png", k + 1
    return name


def build_files(results: Sequence[VariantResult], metrics: Sequence[str], *, study_name: str,
                baseline: str = DEFAULT_BASELINE) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The report's files by name (tables and one plot per metric) and the report itself as strict JSON data."""
    cell_rows, paired_rows = cells(results, metrics), paired(results, metrics, baseline)
    missing = [r for r in results if r.missing is not None]
    table = format_tables(cell_rows, paired_rows, metrics, study_name=study_name, baseline=baseline, missing=missing)
    plots: dict[str, str] = {}
    for metric in metrics:
        plots[metric] = plot_name(metric, {TABLE_MD, TABLE_JSON, MARKER, *plots.values()})
    built = _strict({"study": study_name, "baseline": baseline, "metrics": list(metrics), "cells": cell_rows,
                     "paired": paired_rows, "variants": [_variant_json(r) for r in results], "plots": plots})
    files = {TABLE_MD: table.encode(), TABLE_JSON: json.dumps(built, indent=1, allow_nan=False).encode()}
    for metric, name in plots.items():
        files[name] = _png(effect_figure(paired_rows, metric, baseline))
    return files, {**built, "table": table, "missing": [_variant_json(r) for r in missing]}


def _marker(study_name: str, names: Sequence[str]) -> bytes:
    return json.dumps({"generator": GENERATOR, "study": study_name, "files": sorted(names)}, indent=1).encode()


def claim_out_url(out_url: str, study_name: str) -> list[str]:
    """The files of this study's previous report at ``out_url`` (none for an empty or new folder).

    StudyReportError when the folder holds anything else: another study's report, or data maeclip did not write,
    which is never overwritten or deleted (docs/contracts.md §8).
    """
    names = storage.list_dir(out_url)
    if not names:
        return []
    refuse = f"refusing to write the study report to '{out_url}'"
    if MARKER not in names:
        raise StudyReportError(f"{refuse}: it holds {len(names)} entries that maeclip did not write "
                               f"({', '.join(map(quote, names[:3]))}{', …' if len(names) > 3 else ''}); "
                               f"choose an empty or new folder")
    try:
        marker = _read_json(storage.join(out_url, MARKER))
    except ValueError as err:
        raise StudyReportError(f"{refuse}: its {MARKER} is not a study report marker: {err}") from None
    files = marker.get("files") if isinstance(marker, Mapping) else None
    if (not isinstance(marker, Mapping) or marker.get("generator") != GENERATOR or not isinstance(files, list)
            or not all(isinstance(f, str) and _FILE.match(f) and f != MARKER for f in files)):
        raise StudyReportError(f"{refuse}: its {MARKER} was not written by maeclip's study report")
    if marker.get("study") != study_name:
        raise StudyReportError(f"{refuse}: it holds the report of study {quote(marker.get('study'))}, "
                               f"not {quote(study_name)}")
    foreign = [n for n in names if n != MARKER and n not in files]
    if foreign:
        raise StudyReportError(f"{refuse}: besides this study's report it holds {len(foreign)} entries that "
                               f"maeclip did not write ({', '.join(map(quote, foreign[:3]))})")
    return [n for n in names if n != MARKER]


def write_report(out_url: str, study_name: str, files: Mapping[str, bytes]) -> None:
    """Write ``files`` and the marker under ``out_url``, replacing this study's previous report there.

    The marker is written first, naming the old and the new files, so a report interrupted midway is still
    recognisably ours and the next run may replace it; the files the new report no longer has are removed.
    """
    previous = claim_out_url(out_url, study_name)
    storage.write_bytes(storage.join(out_url, MARKER), _marker(study_name, sorted({*previous, *files})))
    for name in previous:
        if name not in files:
            storage.remove(storage.join(out_url, name))
    for name, data in files.items():
        storage.write_bytes(storage.join(out_url, name), data)
    storage.write_bytes(storage.join(out_url, MARKER), _marker(study_name, list(files)))


def summary_metrics(cell_rows: Sequence[Mapping[str, Any]], paired_rows: Sequence[Mapping[str, Any]]
                    ) -> dict[str, float]:
    """MLflow metrics of the parent run: each finite cell and effect mean and CI half-width.

    ``study/<arm>/<pool>/<size>/<metric>/mean`` for cells, ``study/<arm>-minus-<baseline>/…`` for effects.
    """
    found = {}
    for rows, arm in ((cell_rows, lambda r: r["arm"]), (paired_rows, lambda r: f"{r['arm']}-minus-{r['baseline']}")):
        for row in rows:
            prefix = f"study/{arm(row)}/{row['pool']}/{_size_label(row['data_size'])}/{row['metric']}"
            for stat in ("mean", "ci95"):
                if row[stat] is not None and math.isfinite(row[stat]):
                    found[f"{prefix}/{stat}"] = float(row[stat])
    return found


def log_study(tracking_uri: str, experiment: str, study_name: str, files: Mapping[str, bytes],
              metrics: Mapping[str, float], children: Sequence[str], tags: Mapping[str, str] | None = None) -> str:
    """Log ``files`` and ``metrics`` to a new parent run of ``experiment``, adopt ``children``; return its id.

    A child run id that the store does not know (a checkpoint tracked elsewhere) is one stderr line, not an
    error; an unreachable store is an error within seconds (``trainer.tracking.client``).
    """
    import contextlib
    import time

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    mlflow_client = client(tracking_uri)
    run_id = mlflow_client.create_run(ensure_experiment(mlflow_client, experiment), run_name=study_name,
                                      tags={"maeclip.study": study_name, **(tags or {})}).info.run_id
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                (Path(folder) / name).write_bytes(data)
            mlflow_client.log_artifacts(run_id, folder, ARTIFACT_PATH)
        now, entries = int(time.time() * 1000), sorted(metrics.items())
        for start in range(0, len(entries), _MLFLOW_BATCH):
            batch = entries[start:start + _MLFLOW_BATCH]
            mlflow_client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in batch])
        for child in dict.fromkeys(children):
            try:
                mlflow_client.set_tag(child, "mlflow.parentRunId", run_id)
            except MlflowException as err:
                if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                    raise
                print(f"[study] variant run {child} is not in {tracking_uri}: not nested under the study",
                      file=sys.stderr, flush=True)
        status = "FINISHED"
    finally:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints "View run at ..." on stdout
            try:
                mlflow_client.set_terminated(run_id, status)
            except MlflowException:
                if status == "FINISHED":
                    raise
    return run_id


def report_study(records: Sequence[Mapping[str, Any]], *, tracking_uri: str, experiment: str, study_name: str,
                 metrics: Sequence[str] = DEFAULT_METRICS, out_url: str, baseline: str = DEFAULT_BASELINE
                 ) -> dict[str, Any]:
    """Build the study's report from its variants' records, write it to ``out_url`` and log it to MLflow.

    ``records`` are ``{arm, pool, data_size, seed, run_url, registered}`` (``registered``: the checkpoint URL the
    gate registered, or None). Returns ``{"table": Markdown, "cells": [...], "paired": [...], "missing": [...],
    "mlflow_run_id": id, "out_url": out_url}`` with NaN as None. Bad records or an ``out_url`` holding data
    that is not this study's report raise StudyReportError before anything is written or logged.
    """
    checked = check_records(records)
    metrics = list(dict.fromkeys(metrics))
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise StudyReportError(f"study report metrics: expected metric names, got {quote(metrics)}")
    if not isinstance(baseline, str) or not _NAME.match(baseline):
        raise StudyReportError(f"study report baseline: expected an arm name, got {quote(baseline)}")
    claim_out_url(out_url, study_name)  # refuse early, before a single checkpoint is read
    results = [load_result(record) for record in checked]
    if not any(r.arm == baseline for r in results):
        print(f"[study] no variant of the baseline arm {baseline!r}: no paired differences", file=sys.stderr)
    files, built = build_files(results, metrics, study_name=study_name, baseline=baseline)
    write_report(out_url, study_name, files)
    run_id = log_study(tracking_uri, experiment, study_name, {**files, MARKER: _marker(study_name, list(files))},
                       summary_metrics(built["cells"], built["paired"]),
                       [r.mlflow_run_id for r in results if r.mlflow_run_id],
                       {"maeclip.study.baseline": baseline, "maeclip.study.report": out_url})
    return {"table": built["table"], "cells": built["cells"], "paired": built["paired"],
            "missing": built["missing"], "mlflow_run_id": run_id, "out_url": out_url}

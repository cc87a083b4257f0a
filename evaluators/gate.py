"""The gate: may a checkpoint go on? Its metrics must all be finite, meet the policy's thresholds and not
regress against the registered champion; a checkpoint that passes becomes a model version.

A policy is data, YAML or JSON, so a pipeline can change it without code::

    thresholds: [{metric: eval/zeroshot/shapes-color/top1, min: 0.3}]
    champion: {metric: eval/zeroshot/shapes-color/top1, tolerance: 0.02}   # optional; higher is better

A non-finite metric anywhere means the run diverged, which fails the gate whether or not a threshold names
it. With a ``champion`` rule, a candidate more than ``tolerance`` below the champion's value fails; one within
the tolerance is registered and becomes ``candidate`` only; one strictly above it also becomes ``champion``
(with no champion yet, the first passing checkpoint is). ``Decision.to_json`` is the one line a pipeline
step parses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import storage
from trainer.config import ConfigError, load_yaml, quote

# A policy is a few lines; anything larger is not one.
POLICY_LIMIT = 1 << 20


class PolicyError(ValueError):
    """A gate policy that cannot be read or is malformed; the message names the offending entry."""


@dataclass(frozen=True)
class Threshold:
    metric: str
    min: float


@dataclass(frozen=True)
class ChampionRule:
    metric: str
    tolerance: float = 0.0


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _champion_rule(entry: Any) -> ChampionRule:
    if not isinstance(entry, Mapping) or "metric" not in entry or set(entry) - {"metric", "tolerance"}:
        raise PolicyError(f"champion: expected {{metric: NAME, tolerance: NUMBER}}, got {quote(entry)}")
    metric, tolerance = entry["metric"], entry.get("tolerance", 0.0)
    if not isinstance(metric, str) or not metric:
        raise PolicyError(f"champion.metric: expected a metric name, got {quote(metric)}")
    if not _finite_number(tolerance) or tolerance < 0:
        raise PolicyError(f"champion.tolerance: expected a finite number ≥ 0, got {quote(tolerance)}")
    return ChampionRule(metric, float(tolerance))


@dataclass(frozen=True)
class Policy:
    thresholds: tuple[Threshold, ...] = ()
    champion: ChampionRule | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Validate strictly: unknown keys, non-finite or non-numeric minimums and a policy that checks nothing
        (which would pass any checkpoint) are errors."""
        if not isinstance(data, Mapping) or set(data) - {"thresholds", "champion"}:
            raise PolicyError(f"a policy is a mapping with keys 'thresholds' and 'champion'; got {quote(data)}")
        entries = data.get("thresholds") or []
        if not isinstance(entries, list):
            raise PolicyError(f"thresholds: expected a list, got {quote(entries)}")
        thresholds = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or set(entry) != {"metric", "min"}:
                raise PolicyError(f"thresholds[{i}]: expected {{metric: NAME, min: NUMBER}}, got {quote(entry)}")
            metric, low = entry["metric"], entry["min"]
            if not isinstance(metric, str) or not metric:
                raise PolicyError(f"thresholds[{i}].metric: expected a metric name, got {quote(metric)}")
            if not _finite_number(low):
                raise PolicyError(f"thresholds[{i}].min: expected a finite number, got {quote(low)}")
            thresholds.append(Threshold(metric, float(low)))
        champion = _champion_rule(data["champion"]) if data.get("champion") is not None else None
        if not thresholds and champion is None:
            raise PolicyError("the policy checks nothing: give it thresholds or a champion rule")
        return cls(tuple(thresholds), champion)

    def to_dict(self) -> dict[str, Any]:
        """The policy as the mapping ``from_dict`` reads (what a pipeline's ``gate_policy`` parameter holds)."""
        data: dict[str, Any] = {"thresholds": [{"metric": t.metric, "min": t.min} for t in self.thresholds]}
        if self.champion is not None:
            data["champion"] = {"metric": self.champion.metric, "tolerance": self.champion.tolerance}
        return data


def load_policy(source: str | Path | Mapping[str, Any]) -> Policy:
    """A policy from a mapping, or from a YAML/JSON file at a path or storage URL (JSON is valid YAML)."""
    if isinstance(source, Mapping):
        return Policy.from_dict(source)
    try:  # ValueError: larger than POLICY_LIMIT, or not UTF-8
        text = storage.read_text(str(source), limit=POLICY_LIMIT)
    except (OSError, ValueError, storage.StorageError) as err:
        raise PolicyError(f"cannot read gate policy {quote(str(source))}: {err}") from err
    try:
        data = load_yaml(text, f"gate policy {quote(str(source))}")
    except ConfigError as err:  # the same safe, bounded YAML as presets: no tags, no aliases
        raise PolicyError(str(err)) from err
    return Policy.from_dict(data)


@dataclass
class Decision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    # The metrics the policy names, as found (None when missing).
    checked: dict[str, float | None] = field(default_factory=dict)
    # What the registry did: model, version, aliases moved, champion before and after (None: not consulted).
    registry: dict[str, Any] | None = None

    def to_json(self) -> str:
        """One line of strict JSON; non-finite values are written as the strings "nan", "inf", "-inf"."""
        checked = {k: v if v is None or math.isfinite(v) else str(v) for k, v in self.checked.items()}
        line: dict[str, Any] = {"passed": self.passed, "reasons": self.reasons, "checked": checked}
        if self.registry is not None:
            line["registry"] = self.registry
        return json.dumps(line, allow_nan=False)


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def decide(metrics: Mapping[str, Any], policy: Policy) -> Decision:
    """Pass only when every metric is a finite number and each threshold's metric exists and is ≥ its min."""
    reasons = []
    for name, value in metrics.items():
        number = _as_float(value)
        if number is None:
            reasons.append(f"{name} is not a number: {value!r}")
        elif not math.isfinite(number):
            reasons.append(f"{name} is not finite: {number}")
    checked: dict[str, float | None] = {}
    for threshold in policy.thresholds:
        number = _as_float(metrics.get(threshold.metric))
        checked[threshold.metric] = number
        if threshold.metric not in metrics:
            reasons.append(f"{threshold.metric} is missing (required ≥ {threshold.min})")
        elif number is not None and math.isfinite(number) and number < threshold.min:
            reasons.append(f"{threshold.metric} = {number:.6g} is below its minimum {threshold.min}")
    return Decision(passed=not reasons, reasons=reasons, checked=checked)


def against_champion(
    metrics: Mapping[str, Any], rule: ChampionRule, champion: Mapping[str, float] | None
) -> tuple[str | None, bool]:
    """(a failure reason or None, whether the candidate beats the champion) under ``rule``.

    No champion yet: no regression, and the candidate is better. A champion without the metric (registered
    under another policy) cannot be compared, so the candidate does not replace it.
    """
    value = _as_float(metrics.get(rule.metric))
    if champion is None:
        return None, True
    best = champion.get(rule.metric)
    if value is None or best is None:
        return None, False
    if value < best - rule.tolerance:
        return (f"{rule.metric} = {value:.6g} regressed beyond {rule.tolerance} from the champion's "
                f"{best:.6g}"), False
    return None, value > best


def run_gate(
    checkpoint_url: str, policy: Policy, *, model_name: str, tracking_uri: str, register: bool = True
) -> Decision:
    """Gate a checkpoint by its ``metrics.json``; on pass register it and move the aliases.

    A passing checkpoint is also marked ``PROMOTED`` so checkpoint retention keeps it (docs/contracts.md §4).
    """
    from evaluators.registry import CANDIDATE, CHAMPION, Registry
    from trainer.checkpoint import mark, read_meta

    metrics = json.loads(storage.read_text(storage.join(checkpoint_url, "metrics.json")))["metrics"]
    decision = decide(metrics, policy)
    if not register:
        return decision
    registry = Registry(tracking_uri, model_name)
    champion = registry.by_alias(CHAMPION)
    better = champion is None
    if policy.champion is not None and decision.passed:
        reason, better = against_champion(metrics, policy.champion, champion and champion.metrics)
        if reason:
            decision.reasons.append(reason)
            decision.passed = False
    outcome: dict[str, Any] = {"model": model_name, "version": None, "aliases": [],
                               "champion_before": champion and champion.version}
    if decision.passed:
        version = registry.register(checkpoint_url, metrics, read_meta(checkpoint_url))
        registry.set_alias(CANDIDATE, version)
        outcome["version"], outcome["aliases"] = version.version, [CANDIDATE]
        if better:
            registry.set_alias(CHAMPION, version)
            outcome["aliases"].append(CHAMPION)
        mark(checkpoint_url, "PROMOTED", json.dumps(outcome))
    champion_now = outcome["version"] if CHAMPION in outcome["aliases"] else outcome["champion_before"]
    outcome["champion"] = champion_now
    decision.registry = outcome
    return decision


def ranking_metric(policy: Policy) -> str:
    """The metric that orders passing checkpoints: the champion rule's, else the first threshold's."""
    if policy.champion is not None:
        return policy.champion.metric
    if policy.thresholds:
        return policy.thresholds[0].metric
    raise PolicyError("a policy needs a champion rule or a threshold to rank checkpoints by")


def gate_segment(checkpoint_url: str, policy: Policy) -> Decision:
    """Gate one training segment's checkpoint on thresholds and finiteness, without registering it.

    A pass marks it ``PROMOTED`` (so retention keeps it until the chain's best is registered), a failure
    ``REJECTED``; either marker holds the decision.
    """
    from trainer.checkpoint import mark

    decision = run_gate(checkpoint_url, policy, model_name="", tracking_uri="", register=False)
    mark(checkpoint_url, "PROMOTED" if decision.passed else "REJECTED", decision.to_json())
    return decision


def best_passing(run_url: str, metric: str) -> str | None:
    """The run's promoted checkpoint with the highest ``metric`` (the later one on a tie), or None."""
    from trainer.checkpoint import committed_checkpoints

    best: tuple[float, int, str] | None = None
    for step, url in committed_checkpoints(run_url):
        if not storage.exists(storage.join(url, "PROMOTED")):
            continue
        value = _as_float(json.loads(storage.read_text(storage.join(url, "metrics.json")))["metrics"].get(metric))
        if value is not None and (best is None or (value, step) >= best[:2]):
            best = (value, step, url)
    return best and best[2]


def register_best(run_url: str, policy: Policy, *, model_name: str, tracking_uri: str) -> dict[str, Any]:
    """Register the run's best passing checkpoint through the full gate (champion rule included).

    Returns ``{"run_url", "checkpoint", "decision"}``; with no passing checkpoint nothing is registered and
    ``checkpoint`` and ``decision`` are None.
    """
    best = best_passing(run_url, ranking_metric(policy))
    if best is None:
        return {"run_url": run_url, "checkpoint": None, "decision": None}
    decision = run_gate(best, policy, model_name=model_name, tracking_uri=tracking_uri)
    return {"run_url": run_url, "checkpoint": best, "decision": json.loads(decision.to_json())}

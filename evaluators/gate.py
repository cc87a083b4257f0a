"""The gate: may a checkpoint go on? Its metrics must all be finite and meet the policy's thresholds.

A policy is data (YAML or JSON, ``{"thresholds": [{"metric": "eval/zeroshot/shapes-color/top1", "min": 0.3}]}``)
so a pipeline can change it without code. A non-finite metric anywhere means the run diverged, which fails the
gate whether or not a threshold names it. ``Decision.to_json`` is the one line a pipeline step parses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer import storage


class PolicyError(ValueError):
    """A gate policy that cannot be read or is malformed; the message names the offending entry."""


@dataclass(frozen=True)
class Threshold:
    metric: str
    min: float


@dataclass(frozen=True)
class Policy:
    thresholds: tuple[Threshold, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Validate a policy mapping strictly: unknown keys and non-finite or non-numeric minimums are errors."""
        if not isinstance(data, Mapping) or set(data) - {"thresholds"}:
            raise PolicyError(f"a policy is a mapping with one key, 'thresholds'; got {data!r}")
        entries = data.get("thresholds") or []
        if not isinstance(entries, list):
            raise PolicyError(f"thresholds: expected a list, got {entries!r}")
        thresholds = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or set(entry) != {"metric", "min"}:
                raise PolicyError(f"thresholds[{i}]: expected {{metric: NAME, min: NUMBER}}, got {entry!r}")
            metric, low = entry["metric"], entry["min"]
            if not isinstance(metric, str) or not metric:
                raise PolicyError(f"thresholds[{i}].metric: expected a metric name, got {metric!r}")
            if isinstance(low, bool) or not isinstance(low, int | float) or not math.isfinite(low):
                raise PolicyError(f"thresholds[{i}].min: expected a finite number, got {low!r}")
            thresholds.append(Threshold(metric, float(low)))
        return cls(tuple(thresholds))


def load_policy(source: str | Path | Mapping[str, Any]) -> Policy:
    """A policy from a mapping, or from a YAML/JSON file at a path or storage URL (JSON is valid YAML)."""
    if isinstance(source, Mapping):
        return Policy.from_dict(source)
    try:
        data = yaml.safe_load(storage.read_text(str(source)))
    except (OSError, storage.StorageError) as err:
        raise PolicyError(f"cannot read gate policy '{source}': {err}") from err
    except yaml.YAMLError as err:
        raise PolicyError(f"gate policy '{source}' is not YAML/JSON: {err}") from err
    return Policy.from_dict(data)


@dataclass
class Decision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    # The metrics the policy names, as found (None when missing).
    checked: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> str:
        """One line of strict JSON; non-finite values are written as the strings "nan", "inf", "-inf"."""
        checked = {k: v if v is None or math.isfinite(v) else str(v) for k, v in self.checked.items()}
        return json.dumps({"passed": self.passed, "reasons": self.reasons, "checked": checked}, allow_nan=False)


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

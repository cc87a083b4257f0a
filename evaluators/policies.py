"""The gate policy and evaluation suite per objective, as data (``evaluators.gate.load_policy`` reads them).

Objectives with a joint image-text embedding (clip, flip, maeclip) are gated on zero-shot colour top-1 on the
shapes corpus, which the ``quick`` suite computes. mae and m3ae have no text embedding, so zero-shot does not
apply to them (docs/models.md §11): they are gated on the linear probe of the same task, which only the
``default`` suite computes (``evaluators.suite.SUITES``; names from ``linear_probe.score_probe_tasks``).
"""

from __future__ import annotations

import copy
from typing import Any

from trainer.config import OBJECTIVES

ZEROSHOT_METRIC = "eval/zeroshot/shapes-color/top1"
LINEAR_METRIC = "eval/linear/shapes-color/top1"


def _policy(metric: str, floor: float) -> dict[str, Any]:
    # The floor passes a segment on; the champion rule decides registration (evaluators/gate.py).
    return {"thresholds": [{"metric": metric, "min": floor}], "champion": {"metric": metric, "tolerance": 0.02}}


# Zero-shot: colour top-1 at least 0.3 (six colours, chance 1/6), no more than 0.02 below the champion.
# Linear: the same floor, well above chance (1/6), so it rejects a collapsed encoder. It cannot tell learning
# from no learning: on shapes colour (256 train, 64 eval images) a randomly initialised tiny-mae or tiny-m3ae
# already probes at 0.95 and tiny-mae after 200 steps at 0.97 (measured here), because colour is nearly
# linear in the pixels; the champion rule does the comparing.
POLICIES: dict[str, dict[str, Any]] = {
    "clip": _policy(ZEROSHOT_METRIC, 0.3),
    "flip": _policy(ZEROSHOT_METRIC, 0.3),
    "maeclip": _policy(ZEROSHOT_METRIC, 0.3),
    "mae": _policy(LINEAR_METRIC, 0.3),
    "m3ae": _policy(LINEAR_METRIC, 0.3),
}

# The cheapest suite that computes each policy's metric: ``quick`` is zero-shot only, ``default`` adds probes.
SUITES: dict[str, str] = {"clip": "quick", "flip": "quick", "maeclip": "quick", "mae": "default", "m3ae": "default"}


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (objectives: {', '.join(OBJECTIVES)})")


def policy_for(objective: str) -> dict[str, Any]:
    """The gate policy of ``objective``, a fresh mapping the caller may change."""
    _check(objective)
    return copy.deepcopy(POLICIES[objective])


def suite_for(objective: str) -> str:
    """The evaluation suite that computes the metrics ``policy_for(objective)`` names."""
    _check(objective)
    return SUITES[objective]


__all__ = ["LINEAR_METRIC", "POLICIES", "SUITES", "ZEROSHOT_METRIC", "policy_for", "suite_for"]

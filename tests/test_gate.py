"""The gate's decision: non-finite, missing and below-threshold metrics fail, with a reason naming the metric;
the champion rule's regression and improvement known answers. (The registry side: tests/test_registry.py.)"""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evaluators.gate import (
    ChampionRule,
    Decision,
    Policy,
    PolicyError,
    Threshold,
    against_champion,
    decide,
    load_policy,
)

COLOR = "eval/zeroshot/shapes-color/top1"
SHAPE = "eval/zeroshot/shapes-shape/top1"
POLICY = Policy((Threshold(COLOR, 0.3), Threshold(SHAPE, 0.5)))


def test_metrics_above_their_minimums_pass():
    decision = decide({COLOR: 0.9, SHAPE: 0.5, "eval/zeroshot/shapes-color/top5": 1.0}, POLICY)
    assert decision.passed and decision.reasons == []
    assert decision.checked == {COLOR: 0.9, SHAPE: 0.5}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_metric_fails_even_without_a_threshold(bad):
    decision = decide({COLOR: 0.9, SHAPE: 0.9, "train/loss": bad}, POLICY)
    assert not decision.passed
    assert decision.reasons == [f"train/loss is not finite: {bad}"]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_thresholded_metric_fails_once(bad):
    decision = decide({COLOR: bad, SHAPE: 0.9}, POLICY)
    assert not decision.passed and len(decision.reasons) == 1 and COLOR in decision.reasons[0]


def test_a_missing_metric_fails_with_a_reason_naming_it():
    decision = decide({COLOR: 0.9}, POLICY)
    assert not decision.passed
    assert decision.reasons == [f"{SHAPE} is missing (required ≥ 0.5)"]
    assert decision.checked[SHAPE] is None


def test_below_threshold_fails_and_the_minimum_itself_passes():
    below = decide({COLOR: 0.29, SHAPE: 0.5}, POLICY)
    assert not below.passed and below.reasons == [f"{COLOR} = 0.29 is below its minimum 0.3"]
    assert decide({COLOR: 0.3, SHAPE: 0.5}, POLICY).passed


def test_a_non_numeric_metric_fails():
    decision = decide({COLOR: "0.9", SHAPE: 0.9}, POLICY)
    assert not decision.passed and decision.reasons[0].startswith(f"{COLOR} is not a number")


def test_to_json_is_one_strict_json_line():
    line = decide({COLOR: math.nan}, POLICY).to_json()
    assert "\n" not in line
    parsed = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}"))
    assert parsed["passed"] is False
    assert parsed["checked"] == {COLOR: "nan", SHAPE: None}
    assert len(parsed["reasons"]) == 2
    assert json.loads(Decision(True).to_json()) == {"passed": True, "reasons": [], "checked": {}}


@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=6),
    minimums=st.lists(st.floats(-10, 10), min_size=1, max_size=6),
)
def test_passes_exactly_when_every_value_is_finite_and_at_least_its_minimum(values, minimums):
    names = [f"m{i}" for i in range(len(values))]
    metrics = dict(zip(names, values, strict=True))
    # Thresholds on the first metrics; any beyond len(values) name metrics that are missing.
    policy = Policy(tuple(Threshold(f"m{i}", low) for i, low in enumerate(minimums)))
    expected = all(math.isfinite(v) for v in values) and all(
        i < len(values) and values[i] >= low for i, low in enumerate(minimums)
    )
    decision = decide(metrics, policy)
    assert decision.passed is expected
    assert (decision.reasons == []) is expected


def test_policy_loads_from_yaml_json_and_dict_alike(tmp_path):
    data = {"thresholds": [{"metric": COLOR, "min": 0.3}, {"metric": SHAPE, "min": 0.5}]}
    (tmp_path / "gate.json").write_text(json.dumps(data))
    (tmp_path / "gate.yaml").write_text(
        f"thresholds:\n  - metric: {COLOR}\n    min: 0.3\n  - metric: {SHAPE}\n    min: 0.5\n"
    )
    assert load_policy(data) == POLICY
    assert load_policy(tmp_path / "gate.json") == POLICY
    assert load_policy(str(tmp_path / "gate.yaml")) == POLICY
    assert load_policy(f"file://{tmp_path / 'gate.yaml'}") == POLICY
    assert load_policy(POLICY.to_dict()) == POLICY
    with pytest.raises(PolicyError, match="checks nothing"):  # it would pass any checkpoint
        load_policy({"thresholds": []})


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"threshold": []}, "thresholds"),
        ({"thresholds": {"metric": COLOR, "min": 0.3}}, "thresholds"),
        ({"thresholds": [{"metric": COLOR, "minimum": 0.3}]}, "thresholds[0]"),
        ({"thresholds": [{"metric": COLOR, "min": "high"}]}, "thresholds[0].min"),
        ({"thresholds": [{"metric": COLOR, "min": math.nan}]}, "thresholds[0].min"),
        ({"thresholds": [{"metric": COLOR, "min": True}]}, "thresholds[0].min"),
        ({"thresholds": [{"metric": "", "min": 0.1}]}, "thresholds[0].metric"),
        ({"champion": {"metric": COLOR, "tolerance": -0.1}}, "champion.tolerance"),
        ({"champion": {"metric": COLOR, "tolerance": math.inf}}, "champion.tolerance"),
        ({"champion": {"tolerance": 0.1}}, "champion"),
        ({"champion": {"metric": 3}}, "champion.metric"),
    ],
)
def test_malformed_policies_are_refused_naming_the_entry(data, names):
    with pytest.raises(PolicyError, match=names.replace("[", r"\[").replace("]", r"\]")):
        load_policy(data)


def test_an_unreadable_policy_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("thresholds: [unclosed\n")
    with pytest.raises(PolicyError, match="cannot read YAML"):
        load_policy(tmp_path / "bad.yaml")


def test_policy_with_a_champion_rule():
    policy = load_policy({"thresholds": [], "champion": {"metric": COLOR, "tolerance": 0.02}})
    assert policy.champion == ChampionRule(COLOR, 0.02)
    assert load_policy({"champion": {"metric": COLOR}}).champion == ChampionRule(COLOR, 0.0)


@pytest.mark.parametrize(
    ("value", "champion", "expected"),
    [
        (0.5, None, (None, True)),  # no champion yet: the first passing checkpoint becomes it
        (0.61, {COLOR: 0.6}, (None, True)),  # strictly better
        (0.6, {COLOR: 0.6}, (None, False)),  # equal: candidate only
        (0.55, {COLOR: 0.6}, (None, False)),  # a regression within the tolerance
        (0.6, {SHAPE: 0.9}, (None, False)),  # a champion without the metric cannot be compared
    ],
)
def test_against_champion_known_answers(value, champion, expected):
    assert against_champion({COLOR: value}, ChampionRule(COLOR, 0.05), champion) == expected


def test_a_regression_beyond_the_tolerance_fails_naming_the_metric():
    reason, better = against_champion({COLOR: 0.5}, ChampionRule(COLOR, 0.05), {COLOR: 0.6})
    assert not better and reason.startswith(f"{COLOR} = 0.5 regressed beyond 0.05")

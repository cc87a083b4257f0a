"""The study's arithmetic: segment ends, mean ± 95 % Student-t CI over seeds, grouping and the table."""

import math

import pytest

from evaluators.study_report import VariantResult, compare, format_table, summarize
from pipelines.cli import segment_end

COLOR = "eval/zeroshot/shapes-color/top1"


@pytest.mark.parametrize(("total", "segments", "ends"), [(90, 4, [23, 45, 68, 90]), (5, 2, [3, 5]), (4, 1, [4])])
def test_segments_end_on_the_next_multiple_of_steps_over_k(total, segments, ends):
    assert [segment_end(total, k, segments) for k in range(1, segments + 1)] == ends


def test_ci_uses_the_student_t_quantile():
    two = summarize([0.0, 1.0])  # t(0.975, 1) = 12.7062: two seeds give a wide interval
    assert two.mean == 0.5 and two.n == 2
    assert two.half_width == pytest.approx(12.7062 * math.sqrt(0.5) / math.sqrt(2), rel=1e-4)
    three = summarize([0.2, 0.4, 0.6])  # t(0.975, 2) = 4.3027, sd 0.2
    assert three.half_width == pytest.approx(4.3027 * 0.2 / math.sqrt(3), rel=1e-4)
    assert math.isnan(summarize([0.7]).half_width)


def _result(objective: str, pool: str, seed: int, color: float, passed: bool = True) -> VariantResult:
    return VariantResult(objective, pool, seed, f"file:///runs/{objective}-{pool}-{seed}", passed, {COLOR: color},
                         None)


def test_rows_group_seeds_by_objective_and_pooling():
    results = [_result("maeclip", "gap", 0, 0.5), _result("clip", "cls", 1, 0.6, passed=False),
               _result("clip", "cls", 0, 0.8), _result("clip", "cls", 2, 0.7)]
    rows = compare(results, [COLOR, "eval/missing"])
    assert [(r["objective"], r["pool"], r["seeds"], r["passed"]) for r in rows] == [("clip", "cls", 3, 2),
                                                                                     ("maeclip", "gap", 1, 1)]
    assert rows[0][COLOR].mean == pytest.approx(0.7) and rows[0]["eval/missing"] is None
    table = format_table(rows, [COLOR, "eval/missing"]).splitlines()
    assert table[2] == f"| clip | cls | 3 | 2/3 | 0.700 ± {rows[0][COLOR].half_width:.3f} | — |"
    assert table[3] == "| maeclip | gap | 1 | 1/1 | 0.500 | — |"

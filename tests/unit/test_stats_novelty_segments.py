"""The novelty check and the per-segment results of `analyze`, against their formulas written out here: the
early and recent halves compared by a one-sided z-test, and each (segment, treatment) pair by the mSPRT with
Holm-corrected p-values and Bonferroni intervals. Votes are independent here (one per session), so the
variance per vote is q(1 - q) on the smoothed rate q = (x + 1) / (n + 2)."""

from __future__ import annotations

import math

import pytest
from scipy.stats import norm

from services.optimizer.stats.analysis import NOVELTY_ALPHA, analyze
from services.optimizer.stats.frequentist import holm_adjust, msprt_half_width, msprt_p_value
from services.optimizer.stats.results import ArmData, ArmResult

TAU = 0.05


def _arm(arm_id: str, n: int, positives: int) -> ArmData:
    return ArmData(arm_id, n, n, positives)


def _both(early: ArmData, recent: ArmData) -> ArmData:
    return ArmData(
        early.arm_id, early.exposures + recent.exposures, early.n + recent.n, early.positives + recent.positives
    )


def _var(a: ArmData) -> float:
    """The variance of an arm's rate: q(1 - q) / n on the smoothed rate."""
    q = (a.positives + 1) / (a.n + 2)
    return q * (1 - q) / a.n


def _novelty(
    c_early: ArmData, c_recent: ArmData, t_early: ArmData, t_recent: ArmData, min_samples: int = 2
) -> ArmResult:
    arms = [_both(c_early, c_recent), _both(t_early, t_recent)]
    weights = {"control": 0.5, "t1": 0.5}
    result = analyze(arms, "control", weights, recent=[c_recent, t_recent], tau=TAU, min_samples=min_samples)
    t1 = result.arm("t1")
    assert t1 is not None
    return t1


def _p_fading(c_early: ArmData, c_recent: ArmData, t_early: ArmData, t_recent: ArmData) -> float:
    def rate_var(a: ArmData) -> tuple[float, float]:
        return a.positives / a.n, _var(a)

    (pce, vce), (pcr, vcr), (pte, vte), (ptr, vtr) = map(rate_var, (c_early, c_recent, t_early, t_recent))
    d_early, d_recent = pte - pce, ptr - pcr
    return float(norm.cdf(-(d_early - d_recent) / math.sqrt(vce + vcr + vte + vtr)))


def test_a_lift_that_fades_is_tested_early_half_against_recent_half() -> None:
    halves = (_arm("control", 3000, 1800), _arm("control", 2000, 1200), _arm("t1", 3000, 2250), _arm("t1", 2000, 1320))
    t1 = _novelty(*halves)
    assert t1.lift_early == pytest.approx(0.15 / 0.6) and t1.lift_recent == pytest.approx(0.06 / 0.6)
    assert t1.novelty_p_value is not None and t1.novelty_p_value == pytest.approx(_p_fading(*halves), rel=1e-6)
    assert t1.novelty_p_value < NOVELTY_ALPHA and t1.novelty_flag


def test_a_lasting_lift_is_not_flagged_and_its_p_value_is_the_one_sided_one() -> None:
    halves = (_arm("control", 3000, 1800), _arm("control", 3000, 1800), _arm("t1", 3000, 2040), _arm("t1", 3000, 2055))
    t1 = _novelty(*halves)
    assert t1.novelty_p_value is not None and t1.novelty_p_value == pytest.approx(_p_fading(*halves), rel=1e-6)
    assert t1.novelty_p_value > 0.5 and not t1.novelty_flag  # the recent half gains more, not less


def test_a_recent_half_without_any_gain_is_flagged_even_when_the_difference_is_not_significant() -> None:
    c_early, c_recent = _arm("control", 3000, 1800), _arm("control", 3000, 1800)
    gone = _novelty(c_early, c_recent, _arm("t1", 3000, 1815), _arm("t1", 3000, 1800))  # +0.5 points, then 0
    assert gone.novelty_p_value is not None and gone.novelty_p_value > NOVELTY_ALPHA
    assert gone.lift_recent == 0.0 and gone.novelty_flag
    kept = _novelty(c_early, c_recent, _arm("t1", 3000, 1815), _arm("t1", 3000, 1803))  # +0.5 points, then +0.1
    assert kept.novelty_p_value is not None and kept.novelty_p_value > NOVELTY_ALPHA and not kept.novelty_flag


def test_halves_at_the_minimum_sample_are_tested_and_smaller_ones_are_not() -> None:
    at = _novelty(_arm("control", 5, 3), _arm("control", 5, 3), _arm("t1", 5, 5), _arm("t1", 5, 3), min_samples=5)
    assert at.novelty_p_value is not None
    below = _novelty(_arm("control", 5, 3), _arm("control", 4, 2), _arm("t1", 5, 5), _arm("t1", 5, 3), min_samples=5)
    assert below.novelty_p_value is None and not below.novelty_flag


def _segments() -> dict[str, list[ArmData]]:
    return {
        "BUY": [_arm("control", 800, 480), _arm("t1", 800, 600), _arm("t2", 800, 470)],
        "SELL": [_arm("control", 800, 480), _arm("t1", 800, 380), _arm("t2", 800, 490)],
        "HOLD": [_arm("control", 40, 20), _arm("t1", 1, 1), _arm("t2", 40, 30)],  # t1: one vote, not tested
    }


def test_segment_results_are_holm_corrected_msprt_tests_with_bonferroni_intervals() -> None:
    segments = _segments()
    totals = [
        ArmData(a, sum(x.n for s in segments.values() for x in s if x.arm_id == a), 0, 0)
        for a in ("control", "t1", "t2")
    ]
    totals = [
        ArmData(
            t.arm_id,
            t.exposures,
            t.exposures,
            sum(x.positives for s in segments.values() for x in s if x.arm_id == t.arm_id),
        )
        for t in totals
    ]
    result = analyze(
        totals, "control", {"control": 1 / 3, "t1": 1 / 3, "t2": 1 / 3}, tau=TAU, segments=segments, min_samples=2
    )
    rows = {(r.segment, r.arm_id): r for r in result.segments}
    assert set(rows) == {(s, a) for s in ("BUY", "HOLD", "SELL") for a in ("t1", "t2")}
    assert [r.segment for r in result.segments] == ["BUY", "BUY", "HOLD", "HOLD", "SELL", "SELL"]

    tested = [k for k in sorted(rows) if k != ("HOLD", "t1")]
    diffs, variances = {}, {}
    for seg, arm in tested:
        c = next(a for a in segments[seg] if a.arm_id == "control")
        t = next(a for a in segments[seg] if a.arm_id == arm)
        pc, pt = c.positives / c.n, t.positives / t.n
        diffs[(seg, arm)] = pt - pc
        variances[(seg, arm)] = _var(t) + _var(c)
    holm = dict(
        zip(tested, holm_adjust([float(msprt_p_value(diffs[k], variances[k], TAU**2)) for k in tested]), strict=True)
    )
    for k in tested:
        r = rows[k]
        h = float(msprt_half_width(variances[k], TAU**2, 0.05 / len(tested)))
        assert r.diff == pytest.approx(diffs[k])
        assert r.lift == pytest.approx(diffs[k] / r.control_rate)  # type: ignore[operator]
        assert r.p_value == pytest.approx(holm[k])
        assert r.ci_sequential == pytest.approx((diffs[k] - h, diffs[k] + h))
        assert r.significant == (holm[k] < 0.05)

    untested = rows[("HOLD", "t1")]
    assert (untested.diff, untested.lift, untested.p_value, untested.ci_sequential) == (None, None, None, None)
    assert (untested.n, untested.control_n, untested.rate) == (1, 40, 1.0)
    assert not untested.significant and not untested.disagrees

    # t1 wins overall (+15 points on BUY, -12.5 on SELL): SELL is significant the other way and disagrees
    assert rows[("BUY", "t1")].significant and not rows[("BUY", "t1")].disagrees
    assert rows[("SELL", "t1")].significant and rows[("SELL", "t1")].disagrees
    assert not rows[("BUY", "t2")].significant and not rows[("BUY", "t2")].disagrees

"""The statistics at their edges, where mutation testing found no test looking: degenerate samples (no variance
at all), p-values that must be capped at 1, parameters out of range, and Holm on many unordered inputs against
statsmodels (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from services.optimizer.stats.frequentist import (
    TARGET_POWER,
    design_effect,
    holm_adjust,
    msprt_p_value,
    msprt_power,
    msprt_samples_per_arm,
    msprt_tau_for_effect,
    srm_check,
    two_proportion_z_p_value,
    z_test_nobs1,
    z_test_power,
)


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), [(0, 10, 0, 10), (10, 10, 10, 10), (0, 40, 0, 7)])
def test_two_arms_without_any_variance_give_p_one_not_nan(x1: int, n1: int, x2: int, n2: int) -> None:
    p = two_proportion_z_p_value(x1, n1, x2, n2)
    assert float(p) == 1.0


def test_the_always_valid_p_value_is_capped_at_one() -> None:
    # no difference at all: the likelihood ratio is below 1, and 1/Lambda above it
    assert float(msprt_p_value(0.0, 0.01, 0.01)) == 1.0
    assert 0.0 < float(msprt_p_value(0.5, 0.01, 0.01)) < 1.0


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_the_mixing_sd_refuses_an_alpha_outside_zero_one(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        msprt_tau_for_effect(0.05, alpha)


def test_holm_matches_statsmodels_on_many_unordered_p_values() -> None:
    rng = np.random.default_rng(7)
    for m in (1, 2, 5, 12):
        p = list(rng.uniform(0, 0.2, size=m))
        assert holm_adjust(p) == pytest.approx(list(multipletests(p, method="holm")[1]), abs=1e-12)
    assert holm_adjust([]) == []
    assert holm_adjust([0.9, 0.8]) == [1.0, 1.0]  # capped at 1


def test_power_and_sample_size_default_to_equal_arms_as_statsmodels_does() -> None:
    from statsmodels.stats.power import NormalIndPower

    ref = NormalIndPower().power(0.2, nobs1=300, alpha=0.05, ratio=1.0)
    assert z_test_power(0.2, 300, 0.05) == pytest.approx(ref, abs=1e-9)
    n = z_test_nobs1(0.2, 0.05)
    assert NormalIndPower().power(0.2, nobs1=n, alpha=0.05, ratio=1.0) == pytest.approx(TARGET_POWER, abs=1e-6)


def test_no_effect_needs_infinitely_many_samples() -> None:
    assert z_test_nobs1(0.0, 0.05) == float("inf")
    assert z_test_nobs1(-0.2, 0.05) == pytest.approx(z_test_nobs1(0.2, 0.05))


@pytest.mark.parametrize(
    ("clustered", "independent", "expected"),
    [
        (float("nan"), 1.0, 1.0),  # undefined: nothing to compare
        (float("inf"), 1.0, 1.0),
        (1.0, float("inf"), 1.0),
        (2.0, 0.0, 1.0),  # no independent variance
        (0.5, 1.0, 1.0),  # a negative within-session correlation is not credited
        (1.0 + 1e-12, 1.0, 1.0),  # one vote per session: equal up to rounding
        (1.5, 1.0, 1.5),
        (3.0, 1.5, 2.0),
    ],
)
def test_the_design_effect_is_the_variance_ratio_floored_at_one(
    clustered: float, independent: float, expected: float
) -> None:
    assert design_effect(clustered, independent) == pytest.approx(expected)


def test_msprt_power_is_undefined_without_variance_and_uses_threshold_zero_by_default() -> None:
    import math

    assert math.isnan(msprt_power(0.1, 0.0, 0.01, 0.05))
    assert math.isnan(msprt_power(0.1, 0.001, 0.0, 0.05))
    assert math.isnan(msprt_power(0.1, -1.0, 0.01, 0.05))
    default = msprt_power(0.1, 0.001, 0.01, 0.05)
    assert default == msprt_power(0.1, 0.001, 0.01, 0.05, threshold=0.0)
    assert default > msprt_power(0.1, 0.001, 0.01, 0.05, threshold=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"effect": 0.05, "threshold": 0.05},  # no effect beyond the threshold
        {"unit_var": 0.0},
        {"tau2": 0.0},
        {"power": 0.0},
        {"power": 1.0},
    ],
)
def test_msprt_samples_are_infinite_when_the_target_cannot_be_reached(kwargs: dict) -> None:
    args = {"effect": 0.05, "unit_var": 0.5, "tau2": 0.001, "alpha": 0.05, **kwargs}
    assert msprt_samples_per_arm(**args) == float("inf")


def test_msprt_samples_for_an_effect_seen_at_once_is_the_lower_bound() -> None:
    assert msprt_samples_per_arm(effect=10.0, unit_var=1e-6, tau2=1.0, alpha=0.05) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("exposures", "weights"),
    [
        ([100.0, float("nan")], [0.5, 0.5]),  # not finite
        ([100, 100], [0.5, float("inf")]),
        ([[100, 100]], [[0.5, 0.5]]),  # not one row
        ([100, 100], [0.5, 0.3, 0.2]),  # shapes differ
        ([0, 0], [0.5, 0.5]),  # no exposures
        ([100], [1.0]),  # one arm
    ],
)
def test_srm_check_says_nothing_on_input_it_cannot_judge(exposures: list, weights: list) -> None:
    assert srm_check(exposures, weights) == (None, False)


def test_srm_check_flags_traffic_to_an_arm_meant_to_get_none() -> None:
    assert srm_check([100, 1, 100], [0.5, 0.0, 0.5]) == (0.0, True)
    assert srm_check([100, 1, 100], [0.5, 0.0, 0.5], sequential=False) == (0.0, True)


def test_srm_check_judges_a_single_exposure_and_the_chi_square_from_five_expected() -> None:
    p, flagged = srm_check([1, 0], [0.5, 0.5])
    assert p is not None and not flagged
    p, flagged = srm_check([5, 5], [0.5, 0.5], sequential=False)
    assert p == pytest.approx(1.0) and not flagged
    assert srm_check([4, 5], [0.5, 0.5], sequential=False) == (None, False)  # 4.5 expected: too few

"""The field statistics against a reference implementation (statsmodels), and the canary verdicts on
simulated arms with known acceptance rates."""

from __future__ import annotations

import random

import pytest
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_confint

from pipelines.online.stats import Arm, judge, newcombe, wilson


@pytest.mark.parametrize(("s", "n"), [(0, 10), (3, 10), (10, 10), (250, 1000), (1, 1), (7, 2000), (1999, 2000)])
def test_wilson_matches_statsmodels(s: int, n: int) -> None:
    assert wilson(s, n) == pytest.approx(proportion_confint(s, n, alpha=0.05, method="wilson"), abs=1e-12)


@pytest.mark.parametrize(("s1", "n1", "s2", "n2"), [(30, 100, 22, 100), (0, 50, 5, 50), (600, 2000, 440, 2000),
                                                    (5, 7, 1, 9), (100, 100, 99, 100)])
def test_newcombe_matches_statsmodels(s1: int, n1: int, s2: int, n2: int) -> None:
    ref = confint_proportions_2indep(s1, n1, s2, n2, method="newcomb", compare="diff", alpha=0.05)
    assert newcombe(s1, n1, s2, n2) == pytest.approx(ref, abs=1e-12)


def simulate(rate: float, shown: int, keep: float, seed: int) -> Arm:
    rng = random.Random(seed)
    accepted = sum(rng.random() < rate for _ in range(shown))
    kept = sum(rng.random() < keep for _ in range(accepted))
    return Arm(shown=shown, accepted=accepted, kept=kept, linked=accepted)


SETTINGS = {"margin": 0.03, "persistence_margin": 0.05, "min_shown": 2000, "min_linked": 200}


def test_a_better_canary_is_not_worse_and_a_worse_one_is() -> None:
    better, worse = simulate(0.30, 3000, 0.7, 1), simulate(0.22, 3000, 0.7, 2)
    assert judge(better, worse, **SETTINGS).outcome == "not_worse"
    verdict = judge(worse, better, **SETTINGS)
    assert verdict.outcome == "worse" and "acceptance is worse" in verdict.reason


def test_equal_rates_do_not_roll_back() -> None:
    for seed in range(20):
        verdict = judge(simulate(0.25, 4000, 0.7, seed), simulate(0.25, 4000, 0.7, 100 + seed), **SETTINGS)
        assert verdict.outcome != "worse", (seed, verdict.reason)


def test_too_few_events_decide_nothing() -> None:
    verdict = judge(simulate(0.10, 500, 0.7, 3), simulate(0.40, 5000, 0.7, 4), **SETTINGS)
    assert verdict.outcome == "wait" and "min_shown = 2000" in verdict.reason


def test_timid_suggestions_that_are_not_kept_are_worse_despite_acceptance() -> None:
    # More accepted, but most of it rewritten or deleted before commit: persistence is the guardrail.
    timid, control = simulate(0.35, 3000, 0.35, 5), simulate(0.25, 3000, 0.75, 6)
    verdict = judge(timid, control, **SETTINGS)
    assert verdict.outcome == "worse" and "fewer accepted suggestions are kept" in verdict.reason

from __future__ import annotations

import pytest

from daemon.config import GateConfig
from pipelines.gate import EvalReport, ModelScore, gate


def report(base: float, candidate: float, served: float | None = None) -> EvalReport:
    return EvalReport(rows=50, tokens=900, base=ModelScore(base), candidate=ModelScore(candidate),
                      served=ModelScore(served) if served is not None else None)


def test_promotes_when_clearly_better_than_the_base() -> None:
    d = gate(report(base=5.0, candidate=4.0), GateConfig(min_improvement=0.01))
    assert d.promote and d.champion == "base" and d.improvement == pytest.approx(0.2)


def test_keeps_the_champion_when_improvement_is_below_the_margin() -> None:
    d = gate(report(base=5.0, candidate=3.98, served=4.0), GateConfig(min_improvement=0.01))
    assert not d.promote and d.champion == "served"
    assert "+0.50% against the served's 4.0000; [gate] min_improvement is 1.00%" in d.reasons[0]


def test_promotes_over_the_served_adapter() -> None:
    d = gate(report(base=5.0, candidate=3.5, served=4.0), GateConfig(min_improvement=0.01))
    assert d.promote and d.champion == "served"


def test_never_promotes_something_worse_than_the_base_model() -> None:
    # better than a bad served adapter, but worse than no adapter at all
    d = gate(report(base=4.0, candidate=4.5, served=6.0), GateConfig(min_improvement=0.01))
    assert not d.promote
    assert any("not below the base model's 4.0000" in r for r in d.reasons)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_losses_are_rejected(bad: float) -> None:
    d = gate(report(base=5.0, candidate=bad), GateConfig())
    assert not d.promote and "non-finite" in d.reasons[0]


def test_no_rows_no_promotion() -> None:
    r = EvalReport(rows=0, tokens=0, base=ModelScore(5.0), candidate=ModelScore(1.0), served=None)
    assert not gate(r, GateConfig()).promote


def test_report_round_trips_through_json() -> None:
    r = report(5.0, 4.0, 4.5)
    assert EvalReport.from_dict(r.as_dict()) == r

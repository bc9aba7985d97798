"""The gate's rules on hand-made scores (tests/test_gate_models.py checks them on real tiny-model scores)."""

from __future__ import annotations

import pytest

from pipelines.config import GateConfig
from pipelines.evaluate.gate import EvalReport, ModelScore, gate


def score(loss: float, es: float | None = 0.5, em: float | None = 0.1, pref: float | None = None,
          length: float | None = 10.0) -> ModelScore:
    return ModelScore(heldout_loss=loss, exact_match=em, edit_similarity=es, preference_accuracy=pref,
                      generated_tokens=length)


def report(base: ModelScore, candidate: ModelScore, served: ModelScore | None = None) -> EvalReport:
    return EvalReport(rows=50, tokens=900, base=base, candidate=candidate, served=served, generated_rows=50,
                      reference_tokens=10.0, pair_rows=20)


def test_promotes_when_edit_similarity_improves_and_lists_the_numbers() -> None:
    d = gate(report(score(5.0, es=0.30), score(4.0, es=0.45)), GateConfig())
    assert d.promote and d.champion == "base" and d.primary_metric == "edit_similarity"
    assert d.improvement == pytest.approx(0.15)
    assert d.reasons[0] == "edit similarity 0.4500 is +0.1500 against the base's 0.3000 (base 0.3000)"
    assert any(r.startswith("ok: held-out loss 4.0000 vs 5.0000") for r in d.reasons)


def test_keeps_the_champion_below_the_margin() -> None:
    d = gate(report(score(5.0, es=0.3), score(3.9, es=0.505), served=score(4.0, es=0.5)), GateConfig())
    assert not d.promote and d.champion == "served" and d.failed == ("primary",)
    assert "+0.0050 against the served's 0.5000; [gate] min_improvement is +0.0100" in d.reasons[0]


def test_heldout_loss_as_primary_is_lower_is_better() -> None:
    cfg = GateConfig(primary_metric="heldout_loss", min_improvement=0.05)
    assert gate(report(score(5.0), score(3.5), served=score(4.0)), cfg).promote
    assert gate(report(score(5.0), score(3.98), served=score(4.0)), cfg).failed == ("primary",)


def test_never_promotes_something_worse_than_the_base_model() -> None:
    # better than a bad served adapter, but worse than no adapter at all
    d = gate(report(score(4.0, es=0.5), score(4.1, es=0.45), served=score(6.0, es=0.2)),
             GateConfig(heldout_loss_tolerance_rel=1.0))
    assert not d.promote and d.failed == ("base",)
    assert "not better than the base model's 0.5000" in d.reasons[0]


def test_shorter_output_is_refused_only_below_the_kept_length() -> None:
    kept_length = GateConfig()
    # the champion rambles at 3x the kept middles' length: cutting back to 1x is no regression
    assert gate(report(score(5.0, es=0.3), score(4.0, es=0.5, length=10.0), served=score(4.5, es=0.4, length=30.0)),
                kept_length).promote
    # the champion writes the kept length; the candidate wins on similarity by saying half as much
    d = gate(report(score(5.0, es=0.3), score(4.0, es=0.5, length=5.0), served=score(4.5, es=0.4, length=10.0)),
             kept_length)
    assert not d.promote and d.failed == ("guardrail:generated_length",)
    assert "guardrail generated/kept length regressed against the served: 0.50 vs 1.00" in d.reasons[0]


def test_a_primary_metric_that_was_not_measured_is_a_clear_rejection() -> None:
    d = gate(report(score(5.0), score(4.0)), GateConfig(primary_metric="preference_accuracy"))
    assert not d.promote and "primary_metric = preference_accuracy was not measured" in d.reasons[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_rejected(bad: float) -> None:
    d = gate(report(score(5.0), score(4.0, es=bad)), GateConfig())
    assert not d.promote and "non-finite" in d.reasons[0]


def test_no_rows_no_promotion() -> None:
    r = EvalReport(rows=0, tokens=0, base=score(5.0), candidate=score(1.0), served=None)
    assert not gate(r, GateConfig()).promote


def test_report_round_trips_through_json_and_reads_old_reports() -> None:
    r = report(score(5.0), score(4.0, pref=0.7), score(4.5))
    assert EvalReport.from_dict(r.as_dict()) == r
    old = EvalReport.from_dict({"rows": 3, "tokens": 9, "base": {"heldout_loss": 5.0},
                                "candidate": {"heldout_loss": 4.0}, "served": None})
    assert old.candidate.edit_similarity is None and old.generated_rows == 0


def test_length_is_not_compared_with_a_base_model_that_never_stops() -> None:
    # the base ran to max_new_tokens on every row (ratio 1.12); the candidate stops, at a quarter of it
    d = gate(report(score(5.1, es=0.11, length=64.0), score(1.56, es=0.24, length=15.0)), GateConfig())
    assert d.promote, d.reasons

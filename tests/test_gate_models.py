"""The gate deciding on scores real tiny models produced: promote, keep, and a rejection by each guardrail.

Three adapters on the same base and the same held-out rows: `strong` (SFT then DPO on the rule, from
conftest), `weak` (one small SFT step), and `silent` (trained on empty middles: it stops at once, the
short-output failure acceptance-based training drifts towards). Two evaluation runs score them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from pipelines.config import GateConfig
from pipelines.evaluate.gate import EvalReport, gate
from runs import END, fim_rows, make_run, run_module, train_config

RELAXED = GateConfig(min_improvement=-1.0, heldout_loss_tolerance_rel=10.0, edit_similarity_tolerance=1.0,
                     exact_match_tolerance=1.0, preference_accuracy_tolerance=1.0, generated_length_tolerance=10.0)
DEFAULTS = GateConfig()


def train(tmp: Path, tiny_model: Path, name: str, rows: list[dict[str, str]], steps: int, lr: float) -> Path:
    run_dir = make_run(tmp / name, tiny_model, train_config(max_steps=steps, learning_rate=lr), {"sft.jsonl": rows})
    run_module("pipelines.train", run_dir)
    return run_dir / "adapter"


def train_like(tmp: Path, run: Path, name: str) -> Path:
    """The run's training again, in a new run directory (its config and data): another adapter folder."""
    run_dir = tmp / name
    run_dir.mkdir()
    shutil.copy(run / "config.json", run_dir / "config.json")
    shutil.copytree(run / "data", run_dir / "data")
    run_module("pipelines.train", run_dir)
    return run_dir / "adapter"


def evaluate(tmp: Path, strong_run: Path, candidate: Path, served: Path) -> EvalReport:
    run_dir = tmp / f"eval-{candidate.parent.name}-vs-{served.parent.name}"
    run_dir.mkdir()
    os.symlink(strong_run / "data", run_dir / "data")  # the same held-out rows for every model
    os.symlink(candidate, run_dir / "adapter")
    config = json.loads((strong_run / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "served_adapter": str(served)}))
    run_module("pipelines.evaluate", run_dir)
    return EvalReport.load(run_dir / "eval.json")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, strong_run: Path) -> dict[str, EvalReport]:
    tmp = tmp_path_factory.mktemp("gate")
    weak = train(tmp, tiny_model, "weak", fim_rows(96, seed=0), steps=1, lr=1e-3)
    silent = train(tmp, tiny_model, "silent", [{**r, "completion": END} for r in fim_rows(96, seed=0)], 20, 1e-2)
    strong = strong_run / "adapter"
    strong_vs_weak = evaluate(tmp, strong_run, strong, weak)
    assert strong_vs_weak.served is not None
    # Tonight's run reproduces what is served: the same training again gives the same weights (training is
    # deterministic), scored as a separate candidate adapter by a real evaluation.
    again = train_like(tmp, strong_run, "strong-again")
    return {"strong_vs_weak": strong_vs_weak, "again_vs_strong": evaluate(tmp, strong_run, again, strong),
            "weak_vs_strong": dataclasses.replace(strong_vs_weak, candidate=strong_vs_weak.served,
                                                  served=strong_vs_weak.candidate),
            "silent_vs_strong": evaluate(tmp, strong_run, silent, strong)}


def test_a_candidate_that_completes_better_is_promoted(reports: dict[str, EvalReport]) -> None:
    r = reports["strong_vs_weak"]
    assert r.served is not None and r.candidate.edit_similarity is not None
    decision = gate(r, DEFAULTS)
    assert decision.promote, decision.reasons
    assert decision.champion == "served" and decision.improvement >= DEFAULTS.min_improvement
    assert r.candidate.preference_accuracy is not None and r.pair_rows == 24


def test_the_champion_is_kept_when_the_candidate_is_no_better(reports: dict[str, EvalReport]) -> None:
    r = reports["again_vs_strong"]
    assert r.served is not None and r.served.edit_similarity == r.candidate.edit_similarity
    decision = gate(r, DEFAULTS)
    assert not decision.promote and decision.failed == ("primary",), decision.reasons


# Primary metrics on a 0..1 scale, so the waived margin of -1 always passes.
@pytest.mark.parametrize(("guardrail", "primary"), [
    ("heldout_loss", "edit_similarity"), ("edit_similarity", "exact_match"), ("exact_match", "edit_similarity"),
    ("preference_accuracy", "edit_similarity")])
def test_each_guardrail_rejects_a_real_regression(reports: dict[str, EvalReport], guardrail: str,
                                                  primary: str) -> None:
    # The weak adapter against the strong one as champion, the primary margin waived (-1): only the
    # guardrail under test has its default tolerance, and it must reject; relaxed, it lets the same scores by.
    r = reports["weak_vs_strong"]
    tolerance = {"heldout_loss": "heldout_loss_tolerance_rel"}.get(guardrail, f"{guardrail}_tolerance")
    strict = dataclasses.replace(RELAXED, primary_metric=primary,
                                 **{tolerance: getattr(DEFAULTS, tolerance)})  # type: ignore[arg-type]
    decision = gate(r, strict)
    assert not decision.promote and f"guardrail:{guardrail}" in decision.failed, decision.reasons
    assert set(decision.failed) <= {f"guardrail:{guardrail}", "base"}
    assert any(reason.startswith(f"guardrail {guardrail.replace('_', ' ')}") or "held-out loss" in reason
               for reason in decision.reasons)
    assert f"guardrail:{guardrail}" not in gate(r, dataclasses.replace(RELAXED, primary_metric=primary)).failed


def test_the_length_guardrail_rejects_a_model_that_stops_at_once(reports: dict[str, EvalReport]) -> None:
    r = reports["silent_vs_strong"]
    assert r.served is not None and r.candidate.generated_tokens is not None
    assert r.served.generated_tokens is not None and r.candidate.generated_tokens < r.served.generated_tokens / 2
    strict = dataclasses.replace(RELAXED, generated_length_tolerance=DEFAULTS.generated_length_tolerance)
    decision = gate(r, strict)
    assert not decision.promote and "guardrail:generated_length" in decision.failed, decision.reasons
    assert "guardrail:generated_length" not in gate(r, RELAXED).failed

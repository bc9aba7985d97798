"""Row scores remembered from one evaluation to the next (pipelines/evaluate/scores.py), on real tiny models.

The evaluation must report the same numbers whether it scores every row or takes the rows it scored the night
before: exactly when nothing is recomputed, within floating-point noise when the held-out set moved (a
remembered row was scored in a batch of another width)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pipelines.evaluate.gate import EvalReport, ModelScore
from runs import fim_rows, pair_rows, random_adapter, run_module, write_jsonl


def evaluate(strong_run: Path, folder: Path, served: Path, scores: Path | None,
             heldout: list[dict[str, Any]] | None = None) -> EvalReport:
    """An evaluation of the strong run's adapter against `served`, in a run folder of its own."""
    config = json.loads((strong_run / "config.json").read_text())
    config.update(served_adapter=str(served), scores_dir=str(scores) if scores else None)
    folder.mkdir(parents=True)
    os.symlink(strong_run / "adapter", folder / "adapter")
    if heldout is None:
        os.symlink(strong_run / "data", folder / "data")
    else:
        write_jsonl(folder / "data" / "heldout.jsonl", heldout)
    (folder / "config.json").write_text(json.dumps(config))
    run_module("pipelines.evaluate", folder)
    return EvalReport.load(folder / "eval.json")


def close(a: ModelScore, b: ModelScore, loss_rel: float, share: float) -> bool:
    return (math.isclose(a.heldout_loss, b.heldout_loss, rel_tol=loss_rel)
            and all(abs(getattr(a, k) - getattr(b, k)) <= share
                    for k in ("exact_match", "edit_similarity", "preference_accuracy"))
            and abs((a.generated_tokens or 0) - (b.generated_tokens or 0)) <= share * 16)


def test_remembered_scores_report_what_scoring_every_row_reports(strong_run: Path, tiny_model: Path,
                                                                  tmp_path: Path) -> None:
    served = random_adapter(tiny_model, tmp_path / "served", seed=5)
    scores = tmp_path / "scores"
    every = evaluate(strong_run, tmp_path / "every", served, None)
    first = evaluate(strong_run, tmp_path / "first", served, scores)
    assert first.remembered_rows == 0 and not (tmp_path / "every" / "scores").exists()
    assert (first.base, first.served, first.candidate) == (every.base, every.served, every.candidate)
    assert every.served != every.candidate  # two different adapters, or the test proves little
    # 32 FIM rows, 24 pairs and 24 generated rows, for each of the three models.
    assert len(list((scores / "team-t").glob("*.json"))) == 3

    again = evaluate(strong_run, tmp_path / "again", served, scores)
    assert again.remembered_rows == 3 * (32 + 24 + 24)
    assert (again.base, again.served, again.candidate) == (first.base, first.served, first.candidate)

    # The next night: the 8 oldest FIM rows left the held-out set and 8 newer ones came in.
    held = fim_rows(32, seed=2, start_day=25)[8:] + fim_rows(8, seed=9, start_day=40) + pair_rows(24, seed=3,
                                                                                              kind="pair")
    moved = evaluate(strong_run, tmp_path / "moved", served, scores, held)
    assert moved.remembered_rows == 3 * (24 + 24 + 16)  # generation takes the newest 24: 16 of them known
    fresh = evaluate(strong_run, tmp_path / "fresh", served, None, held)
    for name in ("base", "served", "candidate"):
        assert close(getattr(moved, name), getattr(fresh, name), loss_rel=1e-5, share=1 / 24), name


def test_a_new_served_adapter_is_scored_again_and_stale_files_go(strong_run: Path, tiny_model: Path,
                                                                 tmp_path: Path) -> None:
    scores = tmp_path / "scores"
    evaluate(strong_run, tmp_path / "one", random_adapter(tiny_model, tmp_path / "a", seed=6), scores)
    other = evaluate(strong_run, tmp_path / "two", random_adapter(tiny_model, tmp_path / "b", seed=7), scores)
    assert other.remembered_rows == 2 * (32 + 24 + 24)  # base and candidate known; the new served adapter not
    assert len(list((scores / "team-t").glob("*.json"))) == 3  # adapter a's file is gone

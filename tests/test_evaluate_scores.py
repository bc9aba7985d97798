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


def test_pairs_scored_with_a_shared_prompt_match_each_side_scored_alone(tiny_model: Path) -> None:
    """pair_logps puts the prompt through the model once for both sides (batching.Shared); the numbers must be
    those of scoring each side as its own row, including a pair whose sides hold different prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.evaluate.evaluate import pair_logps, row_logps
    from pipelines.train.batching import encode
    from pipelines.train.losses import LM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    lm = LM.of(model, None)
    assert lm.shares_prompts  # SDPA: the shared layout is what runs
    rows = pair_rows(9, seed=4)
    prompts = [r["prompt"] for r in rows]
    chosen = encode(tokenizer, prompts, [r["chosen"] for r in rows], 256)
    rejected = encode(tokenizer, prompts, [r["rejected"] for r in rows], 256)
    pairs = [(c, r) for c, r in zip(chosen, rejected, strict=True) if c is not None and r is not None]
    other = encode(tokenizer, ["def other():\n    return"], [" 1\n"], 256)[0]
    assert other is not None
    pairs.append((pairs[0][0], other))  # sides with different prompts: scored apart
    device = torch.device("cpu")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    got = pair_logps(lm, pairs, 4, pad, device)
    alone = row_logps(lm, [c for c, _ in pairs] + [r for _, r in pairs], 1, pad, device)
    want = list(zip(alone[:len(pairs)], alone[len(pairs):], strict=True))
    assert len(got) == len(pairs) >= 6
    for (gc, gr), (wc, wr) in zip(got, want, strict=True):
        assert math.isclose(gc, wc, rel_tol=1e-4, abs_tol=1e-4) and math.isclose(gr, wr, rel_tol=1e-4, abs_tol=1e-4)
    assert len({round(c - r, 3) for c, r in got}) > 1  # the pairs differ: nothing trivially equal

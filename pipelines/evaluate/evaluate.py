"""Score base, served and candidate on a run's held-out rows: `python -m pipelines.evaluate RUN_DIR`.

All three run on the same rows in one process: the base model is loaded once, the candidate and the served
adapter are attached to it by name, and the base is scored with adapters disabled. For each model:
- held-out loss: mean cross-entropy per middle token of the held-out FIM rows (logits only at the middle);
- exact match and edit similarity (pipelines/evaluate/metrics.py) of a greedy completion of each FIM prompt,
  generated in left-padded batches, against the middle the developer kept;
- mean generated length, in tokens: the gate refuses a candidate that wins by saying less;
- replay preference accuracy on held-out logged pairs: the share where the model gives the accepted
  completion a higher log-likelihood (summed over its tokens) than the rejected one.
Writes RUN_DIR/eval.json (an `EvalReport`); the gate decision is made by the caller (pipelines.evaluate.gate).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.evaluate.gate import EvalReport, ModelScore
from pipelines.evaluate.metrics import edit_similarity, exact_match
from pipelines.files import write_json_atomic
from pipelines.train.batching import Encoded, collate, encode
from pipelines.train.losses import LM, sequence_logps, token_logps
from pipelines.train.rundir import RunConfig, read_rows
from pipelines.train.train import pick_device, quiet_libraries

log = logging.getLogger("devtune.evaluate")


@torch.no_grad()
def heldout_loss(lm: LM, seqs: list[Encoded], batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean cross-entropy per middle token; batches of similar length pad least."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        logps, _ = token_logps(lm, collate([seqs[i] for i in order[start:start + batch_size]], pad_id, device))
        total -= logps.sum().item()
        count += len(logps)
    return total / count if count else float("nan")


@torch.no_grad()
def preference_accuracy(lm: LM, pairs: list[tuple[Encoded, Encoded]], batch_size: int, pad_id: int,
                        device: torch.device) -> float | None:
    """Share of pairs whose chosen completion has the higher log-likelihood (ties count as wrong)."""
    if not pairs:
        return None
    right = 0
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        logps = sequence_logps(lm, collate([c for c, _ in part] + [r for _, r in part], pad_id, device))
        right += int((logps[: len(part)] > logps[len(part):]).sum().item())
    return right / len(pairs)


@torch.no_grad()
def generate_middles(model: Any, prompts: list[list[int]], end_ids: list[int], pad_id: int, batch_size: int,
                     max_new_tokens: int, device: torch.device) -> list[list[int]]:
    """Greedy completion of each prompt up to an end token, in left-padded batches of similar length."""
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in part)
        input_ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(part), width), dtype=torch.long)
        for row, i in enumerate(part):
            input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention[row, width - len(prompts[i]):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_ids,
                                   pad_token_id=pad_id, use_cache=True)
        for row, i in enumerate(part):
            ids = generated[row, width:].tolist()
            cut = next((k for k, t in enumerate(ids) if t in end_ids), len(ids))
            out[i] = ids[:cut]
    return out


def generation_scores(tokenizer: Any, generated: list[list[int]], references: list[list[int]]) -> dict[str, float]:
    texts = tokenizer.batch_decode(generated, skip_special_tokens=False)
    kept = tokenizer.batch_decode(references, skip_special_tokens=False)
    n = len(texts)
    return {"exact_match": sum(exact_match(g, k) for g, k in zip(texts, kept, strict=True)) / n,
            "edit_similarity": sum(edit_similarity(g, k) for g, k in zip(texts, kept, strict=True)) / n,
            "generated_tokens": sum(len(g) for g in generated) / n}


def evaluate_run(run_dir: Path) -> EvalReport:
    run = RunConfig.read(run_dir)
    cfg = run.evaluate
    device = torch.device(pick_device(run.train.device))
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(run.base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(run.base_model, dtype=dtype).to(device)
    held = read_rows(run_dir / "data" / "heldout.jsonl")
    # Held-out rows are oldest first: score the most recent.
    fim_rows = [r for r in held if r.get("kind", "fim") == "fim"][-cfg.max_rows:]
    pair_rows = [r for r in held if r.get("kind") == "pair"][-cfg.max_rows:]
    fim = [e for e in encode(tokenizer, [r["prompt"] for r in fim_rows], [r["completion"] for r in fim_rows],
                             run.max_row_tokens) if e is not None]
    prompts = [r["prompt"] for r in pair_rows]
    chosen = encode(tokenizer, prompts, [r["chosen"] for r in pair_rows], run.max_row_tokens)
    rejected = encode(tokenizer, prompts, [r["rejected"] for r in pair_rows], run.max_row_tokens)
    pairs = [(c, r) for c, r in zip(chosen, rejected, strict=True) if c is not None and r is not None]
    to_generate = fim[-cfg.generate_rows:] if cfg.generate_rows else []
    # The kept middle without its end token; the end token is what stops generation.
    end_ids = sorted({e.ids[-1] for e in to_generate})
    references = [e.ids[e.n_prompt:-1] for e in to_generate]
    generate_prompts = [e.ids[: e.n_prompt] for e in to_generate]

    model = PeftModel.from_pretrained(base, run_dir / "adapter", adapter_name="candidate").to(device)
    model.eval()
    names = ["candidate"]
    if run.served_adapter:
        model.load_adapter(run.served_adapter, adapter_name="served")
        names.append("served")
    lm = LM.of(model, None)
    scores: dict[str, ModelScore] = {}
    generating = 0.0

    def score() -> ModelScore:
        nonlocal generating
        loss = heldout_loss(lm, fim, cfg.batch_size, pad_id, device)
        accuracy = preference_accuracy(lm, pairs, cfg.batch_size, pad_id, device)
        if not to_generate:
            return ModelScore(heldout_loss=loss, preference_accuracy=accuracy)
        t = time.monotonic()
        generated = generate_middles(model, generate_prompts, end_ids, pad_id, cfg.generate_batch_size,
                                     cfg.max_new_tokens, device)
        generating += time.monotonic() - t
        return ModelScore(heldout_loss=loss, preference_accuracy=accuracy,
                          **generation_scores(tokenizer, generated, references))

    with model.disable_adapter():
        scores["base"] = score()
    for name in names:
        model.set_adapter(name)
        scores[name] = score()
    report = EvalReport(
        rows=len(fim), tokens=sum(e.n_target for e in fim), base=scores["base"], candidate=scores["candidate"],
        served=scores.get("served"), seconds=time.monotonic() - started, generated_rows=len(to_generate),
        reference_tokens=sum(len(r) for r in references) / len(references) if references else 0.0,
        pair_rows=len(pairs),
        generated_rows_per_s=len(to_generate) * len(scores) / generating if generating else 0.0)
    write_json_atomic(run_dir / "eval.json", report.as_dict())
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.evaluate RUN_DIR", file=sys.stderr)
        return 2
    quiet_libraries()
    report = evaluate_run(Path(args[0]))
    for name in ("base", "served", "candidate"):
        s: ModelScore | None = getattr(report, name)
        if s is None:
            continue
        gen = (f", exact match {s.exact_match:.3f}, edit similarity {s.edit_similarity:.3f}, "
               f"{s.generated_tokens:.1f} tokens generated" if s.edit_similarity is not None else "")
        pref = f", preference accuracy {s.preference_accuracy:.3f}" if s.preference_accuracy is not None else ""
        log.info("%s: held-out loss %.4f%s%s", name, s.heldout_loss, gen, pref)
    log.info("%d held-out rows (%d tokens), %d completed (%.1f rows/s), %d pairs, in %.1fs", report.rows,
             report.tokens, report.generated_rows, report.generated_rows_per_s, report.pair_rows, report.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

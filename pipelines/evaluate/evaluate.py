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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.evaluate.gate import EvalReport, ModelScore
from pipelines.evaluate.metrics import edit_similarity, exact_match
from pipelines.evaluate.scores import RowScores, adapter_identity, base_identity, forget_others, row_key
from pipelines.files import write_json_atomic
from pipelines.train.batching import Encoded, Shared, collate, collate_shared, encode
from pipelines.train.losses import LM, sequence_logps, shared_logps
from pipelines.train.rundir import RunConfig, read_rows
from pipelines.train.train import pick_device, quiet_libraries

log = logging.getLogger("devtune.evaluate")


@torch.no_grad()
def row_logps(lm: LM, seqs: list[Encoded], batch_size: int, pad_id: int, device: torch.device) -> list[float]:
    """Each row's completion log-likelihood, summed over its tokens; batches of similar length pad least."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    out = [0.0] * len(seqs)
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        logps = sequence_logps(lm, collate([seqs[i] for i in part], pad_id, device)).tolist()
        for i, value in zip(part, logps, strict=True):
            out[i] = value
    return out


@torch.no_grad()
def pair_logps(lm: LM, pairs: list[tuple[Encoded, Encoded]], batch_size: int, pad_id: int,
               device: torch.device) -> list[tuple[float, float]]:
    """Each pair's (chosen, rejected) completion log-likelihoods. Where both sides hold the same prompt (all
    but a pair whose sides were cut to different lengths) and the attention takes a mask, the prompt goes
    through the model once for both, laid out as DPO training scores its pairs (batching.Shared); the rest are
    scored as two rows each."""
    out = [(0.0, 0.0)] * len(pairs)
    units: dict[int, Shared] = {}
    apart: list[int] = []
    for i, (c, r) in enumerate(pairs):
        if lm.shares_prompts and c.n_prompt == r.n_prompt and c.ids[:c.n_prompt] == r.ids[:r.n_prompt]:
            units[i] = Shared(c.ids[:c.n_prompt], (c.ids[c.n_prompt:], r.ids[r.n_prompt:]))
        else:
            apart.append(i)
    order = sorted(units, key=lambda i: units[i].n_tokens)
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        logps = shared_logps(lm, collate_shared([units[i] for i in part], pad_id, device, True))
        for i, (chosen, rejected) in zip(part, logps.view(len(part), 2).tolist(), strict=True):
            out[i] = (chosen, rejected)
    if apart:
        flat = row_logps(lm, [pairs[i][0] for i in apart] + [pairs[i][1] for i in apart], batch_size, pad_id, device)
        for j, i in enumerate(apart):
            out[i] = (flat[j], flat[len(apart) + j])
    return out


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


GENERATION_SCORES = ("exact_match", "edit_similarity", "generated_tokens")


def generation_row_scores(tokenizer: Any, generated: list[list[int]],
                          references: list[list[int]]) -> list[list[float]]:
    """Per generated middle: exact match (0 or 1), edit similarity and length in tokens (GENERATION_SCORES)."""
    texts = tokenizer.batch_decode(generated, skip_special_tokens=False)
    kept = tokenizer.batch_decode(references, skip_special_tokens=False)
    return [[float(exact_match(g, k)), edit_similarity(g, k), float(len(ids))]
            for g, k, ids in zip(texts, kept, generated, strict=True)]


def generation_scores(tokenizer: Any, generated: list[list[int]], references: list[list[int]]) -> dict[str, float]:
    rows = generation_row_scores(tokenizer, generated, references)
    return {name: sum(r[k] for r in rows) / len(rows) for k, name in enumerate(GENERATION_SCORES)}


def _remembered(scores: RowScores, keys: list[str], compute: Callable[[list[int]], list[list[float]]]
                ) -> list[list[float]]:
    """Each key's values: remembered in `scores`, else computed (`compute` gets the indices of the rows to
    score, all in one call so they batch) and remembered."""
    out = [scores.get(k) for k in keys]
    todo = [i for i, v in enumerate(out) if v is None]
    if todo:
        for i, values in zip(todo, compute(todo), strict=True):
            scores.put(keys[i], values)
            out[i] = values
    return [v for v in out if v is not None]


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
    adapters = {"candidate": run_dir / "adapter"}
    if run.served_adapter:
        model.load_adapter(run.served_adapter, adapter_name="served")
        adapters["served"] = Path(run.served_adapter)
    lm = LM.of(model, None)
    fim_keys = [row_key(e.ids, e.n_prompt) for e in fim]
    pair_keys = [row_key(c.ids, c.n_prompt, r.ids, r.n_prompt) for c, r in pairs]
    generate_keys = [row_key(e.ids, e.n_prompt, end_ids, cfg.max_new_tokens) for e in to_generate]
    scores_dir = Path(run.scores_dir) if run.scores_dir else None
    base_id = base_identity(run.base_model) if scores_dir else ""
    settings = f"|{dtype}|{device.type}"
    scores: dict[str, ModelScore] = {}
    generating, generated_rows = 0.0, 0  # rows generated (not remembered) by all models together

    def pair_scores(todo: list[int]) -> list[list[float]]:
        return [[c, r] for c, r in pair_logps(lm, [pairs[i] for i in todo], cfg.batch_size, pad_id, device)]

    def generated(todo: list[int]) -> list[list[float]]:
        nonlocal generating, generated_rows
        t = time.monotonic()
        middles = generate_middles(model, [generate_prompts[i] for i in todo], end_ids, pad_id,
                                   cfg.generate_batch_size, cfg.max_new_tokens, device)
        generating += time.monotonic() - t
        generated_rows += len(todo)
        return generation_row_scores(tokenizer, middles, [references[i] for i in todo])

    def score(remembered: RowScores) -> ModelScore:
        fim_logps = _remembered(remembered, fim_keys, lambda todo: [
            [v] for v in row_logps(lm, [fim[i] for i in todo], cfg.batch_size, pad_id, device)])
        pair_values = _remembered(remembered, pair_keys, pair_scores)
        target_tokens = sum(e.n_target for e in fim)
        loss = -sum(v[0] for v in fim_logps) / target_tokens if target_tokens else float("nan")
        accuracy = sum(c > r for c, r in pair_values) / len(pairs) if pairs else None
        if not to_generate:
            return ModelScore(heldout_loss=loss, preference_accuracy=accuracy)
        rows = _remembered(remembered, generate_keys, generated)
        return ModelScore(heldout_loss=loss, preference_accuracy=accuracy,
                          **{name: sum(r[k] for r in rows) / len(rows) for k, name in enumerate(GENERATION_SCORES)})

    def model_key(name: str) -> str | None:
        """What a model's remembered numbers are filed under, or None to remember nothing."""
        if scores_dir is None:
            return None
        if name == "base":
            return base_id + settings
        digest = adapter_identity(adapters[name])
        return f"{base_id}|{digest}{settings}" if digest else None

    hits, kept = 0, []
    for name in ("base", *adapters):
        remembered = RowScores(scores_dir, run.scope, model_key(name))
        if name == "base":
            with model.disable_adapter():
                scores[name] = score(remembered)
        else:
            model.set_adapter(name)
            scores[name] = score(remembered)
        remembered.save()
        hits += remembered.hits
        kept.append(remembered.path)
    if scores_dir is not None:
        # Tomorrow's served adapter is tonight's served one or tonight's candidate: every other file is stale.
        forget_others(scores_dir, run.scope, kept)
    report = EvalReport(
        rows=len(fim), tokens=sum(e.n_target for e in fim), base=scores["base"], candidate=scores["candidate"],
        served=scores.get("served"), seconds=time.monotonic() - started, generated_rows=len(to_generate),
        reference_tokens=sum(len(r) for r in references) / len(references) if references else 0.0,
        pair_rows=len(pairs),
        generated_rows_per_s=generated_rows / generating if generating else 0.0,
        remembered_rows=hits)
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

"""Score base, served and candidate on a run's held-out rows: `python -m pipelines.evaluate RUN_DIR`.

All three run on the same rows in one process: the base model is loaded once, the candidate and the served
adapter are attached to it by name, and the base is scored with adapters disabled. Writes RUN_DIR/eval.json
(an `EvalReport`); the gate decision is made by the caller (pipelines.gate), not here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.gate import EvalReport, ModelScore
from pipelines.rundir import RunConfig, write_json_atomic
from pipelines.train import pick_device, quiet_libraries

log = logging.getLogger("devtune.evaluate")


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], max_tokens: int) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per row, tokenized as the trainer does: prompt, then middle."""
    out = []
    for r in rows:
        prompt = tokenizer(r["prompt"])["input_ids"]
        middle = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        if len(prompt) + len(middle) > max_tokens:  # the dataset builder already fits rows; keep the middle
            prompt = prompt[len(prompt) + len(middle) - max_tokens:]
        out.append((prompt + middle, len(prompt)))
    return out


@torch.no_grad()
def heldout_loss(model: Any, encoded: list[tuple[list[int], int]], batch_size: int, pad_id: int,
                 device: str) -> tuple[float, int]:
    """Mean cross-entropy per middle token, and the number of middle tokens scored.

    Logits are computed only at middle positions: a 150k-token vocabulary (Qwen2.5) times every prompt
    position would take gigabytes per batch for numbers the metric never reads.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    total, count = 0.0, 0
    # Length-sorted batches pad least.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            # position t predicts token t+1: the middle's tokens are predicted from n_prompt-1 onwards
            targets[row, n_prompt - 1: len(ids) - 1] = torch.tensor(ids[n_prompt:])
        input_ids, attention, targets = input_ids.to(device), attention.to(device), targets.to(device)
        hidden = decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        mask = targets != -100
        logits = head(hidden[mask]).float()
        total += torch.nn.functional.cross_entropy(logits, targets[mask], reduction="sum").item()
        count += int(mask.sum().item())
    return (total / count if count else float("nan")), count


def evaluate_run(run_dir: Path) -> EvalReport:
    run = RunConfig.read(run_dir)
    device = pick_device(run.train.device)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(run.base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(run.base_model, dtype=dtype).to(device)
    rows = [json.loads(x) for x in (run_dir / "data" / "heldout.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("kind", "fim") == "fim"]  # held-out pairs (kind "pair") are for preference
    rows = rows[-run.evaluate.max_rows:]  # held-out rows are oldest first: score the most recent
    encoded = encode_rows(tokenizer, rows, run.max_row_tokens)

    model = PeftModel.from_pretrained(base, run_dir / "adapter", adapter_name="candidate").to(device)
    model.eval()
    scores: dict[str, ModelScore] = {}
    tokens = 0
    with model.disable_adapter():
        loss, tokens = heldout_loss(model.get_base_model(), encoded, run.evaluate.batch_size, pad_id, device)
        scores["base"] = ModelScore(loss)
    names = ["candidate"]
    if run.served_adapter:
        model.load_adapter(run.served_adapter, adapter_name="served")
        names.append("served")
    for name in names:
        model.set_adapter(name)
        loss, _ = heldout_loss(model.get_base_model(), encoded, run.evaluate.batch_size, pad_id, device)
        scores[name] = ModelScore(loss)
    report = EvalReport(rows=len(rows), tokens=tokens, base=scores["base"], candidate=scores["candidate"],
                        served=scores.get("served"), seconds=time.monotonic() - started)
    write_json_atomic(run_dir / "eval.json", report.as_dict())
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.evaluate RUN_DIR", file=sys.stderr)
        return 2
    quiet_libraries()
    report = evaluate_run(Path(args[0]))
    served = f", served {report.served.heldout_loss:.4f}" if report.served else ""
    log.info("held-out loss on %d rows (%d tokens): base %.4f, candidate %.4f%s", report.rows, report.tokens,
             report.base.heldout_loss, report.candidate.heldout_loss, served)
    return 0


if __name__ == "__main__":
    sys.exit(main())

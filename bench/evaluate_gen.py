"""Evaluation throughput: held-out rows/s for the generation metrics, batched against one row at a time.

    python bench/evaluate_gen.py [--reps 3] [--rows 64] [--max-new-tokens 32] [--model bench|demo]

Each measurement completes the same held-out FIM prompts greedily (devtune's `generate_middles`, left-padded
batches of similar length, stopping at the end-of-middle token) and scores exact match and edit similarity
against the kept middles, as `pipelines.evaluate` does for every model. Rows/s counts the scoring too.
--model bench: the benchmarks' 5M Llama (random weights: it never stops, so every row runs to the cap);
--model demo: a demo state's trained team adapter on its base (stops where it learned to), given with
--state-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import bench_model, bench_rows, interleave, peak_rss_mb, summary


def run(batch: int, rows: int, max_new_tokens: int, state_dir: str) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.evaluate.evaluate import generate_middles, generation_scores
    from pipelines.train.batching import encode
    from pipelines.train.rundir import read_rows

    if state_dir:
        served = Path(state_dir) / "served" / "team:payments"
        base_dir = json.loads((served / "lineage.json").read_text())["base_model"]
        data = [r for r in read_rows(Path(json.loads((served / "lineage.json").read_text())["dataset"]["out_dir"])
                                     / "heldout.jsonl")]
    else:
        base_dir, served, data = str(bench_model()), None, bench_rows("built")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if served is not None:
        model = PeftModel.from_pretrained(model, served)
    model.eval()
    data = data[:rows]
    encoded = [e for e in encode(tokenizer, [r["prompt"] for r in data], [r["completion"] for r in data], 2048)
               if e is not None]
    prompts = [e.ids[: e.n_prompt] for e in encoded]
    references = [e.ids[e.n_prompt:-1] for e in encoded]
    end_ids = sorted({e.ids[-1] for e in encoded})
    started = time.monotonic()
    generated = generate_middles(model, prompts, end_ids, tokenizer.pad_token_id or 0, batch, max_new_tokens,
                                 torch.device("cpu"))
    scores = generation_scores(tokenizer, generated, references)
    seconds = time.monotonic() - started
    return {"rows": len(prompts), "seconds": seconds, "rows_per_s": len(prompts) / seconds,
            "generated_tokens": scores["generated_tokens"], "edit_similarity": scores["edit_similarity"],
            "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--state-dir", default="", help="a `devtune demo` state directory (--model demo)")
    args = parser.parse_args()
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        batch = 1 if args.worker == "one-by-one" else args.batch
        print(json.dumps(run(batch, args.rows, args.max_new_tokens, args.state_dir)))
        return 0
    what = f"the demo's team adapter in {args.state_dir}" if args.state_dir else "the 5M Llama (random weights)"
    print(f"held-out rows/s for generation metrics: {args.rows} rows, up to {args.max_new_tokens} new tokens, "
          f"{what}, batch {args.batch} vs 1, {args.reps} interleaved repetitions", flush=True)
    extra = ["--rows", str(args.rows), "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens)]
    if args.state_dir:
        extra += ["--state-dir", args.state_dir]
    results = interleave(Path(__file__), ["one-by-one", "batched"], args.reps, extra)
    print(summary(results, "rows_per_s", "one-by-one", "batched"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

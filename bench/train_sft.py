"""SFT throughput: devtune's training path against TRL's SFTTrainer set up sensibly for the device.

    python bench/train_sft.py [--reps 4] [--steps 16] [--data built|spread]

Both train a fresh LoRA (r 16, all linear layers) on the same FIM rows of at most 512 tokens, batch 8,
fp32 on CPU, and count non-padding tokens per second of their training loop. The TRL baseline is what
devtune shipped before this path: bf16=False, use_cpu=True, no gradient checkpointing, no packing,
completion-only loss (TRL's bare defaults turn on bf16 and gradient checkpointing, 15x slower on this CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import bench_model, bench_rows, interleave, peak_rss_mb, summary

BATCH, MAX_TOKENS, LR = 8, 512, 2e-4


def lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def run_trl(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model_dir = bench_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=BATCH,
                     learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, max_length=MAX_TOKENS,
                     completion_only_loss=True, packing=False, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, report_to=[], logging_steps=steps, save_strategy="no",
                     disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora())
    padded = {"tokens": 0}
    collate = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> Any:  # bench-only: how much of each batch is padding
        batch = collate(examples)
        padded["tokens"] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    tokens = int(trainer._total_train_tokens)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "real_share": tokens / padded["tokens"], "peak_rss_mb": peak_rss_mb()}


def run_devtune(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from pipelines.config import TrainConfig
    from pipelines.train.batching import micro_batches, plan_steps
    from pipelines.train.fit import Settings
    from pipelines.train.losses import LM
    from pipelines.train.train import attach_adapter, encode_sft, load_base_model, runtime, sft_stage

    torch.manual_seed(0)
    model_dir = bench_model()
    cfg = TrainConfig(max_steps=steps, batch_size=BATCH, learning_rate=LR, lora_r=16, lora_alpha=32,
                      logging_steps=steps, checkpoint_every_steps=10 * steps, device="cpu")
    rt = runtime(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, _, _ = attach_adapter(load_base_model(str(model_dir), cfg, rt), cfg, None)
    examples = encode_sft(tokenizer, [{**r, "special": True} for r in rows], MAX_TOKENS)
    settings = Settings(run_dir=Path(tempfile.mkdtemp()), logging_steps=steps, checkpoint_every=10 * steps,
                        stage_index=1, stage_count=1)
    started = time.monotonic()
    result = sft_stage(examples, cfg, model, LM.of(model, None), 0, settings, rt)
    seconds = time.monotonic() - started
    lengths = [len(e.ids) for e in examples]
    padded = sum(len(part) * max(lengths[i] for i in part)
                 for step in plan_steps(lengths, BATCH, steps, cfg.seed)
                 for part in micro_batches(step, lengths, BATCH))
    return {"tokens": result.tokens, "seconds": seconds, "tokens_per_s": result.tokens / seconds,
            "real_share": result.tokens / padded, "loss": result.loss, "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["trl", "devtune"])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--data", choices=["built", "spread"], default="spread")
    args = parser.parse_args()
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        rows = bench_rows(args.data)
        result = (run_trl if args.worker == "trl" else run_devtune)(rows, args.steps)
        print(json.dumps(result))
        return 0
    bench_model()
    rows = bench_rows(args.data)
    print(f"SFT tokens/s, 5M Llama, batch {BATCH} x <= {MAX_TOKENS} tokens, {args.steps} steps, data={args.data} "
          f"({len(rows)} rows), {args.reps} interleaved repetitions", flush=True)
    results = interleave(Path(__file__), ["trl", "devtune"], args.reps, ["--steps", str(args.steps),
                                                                        "--data", args.data])
    print(summary(results, "tokens_per_s", "trl", "devtune"))
    shares = {p: sum(r["real_share"] for r in rs) / len(rs) for p, rs in results.items()}
    print("real (non-padding) share of computed tokens: " + ", ".join(f"{p} {s:.0%}" for p, s in shares.items()))
    assert all(math.isfinite(r["tokens_per_s"]) for rs in results.values() for r in rs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DPO throughput: devtune's DPO stage against TRL's DPOTrainer set up the same way for the device.

    python bench/train_dpo.py [--reps 4] [--pairs 64] [--data built|spread]

Both train a fresh LoRA (r 16, all linear layers) for one pass over the same pairs (prompt = a FIM prompt
of at most 512 tokens, chosen = the kept middle, rejected = another row's middle), batch 8, fp32 on CPU:
bf16=False, use_cpu=True, no gradient checkpointing, sigmoid loss, beta 0.1. TRL uses the adapter-disabled
model as the reference (a second forward pass in every step); devtune computes the reference
log-likelihoods once, up front, and that time is counted in its pairs/s.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import bench_model, bench_rows, interleave, peak_rss_mb, summary

BATCH, MAX_TOKENS, LR, BETA = 8, 512, 5e-5, 0.1


def pairs(data: str, n: int) -> list[dict[str, str]]:
    rows = bench_rows(data)[:n]
    rng = random.Random(0)
    others = [r["completion"] for r in rows]
    rng.shuffle(others)
    return [{"prompt": r["prompt"], "chosen": r["completion"],
             "rejected": o if o != r["completion"] else others[0]} for r, o in zip(rows, others, strict=True)]


def lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def run_trl(data: list[dict[str, str]]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model_dir = bench_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    steps = len(data) // BATCH
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=BATCH,
                     learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=MAX_TOKENS, use_cpu=True,
                     bf16=False, gradient_checkpointing=False, report_to=[], logging_steps=steps,
                     save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                         peft_config=lora())
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    return {"pairs": steps * BATCH, "seconds": seconds, "pairs_per_s": steps * BATCH / seconds,
            "peak_rss_mb": peak_rss_mb()}


def run_devtune(data: list[dict[str, str]]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from pipelines.config import TrainConfig
    from pipelines.train.fit import Settings
    from pipelines.train.losses import LM
    from pipelines.train.train import attach_adapter, dpo_stage, load_base_model, runtime

    torch.manual_seed(0)
    model_dir = bench_model()
    cfg = TrainConfig(batch_size=BATCH, preference_learning_rate=LR, beta=BETA, lora_r=16, lora_alpha=32,
                      preference_epochs=1.0, logging_steps=1000, checkpoint_every_steps=1000, device="cpu")
    rt = runtime(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, _, _ = attach_adapter(load_base_model(str(model_dir), cfg, rt), cfg, None)
    settings = Settings(run_dir=Path(tempfile.mkdtemp()), logging_steps=1000, checkpoint_every=1000,
                        stage_index=1, stage_count=1)
    started = time.monotonic()  # includes computing the reference log-likelihoods
    result = dpo_stage(data, tokenizer, MAX_TOKENS, cfg, model, LM.of(model, None), 0, settings, rt)
    seconds = time.monotonic() - started
    trained = result.steps * BATCH
    return {"pairs": trained, "seconds": seconds, "pairs_per_s": trained / seconds, "loss": result.loss,
            "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["trl", "devtune"])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--data", choices=["built", "spread"], default="spread")
    args = parser.parse_args()
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        data = pairs(args.data, args.pairs)
        print(json.dumps((run_trl if args.worker == "trl" else run_devtune)(data)))
        return 0
    bench_model()
    print(f"DPO pairs/s, 5M Llama, batch {BATCH} pairs x <= {MAX_TOKENS} tokens, one pass over {args.pairs} pairs, "
          f"data={args.data}, {args.reps} interleaved repetitions", flush=True)
    results = interleave(Path(__file__), ["trl", "devtune"], args.reps,
                         ["--pairs", str(args.pairs), "--data", args.data])
    print(summary(results, "pairs_per_s", "trl", "devtune"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

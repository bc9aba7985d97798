"""SFT throughput: devtune's training path against TRL's SFTTrainer set up as a competent user would on this device.

    python bench/train_sft.py [--reps 4] [--steps 16] [--data built|spread] [--threads 1]
    python bench/train_sft.py --check [--data built|spread]       # is the comparison fair? (untimed)

Both train a fresh LoRA (r 16, alpha 32, dropout 0.05, all linear layers) on the same FIM rows of at most 512
tokens, batch 8, the same number of optimizer steps, lr 2e-4 with warmup and cosine decay, fp32 on CPU, and
count non-padding tokens per second of their training loop. The TRL baseline (bench/README.md says why for each):
bf16=False, use_cpu=True, no gradient checkpointing (TRL's defaults: bf16 and gradient checkpointing, 15x
slower on this CPU), its own length grouping (train_sampling_strategy="group_by_length"), no packing,
completion-only loss.

--check trains both for the same steps on the same batches (TRL's dataset in devtune's step order, read
sequentially), from the same initial adapter, without dropout or warmup, and prints the per-step losses side by
side; it first checks that TRL's tokenized rows equal devtune's (ids and loss positions).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import Clock, bench_model, bench_rows, interleave, peak_rss_mb, summary

BATCH, MAX_TOKENS, LR = 8, 512, 2e-4


def lora(dropout: float = 0.05) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")


def trl_trainer(rows: list[dict[str, Any]], steps: int, sampling: str = "group_by_length", dropout: float = 0.05,
                warmup: float = 0.03, logging_steps: int | None = None) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model_dir = bench_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=BATCH,
                     learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=warmup, max_length=MAX_TOKENS,
                     completion_only_loss=True, packing=False, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, train_sampling_strategy=sampling, report_to=[],
                     logging_steps=logging_steps or steps, save_strategy="no", disable_tqdm=True,
                     dataloader_pin_memory=False, seed=0)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      peft_config=lora(dropout))


def run_trl(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    trainer = trl_trainer(rows, steps)
    padded = {"tokens": 0}
    collate = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> Any:  # bench-only: how much of each batch is padding
        batch = collate(examples)
        padded["tokens"] += batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting
    with Clock() as clock:
        trainer.train()
    tokens = int(trainer._total_train_tokens)
    loss = next(h["train_loss"] for h in trainer.state.log_history if "train_loss" in h)
    return {"tokens": tokens, **clock.rates(tokens, "tokens"),
            "real_share": tokens / padded["tokens"], "loss": loss, "peak_rss_mb": peak_rss_mb(), "threads": threads()}


def devtune_setup(rows: list[dict[str, Any]], steps: int, dropout: float = 0.05, warmup: float = 0.03,
                  logging_steps: int | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from pipelines.config import TrainConfig
    from pipelines.train.fit import Settings
    from pipelines.train.losses import LM
    from pipelines.train.train import attach_adapter, encode_sft, load_base_model, runtime

    torch.manual_seed(0)
    model_dir = bench_model()
    cfg = TrainConfig(max_steps=steps, batch_size=BATCH, learning_rate=LR, lora_r=16, lora_alpha=32,
                      lora_dropout=dropout, warmup_ratio=warmup, logging_steps=logging_steps or steps,
                      checkpoint_every_steps=10 * steps, device="cpu")
    rt = runtime(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, _, _ = attach_adapter(load_base_model(str(model_dir), cfg, rt), cfg, None)
    examples = encode_sft(tokenizer, [{**r, "special": True} for r in rows], MAX_TOKENS)
    settings = Settings(run_dir=Path(tempfile.mkdtemp()), logging_steps=logging_steps or steps,
                        checkpoint_every=10 * steps, stage_index=1, stage_count=1)
    return {"cfg": cfg, "rt": rt, "model": model, "lm": LM.of(model, None), "examples": examples,
            "settings": settings, "pad_id": tokenizer.pad_token_id}


def run_devtune(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    from pipelines.train.batching import micro_batches, plan_steps
    from pipelines.train.train import sft_stage

    s = devtune_setup(rows, steps)
    with Clock() as clock:
        result = sft_stage(s["examples"], s["cfg"], s["model"], s["lm"], s["pad_id"], s["settings"], s["rt"])
    lengths = [len(e.ids) for e in s["examples"]]
    padded = sum(len(part) * max(lengths[i] for i in part)
                 for step in plan_steps(lengths, BATCH, steps, s["cfg"].seed)
                 for part in micro_batches(step, lengths, BATCH))
    return {"tokens": result.tokens, **clock.rates(result.tokens, "tokens"),
            "real_share": result.tokens / padded, "loss": result.loss, "first_loss": result.first_loss,
            "peak_rss_mb": peak_rss_mb(), "threads": threads()}


def threads() -> int:
    import torch

    return torch.get_num_threads()


class StepLosses(logging.Handler):
    """devtune's per-step loss, read from its progress line (logging_steps = 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("%s %d/%d: step"):
            self.losses.append(float(record.args[5]))  # type: ignore[index]


def check(rows: list[dict[str, Any]], steps: int) -> int:
    """Same rows, same batches, same start: the per-step losses of the two loops side by side."""
    from peft import set_peft_model_state_dict

    from pipelines.train.batching import plan_steps
    from pipelines.train.fit import adapter_state
    from pipelines.train.train import sft_stage

    s = devtune_setup(rows, steps, dropout=0.0, warmup=0.0, logging_steps=1)
    start = adapter_state(s["model"])
    examples = s["examples"]
    trainer = trl_trainer(rows, steps, sampling="sequential", dropout=0.0, warmup=0.0, logging_steps=1)
    tokenized = trainer.train_dataset
    assert len(tokenized) == len(examples), (len(tokenized), len(examples))
    for e, t in zip(examples, tokenized, strict=True):
        assert t["input_ids"] == e.ids, "TRL tokenized a row differently"
        assert t["labels"] == [-100] * e.n_prompt + e.ids[e.n_prompt:], "TRL's loss positions differ"
    print(f"same rows: {len(examples)} rows tokenized identically (ids and loss positions), "
          f"{sum(len(e.ids) for e in examples):,} tokens")
    plan = plan_steps([len(e.ids) for e in examples], BATCH, steps, s["cfg"].seed)
    trainer.train_dataset = tokenized.select([i for step in plan for i in step])
    set_peft_model_state_dict(trainer.model, start)
    handler = StepLosses()
    logging.getLogger("devtune.fit").addHandler(handler)
    logging.getLogger("devtune.fit").setLevel(logging.INFO)
    sft_stage(examples, s["cfg"], s["model"], s["lm"], s["pad_id"], s["settings"], s["rt"])
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ours = handler.losses
    print("step  devtune loss  TRL loss  relative difference")
    worst = 0.0
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        worst = max(worst, abs(a - b) / abs(b))
        print(f"{k:>4}  {a:12.6f}  {b:8.6f}  {abs(a - b) / abs(b):.1e}")
    print(f"largest relative difference {worst:.1e} over {steps} steps (same batches, same initial adapter, "
          "dropout 0, no warmup)")
    return 0 if worst < 1e-3 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["trl", "devtune"])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--data", choices=["built", "spread"], default="spread")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each worker (0: torch's default)")
    parser.add_argument("--check", action="store_true", help="compare tokenization and per-step losses, untimed")
    args = parser.parse_args()
    if args.check:
        logging.getLogger().setLevel(logging.ERROR)
        return check(bench_rows(args.data), args.steps)
    if args.worker:
        logging.disable(logging.WARNING)
        rows = bench_rows(args.data)
        result = (run_trl if args.worker == "trl" else run_devtune)(rows, args.steps)
        print(json.dumps(result))
        return 0
    bench_model()
    rows = bench_rows(args.data)
    print(f"SFT tokens/s, 5M Llama, batch {BATCH} x <= {MAX_TOKENS} tokens, {args.steps} steps, data={args.data} "
          f"({len(rows)} rows), {args.reps} interleaved repetitions, threads={args.threads or 'default'}", flush=True)
    results = interleave(Path(__file__), ["trl", "devtune"], args.reps,
                         ["--steps", str(args.steps), "--data", args.data], threads=args.threads)
    print(summary(results, "tokens", "trl", "devtune"))
    shares = {p: sum(r["real_share"] for r in rs) / len(rs) for p, rs in results.items()}
    print("real (non-padding) share of computed tokens: " + ", ".join(f"{p} {s:.0%}" for p, s in shares.items()))
    losses = {p: sum(r["loss"] for r in rs) / len(rs) for p, rs in results.items()}
    print("mean training loss over the steps: " + ", ".join(f"{p} {v:.4f}" for p, v in losses.items()))
    assert all(math.isfinite(r["tokens_per_s"]) for rs in results.values() for r in rs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

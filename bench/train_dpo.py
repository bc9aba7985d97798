"""DPO throughput: devtune's DPO stage against TRL's DPOTrainer set up as a competent user would on this device.

    python bench/train_dpo.py [--reps 4] [--pairs 64] [--data built|spread] [--threads 1]
    python bench/train_dpo.py --check [--pairs 64]                  # is the comparison fair? (untimed)

Both train a fresh LoRA (r 16, alpha 32, all linear layers, dropout off as both do in preference training)
for one pass over the same pairs (prompt = a FIM prompt of at most 512 tokens, chosen = the kept middle,
rejected = another row's middle), batch 8, sigmoid loss, beta 0.1, lr 5e-5, fp32 on CPU. The reference is
the model as the stage starts (for a fresh adapter: the base model) and both compute its log-likelihoods once,
up front; that time is counted in pairs/s on both sides. TRL (bench/README.md says why for each option):
bf16=False, use_cpu=True, no gradient checkpointing, precompute_ref_log_probs=True, its own length grouping
(train_sampling_strategy="group_by_length" over a `length` column, which needs remove_unused_columns=False).
devtune runs with preference_sft_weight = 0 so that both minimise the same loss (its NLL term costs nothing:
it reuses the chosen log-likelihoods).

--check trains both on the same batches (TRL's dataset in devtune's step order, read sequentially) from the
same initial adapter, without warmup, and prints the per-step losses side by side, after checking that TRL's
tokenized pairs equal devtune's.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import Clock, bench_model, bench_rows, interleave, peak_rss_mb, summary
from train_sft import StepLosses, threads

BATCH, MAX_TOKENS, LR, BETA = 8, 512, 5e-5, 0.1


def pairs(data: str, n: int) -> list[dict[str, str]]:
    """The first `n` pairs whose prompt fits whole with both completions in MAX_TOKENS. A pair over it is
    truncated differently by the two sides (TRL keeps the prompt and cuts the sequence's end, devtune cuts the
    prompt's start, as FIM evaluation does), so it would not be the same training; 1 of the first 64 `spread`
    pairs is."""
    from transformers import AutoTokenizer

    from pipelines.train.batching import encode

    rows = bench_rows(data)
    rng = random.Random(0)
    others = [r["completion"] for r in rows[:n]]
    rng.shuffle(others)
    tokenizer = AutoTokenizer.from_pretrained(bench_model())
    out: list[dict[str, str]] = []
    for k, r in enumerate(rows):
        other = others[k % len(others)]
        pair = {"prompt": r["prompt"], "chosen": r["completion"],
                "rejected": other if other != r["completion"] else others[(k + 1) % len(others)]}
        whole = encode(tokenizer, [pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]], 10**9)
        if all(e is not None and len(e.ids) <= MAX_TOKENS for e in whole):
            out.append(pair)
        if len(out) == n:
            break
    return out


def lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def trl_trainer(data: list[dict[str, str]], sampling: str = "group_by_length", warmup: float = 0.0,
                logging_steps: int | None = None) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model_dir = bench_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    steps = len(data) // BATCH
    # The sampler groups by the tokens a pair puts through the model (prompt twice, both completions).
    lengths = [2 * len(tokenizer(d["prompt"])["input_ids"]) + len(tokenizer(d["chosen"])["input_ids"])
               + len(tokenizer(d["rejected"])["input_ids"]) for d in data]
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=BATCH,
                     learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=warmup, beta=BETA,
                     loss_type=["sigmoid"], max_length=MAX_TOKENS, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, precompute_ref_log_probs=True,
                     train_sampling_strategy=sampling, remove_unused_columns=False, report_to=[],
                     logging_steps=logging_steps or steps, save_strategy="no", disable_tqdm=True,
                     dataloader_pin_memory=False, seed=0)
    dataset = Dataset.from_list([{**d, "length": n} for d, n in zip(data, lengths, strict=True)])
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora())


def run_trl(data: list[dict[str, str]]) -> dict[str, Any]:
    from trl import DPOTrainer

    reference = Clock()
    precompute = DPOTrainer._precompute_ref_logps

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:  # bench-only: TRL precomputes inside __init__
        with reference:
            return precompute(self, *args, **kwargs)

    DPOTrainer._precompute_ref_logps = timed  # type: ignore[method-assign]
    trainer = trl_trainer(data)
    with Clock() as clock:
        trainer.train()
    clock.wall, clock.cpu = clock.wall + reference.wall, clock.cpu + reference.cpu
    pairs_done = trainer.state.global_step * BATCH
    loss = next(h["train_loss"] for h in trainer.state.log_history if "train_loss" in h)
    return {"pairs": pairs_done, "reference_s": reference.wall,
            **clock.rates(pairs_done, "pairs"), "loss": loss, "peak_rss_mb": peak_rss_mb(), "threads": threads()}


def devtune_setup(warmup: float = 0.0, logging_steps: int = 1000) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from pipelines.config import TrainConfig
    from pipelines.train.fit import Settings
    from pipelines.train.losses import LM
    from pipelines.train.train import attach_adapter, load_base_model, runtime

    torch.manual_seed(0)
    model_dir = bench_model()
    cfg = TrainConfig(batch_size=BATCH, preference_learning_rate=LR, beta=BETA, lora_r=16, lora_alpha=32,
                      preference_epochs=1.0, preference_sft_weight=0.0, warmup_ratio=warmup,
                      logging_steps=logging_steps, checkpoint_every_steps=1000, device="cpu")
    rt = runtime(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, _, _ = attach_adapter(load_base_model(str(model_dir), cfg, rt), cfg, None)
    settings = Settings(run_dir=Path(tempfile.mkdtemp()), logging_steps=logging_steps, checkpoint_every=1000,
                        stage_index=1, stage_count=1)
    return {"cfg": cfg, "rt": rt, "model": model, "lm": LM.of(model, None), "tokenizer": tokenizer,
            "settings": settings, "pad_id": tokenizer.pad_token_id}


def run_devtune(data: list[dict[str, str]]) -> dict[str, Any]:
    from pipelines.train.train import dpo_stage

    s = devtune_setup()
    with Clock() as clock:  # includes computing the reference log-likelihoods
        result = dpo_stage(data, s["tokenizer"], MAX_TOKENS, s["cfg"], s["model"], s["lm"], s["pad_id"],
                           s["settings"], s["rt"])
    trained = result.steps * BATCH
    return {"pairs": trained, **clock.rates(trained, "pairs"), "loss": result.loss, "peak_rss_mb": peak_rss_mb(),
            "threads": threads()}


def check(data: list[dict[str, str]]) -> int:
    """Same pairs, same batches, same start: the per-step losses of the two loops side by side."""
    from peft import set_peft_model_state_dict

    from pipelines.train.batching import encode, plan_steps
    from pipelines.train.fit import adapter_state
    from pipelines.train.train import dpo_stage

    s = devtune_setup(logging_steps=1)
    start = adapter_state(s["model"])
    prompts = [d["prompt"] for d in data]
    chosen = encode(s["tokenizer"], prompts, [d["chosen"] for d in data], MAX_TOKENS)
    rejected = encode(s["tokenizer"], prompts, [d["rejected"] for d in data], MAX_TOKENS)
    assert all(c is not None and r is not None for c, r in zip(chosen, rejected, strict=True))
    trainer = trl_trainer(data, sampling="sequential", logging_steps=1)
    tokenized = trainer.train_dataset
    for c, r, t in zip(chosen, rejected, tokenized, strict=True):
        assert c is not None and r is not None
        assert t["prompt_ids"] == c.ids[: c.n_prompt] == r.ids[: r.n_prompt], "TRL tokenized a prompt differently"
        assert t["chosen_ids"] == c.ids[c.n_prompt:] and t["rejected_ids"] == r.ids[r.n_prompt:], \
            "TRL tokenized a completion differently"
    print(f"same pairs: {len(data)} pairs tokenized identically (prompt, chosen and rejected ids)")
    lengths = [len(c.ids) + len(r.ids) for c, r in zip(chosen, rejected, strict=True) if c and r]
    plan = plan_steps(lengths, BATCH, len(data) // BATCH, s["cfg"].seed)
    trainer.train_dataset = tokenized.select([i for step in plan for i in step])
    set_peft_model_state_dict(trainer.model, start)
    handler = StepLosses()
    logging.getLogger("devtune.fit").addHandler(handler)
    logging.getLogger("devtune.fit").setLevel(logging.INFO)
    dpo_stage(data, s["tokenizer"], MAX_TOKENS, s["cfg"], s["model"], s["lm"], s["pad_id"], s["settings"], s["rt"])
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("step  devtune loss  TRL loss  difference")
    worst = 0.0
    for k, (a, b) in enumerate(zip(handler.losses, theirs, strict=True), start=1):
        worst = max(worst, abs(a - b))
        print(f"{k:>4}  {a:12.6f}  {b:8.6f}  {abs(a - b):.1e}")
    print(f"largest difference {worst:.1e} over {len(theirs)} steps (same batches, same initial adapter, no warmup)")
    return 0 if worst < 1e-4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["trl", "devtune"])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--data", choices=["built", "spread"], default="spread")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each worker (0: torch's default)")
    parser.add_argument("--check", action="store_true", help="compare tokenization and per-step losses, untimed")
    args = parser.parse_args()
    if args.check:
        logging.getLogger().setLevel(logging.ERROR)
        return check(pairs(args.data, args.pairs))
    if args.worker:
        logging.disable(logging.WARNING)
        data = pairs(args.data, args.pairs)
        print(json.dumps((run_trl if args.worker == "trl" else run_devtune)(data)))
        return 0
    bench_model()
    print(f"DPO pairs/s, 5M Llama, batch {BATCH} pairs x <= {MAX_TOKENS} tokens, one pass over {args.pairs} pairs, "
          f"data={args.data}, {args.reps} interleaved repetitions, threads={args.threads or 'default'}", flush=True)
    results = interleave(Path(__file__), ["trl", "devtune"], args.reps,
                         ["--pairs", str(args.pairs), "--data", args.data], threads=args.threads)
    print(summary(results, "pairs", "trl", "devtune"))
    losses = {p: sum(r["loss"] for r in rs) / len(rs) for p, rs in results.items()}
    print("mean training loss over the steps: " + ", ".join(f"{p} {v:.4f}" for p, v in losses.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

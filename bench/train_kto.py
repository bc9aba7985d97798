"""KTO throughput: devtune's KTO stage against TRL's KTOTrainer set up as a competent user would on this device.

    python bench/train_kto.py [--reps 4] [--rows 128] [--data built|spread] [--threads 1]
    python bench/train_kto.py --check [--rows 128]                  # is the comparison fair? (untimed)

The rows are the dataset builder's own kto.jsonl (accepted and kept suggestions desirable, rejected ones
undesirable, about 1 in 4 desirable), a seeded sample of `--rows`, with the builder's class weights from its
manifest. Both train a fresh LoRA (r 16, alpha 32, all linear layers, dropout off) for one pass, batch 8, the KTO
loss with beta 0.1 and a KL reference point estimated every step from mismatched prompt/completion pairs, lr
5e-5, fp32 on CPU. The reference is the model as the stage starts; both compute its log-likelihoods (of the rows
and of the mismatched pairs) once, up front, and that time is counted in rows/s on both sides. TRL
(bench/README.md says why for each option): bf16=False, use_cpu=True, no gradient checkpointing,
precompute_ref_log_probs=True. KTOTrainer only allows sequential sampling (it pairs each row with a neighbour's
completion for the KL term when it tokenizes), so the competent user's length grouping is the order of the
dataset itself: shuffled and grouped by transformers' own get_length_grouped_indices, which its
group_by_length sampler uses. devtune runs with preference_sft_weight = 0, so both minimise the same loss.

--check trains both on the same batches from the same initial adapter and prints the per-step losses side by
side, after checking that TRL's tokenized rows equal devtune's. They agree exactly at the first step, where the
KL estimate is 0 for both; later they differ by the KL estimate only (TRL pairs a row with its neighbour in the
batch, devtune with a row a fixed seeded shift away).
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

from common import WORK, Clock, bench_model, bench_rows, interleave, peak_rss_mb, summary
from train_sft import StepLosses, threads

BATCH, MAX_TOKENS, LR, BETA = 8, 512, 5e-5, 0.1


def kto_rows(data: str, n: int) -> list[dict[str, Any]]:
    rows = bench_rows(data, "kto")
    random.Random(0).shuffle(rows)
    return [{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"])} for r in rows[:n]]


def class_weights() -> dict[str, float]:
    kto = json.loads((WORK / "data" / "manifest.json").read_text())["kto"]
    return {"desirable_weight": float(kto["desirable_weight"]), "undesirable_weight": float(kto["undesirable_weight"])}


def lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def trl_trainer(rows: list[dict[str, Any]], order: list[int] | None = None, logging_steps: int | None = None) -> Any:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_pt_utils import get_length_grouped_indices
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    model_dir = bench_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    steps = len(rows) // BATCH
    if order is None:  # the competent user's length grouping: KTOTrainer reads the dataset in order
        lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in rows]
        order = get_length_grouped_indices(lengths, BATCH, generator=torch.Generator().manual_seed(0))
    args = KTOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=BATCH,
                     learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.0, beta=BETA, loss_type="kto",
                     **class_weights(), max_length=MAX_TOKENS, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, precompute_ref_log_probs=True,
                     train_sampling_strategy="sequential", report_to=[], logging_steps=logging_steps or steps,
                     save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    dataset = Dataset.from_list([rows[i] for i in order])
    return KTOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora())


def run_trl(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from trl import KTOTrainer

    reference = Clock()
    precompute = KTOTrainer._precompute_ref_logps

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:  # bench-only: TRL precomputes inside __init__
        with reference:
            return precompute(self, *args, **kwargs)

    KTOTrainer._precompute_ref_logps = timed  # type: ignore[method-assign]
    trainer = trl_trainer(rows)
    with Clock() as clock:
        trainer.train()
    clock.wall, clock.cpu = clock.wall + reference.wall, clock.cpu + reference.cpu
    done = trainer.state.global_step * BATCH
    loss = next(h["train_loss"] for h in trainer.state.log_history if "train_loss" in h)
    return {"rows": done, "reference_s": reference.wall, **clock.rates(done, "rows"),
            "loss": loss, "peak_rss_mb": peak_rss_mb(), "threads": threads()}


def devtune_setup(logging_steps: int = 1000) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from pipelines.config import TrainConfig
    from pipelines.train.fit import Settings
    from pipelines.train.losses import LM
    from pipelines.train.train import attach_adapter, load_base_model, runtime

    torch.manual_seed(0)
    model_dir = bench_model()
    cfg = TrainConfig(batch_size=BATCH, preference_learning_rate=LR, beta=BETA, lora_r=16, lora_alpha=32,
                      preference_epochs=1.0, preference_sft_weight=0.0, warmup_ratio=0.0,
                      logging_steps=logging_steps, checkpoint_every_steps=1000, device="cpu")
    rt = runtime(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, _, _ = attach_adapter(load_base_model(str(model_dir), cfg, rt), cfg, None)
    settings = Settings(run_dir=Path(tempfile.mkdtemp()), logging_steps=logging_steps, checkpoint_every=1000,
                        stage_index=1, stage_count=1)
    return {"cfg": cfg, "rt": rt, "model": model, "lm": LM.of(model, None), "tokenizer": tokenizer,
            "settings": settings, "pad_id": tokenizer.pad_token_id}


def run_devtune(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from pipelines.train.train import kto_stage

    s = devtune_setup()
    with Clock() as clock:  # includes computing the reference log-likelihoods
        result = kto_stage(rows, class_weights(), s["tokenizer"], MAX_TOKENS, s["cfg"], s["model"], s["lm"],
                           s["pad_id"], s["settings"], s["rt"])
    done = result.steps * BATCH
    return {"rows": done, **clock.rates(done, "rows"), "loss": result.loss,
            "peak_rss_mb": peak_rss_mb(), "threads": threads()}


def check(rows: list[dict[str, Any]]) -> int:
    """Same rows, same batches, same start: the per-step losses of the two loops side by side."""
    from peft import set_peft_model_state_dict

    from pipelines.train.batching import encode, plan_steps
    from pipelines.train.fit import adapter_state
    from pipelines.train.train import kto_stage

    s = devtune_setup(logging_steps=1)
    start = adapter_state(s["model"])
    encoded = encode(s["tokenizer"], [r["prompt"] for r in rows], [r["completion"] for r in rows], MAX_TOKENS)
    assert all(e is not None for e in encoded)
    lengths = [len(e.ids) for e in encoded if e is not None]
    plan = plan_steps(lengths, BATCH, len(rows) // BATCH, s["cfg"].seed)
    order = [i for step in plan for i in step]
    trainer = trl_trainer(rows, order=order, logging_steps=1)
    for i, t in zip(order, trainer.train_dataset, strict=True):
        e = encoded[i]
        assert e is not None
        assert t["prompt_ids"] == e.ids[: e.n_prompt] and t["completion_ids"] == e.ids[e.n_prompt:], \
            "TRL tokenized a row differently"
    print(f"same rows: {len(rows)} rows tokenized identically (prompt and completion ids)")
    set_peft_model_state_dict(trainer.model, start)
    handler = StepLosses()
    logging.getLogger("devtune.fit").addHandler(handler)
    logging.getLogger("devtune.fit").setLevel(logging.INFO)
    kto_stage(rows, class_weights(), s["tokenizer"], MAX_TOKENS, s["cfg"], s["model"], s["lm"], s["pad_id"],
              s["settings"], s["rt"])
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    kls = [h.get("kl") for h in trainer.state.log_history if "loss" in h]
    print("step  devtune loss  TRL loss  difference  TRL's KL estimate")
    for k, (a, b, kl) in enumerate(zip(handler.losses, theirs, kls, strict=True), start=1):
        print(f"{k:>4}  {a:12.6f}  {b:8.6f}  {abs(a - b):.1e}  {kl}")
    first = abs(handler.losses[0] - theirs[0])
    print(f"first step (KL estimate 0 on both sides): difference {first:.1e}")
    return 0 if first < 1e-5 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["trl", "devtune"])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--data", choices=["built", "spread"], default="built")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each worker (0: torch's default)")
    parser.add_argument("--check", action="store_true", help="compare tokenization and per-step losses, untimed")
    args = parser.parse_args()
    if args.check:
        logging.getLogger().setLevel(logging.ERROR)
        return check(kto_rows(args.data, args.rows))
    if args.worker:
        logging.disable(logging.WARNING)
        rows = kto_rows(args.data, args.rows)
        print(json.dumps((run_trl if args.worker == "trl" else run_devtune)(rows)))
        return 0
    bench_model()
    rows = kto_rows(args.data, args.rows)
    desirable = sum(r["label"] for r in rows)
    print(f"KTO rows/s, 5M Llama, batch {BATCH} x <= {MAX_TOKENS} tokens, one pass over {len(rows)} rows "
          f"({desirable} desirable, weights {class_weights()}), data={args.data}, {args.reps} interleaved "
          f"repetitions, threads={args.threads or 'default'}", flush=True)
    results = interleave(Path(__file__), ["trl", "devtune"], args.reps,
                         ["--rows", str(args.rows), "--data", args.data], threads=args.threads)
    print(summary(results, "rows", "trl", "devtune"))
    losses = {p: sum(r["loss"] for r in rs) / len(rs) for p, rs in results.items()}
    print("mean training loss over the steps: " + ", ".join(f"{p} {v:.4f}" for p, v in losses.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

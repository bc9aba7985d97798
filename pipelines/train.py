"""Train one LoRA adapter from a run directory: `python -m pipelines.train RUN_DIR`.

Runs as a child of the service so GPU memory is returned when it exits and a crash cannot take the service
down; it reads only RUN_DIR (and the base model) and the same entry point runs under `accelerate launch`
or `torchrun` for several GPUs. A killed run resumes from its last checkpoint when started again. The
adapter appears as RUN_DIR/adapter only once it is complete (written beside it, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from daemon.config import TrainConfig
from pipelines.progress import format_seconds
from pipelines.rundir import RunConfig, write_json_atomic

log = logging.getLogger("devtune.train")

# Checkpoints cost a few seconds each for a LoRA adapter plus optimizer state; every 50 steps bounds the
# work a kill -9 loses to 50 steps.
SAVE_STEPS = 50


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("[train] device = \"cuda\" but torch sees no CUDA device: install a CUDA build of "
                         "torch or set device = \"auto\"")
    return device


def trl_configs(cfg: TrainConfig, run_dir: Path, device: str, max_length: int) -> tuple[LoraConfig, SFTConfig]:
    """Our [train] table, field by field, as peft and TRL configs."""
    modules: str | list[str] = "all-linear" if cfg.target_modules == ("all-linear",) else list(cfg.target_modules)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=modules, task_type="CAUSAL_LM")
    cuda = device == "cuda"
    sft = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        save_total_limit=1,
        seed=cfg.seed,
        max_length=max_length,
        completion_only_loss=True,  # learn the middle, not the file around it
        # TRL defaults bf16=True and gradient checkpointing on: on a CPU without bf16 units that ran SFT
        # 15x slower here (97 vs 1,450 tokens/s), so both follow the device.
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=cuda,
    )
    return lora, sft


class ProgressCallback(TrainerCallback):
    """Step, loss, tokens/s and ETA to RUN_DIR/progress.json and the log, every `logging_steps`."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "progress.json"
        self.started = time.monotonic()
        self.first_step: int | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        if self.first_step is None:
            self.first_step = max(state.global_step - args.logging_steps, 0)
        elapsed = time.monotonic() - self.started
        steps_done = state.global_step - self.first_step
        eta = (state.max_steps - state.global_step) * elapsed / steps_done if steps_done else None
        tokens = float(logs.get("num_tokens", 0.0))
        progress = {
            "step": state.global_step, "max_steps": state.max_steps, "loss": float(logs["loss"]),
            "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
            "elapsed_s": elapsed, "eta_s": eta,
        }
        write_json_atomic(self.path, progress)
        log.info("step %d/%d loss %.4f %s tokens/s ETA %s", state.global_step, state.max_steps,
                 progress["loss"], f"{progress['tokens_per_s']:,.0f}", format_seconds(eta) if eta else "-")


def load_rows(path: Path, columns: tuple[str, ...]) -> Dataset:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return Dataset.from_list([{c: r[c] for c in columns} for r in rows])


def train_adapter(run_dir: Path) -> dict[str, Any]:
    """Train the run's adapter into RUN_DIR/adapter and return its metrics (also in train.json)."""
    run = RunConfig.read(run_dir)
    cfg = run.train
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(run.base_model, dtype=dtype)
    train_rows = load_rows(run_dir / "data" / "sft.jsonl", ("prompt", "completion"))
    lora, args = trl_configs(cfg, run_dir, device, run.max_row_tokens)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_rows, processing_class=tokenizer,
                         peft_config=lora, callbacks=[ProgressCallback(run_dir)])
    resume = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    if resume:
        log.info("resuming from %s", resume)
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - started

    partial, final = run_dir / "adapter.partial", run_dir / "adapter"
    shutil.rmtree(partial, ignore_errors=True)
    trainer.model.save_pretrained(partial)
    # What TRL logs as num_tokens: non-padding tokens the model was trained on (prompt and middle).
    tokens = float(getattr(trainer, "_total_train_tokens", 0))
    metrics = {
        "device": device, "steps": trainer.state.global_step, "train_rows": len(train_rows),
        "train_loss": float(result.training_loss), "seconds": seconds, "tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds else 0.0, "resumed_from": resume,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (partial / "train.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    write_json_atomic(run_dir / "train.json", metrics)
    return metrics


def quiet_libraries() -> None:
    """Library progress bars and advice would drown the progress lines in train.log."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_warning()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.train RUN_DIR", file=sys.stderr)
        return 2
    quiet_libraries()
    metrics = train_adapter(Path(args[0]))
    log.info("trained %d steps in %s: loss %.4f, %s tokens/s on %s", metrics["steps"],
             format_seconds(metrics["seconds"]), metrics["train_loss"], f"{metrics['tokens_per_s']:,.0f}",
             metrics["device"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

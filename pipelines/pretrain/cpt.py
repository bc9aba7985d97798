"""Continued pretraining of a team's LoRA adapter on its own code: `python -m pipelines.pretrain RUN_DIR`.

Causal-LM training (every token a target) on data/cpt.jsonl (pipelines/pretrain/corpus.py): each file cut at
line starts into chunks of `[pretrain] seq_tokens`, a `fim_rate` share laid out as FIM examples in the base
tokenizer's own tokens (pipelines/pretrain/samples.py), repeated up to `max_epochs` within the `max_tokens`
budget. The adapter has [train]'s LoRA shape, so the team's SFT, DPO and KTO stages continue on the very same
adapter (CPT, then SFT, then DPO/KTO), served as before; or the run is merged into a new base
(pipelines/pretrain/merge.py).

The optimizer loop is training's own (pipelines/train/fit.py): checkpoints every `checkpoint_every_steps` and on
SIGTERM, resume from the newest when started again, progress.json with tokens/s and ETA, out-of-memory backoff,
and several GPUs under `accelerate launch` (the cycle's launcher, pipelines/child.py: each process takes its share
of a step's sequences). Sample g of the run is a function of the seed and g alone, so every process, and a
resumed run, makes the same ones.

Reads only RUN_DIR: config.json (RunConfig: base model, [train], [evaluate]), pretrain.json (this stage's
settings) and data/; writes RUN_DIR/adapter, train.json and checkpoints/cpt/.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from pipelines.config import PretrainConfig
from pipelines.pretrain.rundir import read_settings
from pipelines.pretrain.samples import FimShape, chunk_lines, sample_text
from pipelines.progress import format_seconds, peak_rss_mb
from pipelines.tokens import load_base_tokenizer
from pipelines.train.batching import Encoded, collate
from pipelines.train.fit import Micro, Settings, Stage, fit
from pipelines.train.losses import LM, sft_loss
from pipelines.train.rundir import RunConfig, read_rows
from pipelines.train.train import (
    CUDA_HEAD_CHUNK_TOKENS,
    attach_adapter,
    load_base_model,
    run_child,
    runtime,
    save_adapter,
)

log = logging.getLogger("devtune.pretrain")

SENTINEL_TOKENS = 4  # FIM prefix, suffix and middle tokens and the end of the middle


class Samples:
    """Training sequences by global index: chunk `order[g % n]` of epoch g // n, FIM or plain by a draw seeded
    with g. Encoded on demand and kept only for the current step."""

    def __init__(self, chunks: list[str], tokenizer: Any, fim: Any, shape: FimShape, seq_tokens: int, seed: int):
        self.chunks, self.tokenizer, self.fim, self.shape = chunks, tokenizer, fim, shape
        self.seq_tokens, self.seed = seq_tokens, seed
        self.orders: dict[int, list[int]] = {}
        self.cache: dict[int, Encoded] = {}

    def chunk(self, g: int) -> str:
        epoch, at = divmod(g, len(self.chunks))
        if epoch not in self.orders:
            order = list(range(len(self.chunks)))
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
            self.orders = {epoch: order}
        return self.chunks[self.orders[epoch][at]]

    def encode(self, rows: list[int]) -> None:
        """Encode a step's rows (the rest of the cache is dropped)."""
        self.cache = {g: e for g, e in self.cache.items() if g in rows}
        todo = [g for g in rows if g not in self.cache]
        if not todo:
            return
        texts = [sample_text(self.chunk(g), self.fim, self.shape, random.Random(f"{self.seed}:sample:{g}"))
                 for g in todo]
        for g, ids in zip(todo, self.tokenizer(texts)["input_ids"], strict=True):
            ids = ids[: self.seq_tokens]
            self.cache[g] = Encoded(ids=ids, n_prompt=1)  # every token after the first is a target

    def __getitem__(self, g: int) -> Encoded:
        return self.cache[g]


def plan_samples(chunks: list[str], chars_per_token: float, cfg: PretrainConfig, per_step: int) -> int:
    """Sequences the run trains on: the token budget, but at most `max_epochs` passes, in whole steps."""
    if not chunks:
        return 0
    mean_tokens = sum(map(len, chunks)) / len(chunks) / chars_per_token
    wanted = min(math.ceil(cfg.max_tokens / max(mean_tokens, 1.0)), math.ceil(cfg.max_epochs * len(chunks)))
    return max(1, wanted // per_step) * per_step


def chars_per_token(tokenizer: Any, texts: list[str]) -> float:
    sample, size = [], 0
    for t in texts:
        sample.append(t)
        size += len(t)
        if size > 200_000:
            break
    tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    return max(sum(map(len, sample)) / max(tokens, 1), 0.5)


def train_cpt(run_dir: Path) -> dict[str, Any]:
    """Train the run's adapter on data/cpt.jsonl into RUN_DIR/adapter; returns its metrics (also train.json)."""
    run = RunConfig.read(run_dir)
    cfg, shape = read_settings(run_dir)
    rt = runtime(run.train)
    torch.manual_seed(cfg.seed)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(run.base_model)
    fim = load_base_tokenizer(run.base_model).fim
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    texts = [r["text"] for r in read_rows(run_dir / "data" / "cpt.jsonl")]
    ratio = chars_per_token(tokenizer, texts)
    # The sentinels and a chunk denser than the average must still fit: chunks are cut at 90% of the window.
    max_chars = max(64, int((cfg.seq_tokens - SENTINEL_TOKENS) * ratio * 0.9))
    chunks = [c for t in texts for c in chunk_lines(t, max_chars)]
    if not chunks:
        raise SystemExit(f"nothing to pretrain on in {run_dir / 'data' / 'cpt.jsonl'}")
    model, _, note = attach_adapter(load_base_model(run.base_model, run.train, rt), run.train, None)
    per_step = cfg.batch_size * cfg.grad_accum_steps * rt.world
    n = plan_samples(chunks, ratio, cfg, per_step)
    samples = Samples(chunks, tokenizer, fim, shape, cfg.seq_tokens, cfg.seed)
    lengths = [min(cfg.seq_tokens, int(len(samples.chunk(g)) / ratio) + SENTINEL_TOKENS) for g in range(n)]
    stage = Stage(name="cpt", steps=[list(range(s, s + per_step)) for s in range(0, n, per_step)], lengths=lengths,
                  learning_rate=cfg.learning_rate, warmup_ratio=cfg.warmup_ratio, weight_decay=run.train.weight_decay,
                  micro_batch=cfg.batch_size, unit="rows")
    log.info("continued pretraining: %d files, %d chunks of up to %d tokens (%.2f characters/token), %d sequences "
             "(%.2f epochs) in %d steps; %s", len(texts), len(chunks), cfg.seq_tokens, ratio, n, n / len(chunks),
             len(stage.steps), note)
    lm = LM.of(model, CUDA_HEAD_CHUNK_TOKENS if rt.device.type == "cuda" else None)

    def normaliser(rows: list[int]) -> float:
        samples.encode(rows)
        return float(sum(samples[g].n_target for g in rows))

    def loss(rows: list[int], step_targets: float) -> Micro:
        batch = collate([samples[g] for g in rows], pad_id, rt.device)
        return Micro(loss=sft_loss(lm, batch, step_targets), tokens=batch.tokens)

    settings = Settings(run_dir=run_dir, logging_steps=run.train.logging_steps,
                        checkpoint_every=cfg.checkpoint_every_steps, stage_index=1, stage_count=1)
    result = fit(stage, model, loss, normaliser, settings, rt)
    seconds = time.monotonic() - started
    metrics: dict[str, Any] = {
        "stage": "cpt", "device": rt.device.type, "processes": rt.world, "bf16": rt.bf16, "stages": [asdict(result)],
        "steps": result.steps, "files": len(texts), "chunks": len(chunks), "sequences": n,
        "epochs": n / len(chunks), "chars_per_token": ratio, "train_loss": result.loss, "first_loss": result.first_loss,
        "seconds": seconds, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s,
        "resumed_from_step": {"cpt": result.resumed_from_step}, "oom_backoffs": result.oom_backoffs,
        "micro_batch": result.micro_batch, "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if rt.device.type == "cuda" else 0.0,
    }
    if rt.main:
        save_adapter(model, run_dir, metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    status, metrics = run_child(argv, "pipelines.pretrain", train_cpt)
    if metrics is not None:
        log.info("pretrained %d steps in %s: loss %.4f -> %.4f, %s tokens/s on %s", metrics["steps"],
                 format_seconds(metrics["seconds"]), metrics["first_loss"], metrics["train_loss"],
                 f"{metrics['tokens_per_s']:,.0f}", metrics["device"])
    return status

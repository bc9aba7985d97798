from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face hub: one that tries fails at once instead of hanging on the network.
# Set before anything imports huggingface_hub; child processes inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny model's matmuls are too small to gain from a second thread, and on shared cores the OpenMP
# barrier between two threads made a 1-token forward 23-129 ms instead of 2.5 ms (a 16-row evaluation took
# 56 s instead of 0.5 s). Child processes inherit this; set it to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject.toml): one worker per CPU this process may run on, at most four.

    xdist's own count asks psutil for the machine's physical cores, which in a container is the host's (64
    workers on a 2-core slice) and on a 2-vCPU virtual machine can be 1. The CPUs the scheduler gives this
    process are what the single-threaded tests can use; beyond four, the longest file (~2 minutes) sets the
    suite's time anyway. PYTEST_XDIST_AUTO_NUM_WORKERS still overrides it. macOS has no sched_getaffinity
    (and no CPU sets): there the machine's CPU count is the one to use."""
    if override := os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(override)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-shaped model and tokenizer, built and briefly pretrained once per test session.

    A LoRA can only adapt a base that has learned something: on the 60-step base this fixture used to
    build, rank-8 LoRA plateaued at 3.2 nats/token on a one-line FIM rule that full fine-tuning learned
    to 0.5. 160 steps of 8 x 128 tokens at lr 6e-3 (~10-30 s on 2 cores, 1.3x the old token count) give a
    base on which the same LoRA reaches ~1.0 in 60 steps, as it would on a real base model.
    """
    from pipelines.pretrain.samples import FimShape
    from pipelines.pretrain.scratch import ModelShape, ScratchPlan, pretrain, stdlib_texts

    out = tmp_path_factory.mktemp("tiny-model")
    shape = ModelShape(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    # No FIM samples: the tests' rows teach their own FIM rules, and the gate tests expect a base that knows none.
    plan = ScratchPlan(family="qwen2.5-coder", shape=shape, tokens=160 * 8 * 128, seq_len=128, batch_size=8,
                       learning_rate=6e-3, fim=FimShape(fim_rate=0.0, spm_rate=0.0, max_middle_lines=6,
                                                        max_block_lines=30, block_fraction=0.3))
    pretrain(out, stdlib_texts(400_000), plan, checkpoint_every=10**9, logging_steps=40)
    return out


@pytest.fixture(scope="session")
def strong_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A run trained SFT then DPO on rows the tiny model learns (tests/runs.py), with held-out FIM rows and
    held-out logged pairs: the adapter the training and gate tests check, and the gate's champion.

    120 SFT steps, not 60: at 60 the model had learned the body's form but not which operation a name asks
    for on some CPUs (on this AVX-512 machine: edit similarity 0.86, exact match 0.0, preference accuracy
    13/24, below the one-step adapter's 14/24); at 120 it has on both AVX-512 and AVX2 kernels (exact match
    0.29, preference accuracy 0.83), for ~5 s more."""
    from runs import fim_rows, make_run, pair_rows, run_module, train_config

    run_dir = make_run(tmp_path_factory.mktemp("strong") / "run", tiny_model,
                       train_config(max_steps=120, preference_max_steps=12, min_preference_rows=8,
                                    preference_learning_rate=3e-3, checkpoint_every_steps=1000, logging_steps=5),
                       {"sft.jsonl": fim_rows(96, seed=0), "dpo.jsonl": pair_rows(32, seed=1),
                        "heldout.jsonl": fim_rows(32, seed=2, start_day=25) + pair_rows(24, seed=3, kind="pair")})
    run_module("pipelines.train", run_dir)
    return run_dir

"""Everything `devtune demo` needs, built locally with no network: sample data, a tiny base model, a config.

The demo then runs the main job exactly as a real installation does (collect, then one cycle) on the
config written here, so `devtune --config <state_dir>/config.toml status` works on the result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from daemon.config import render_config
from daemon.sample import DEVELOPERS, make_sample
from pipelines.child import run_child, tail
from pipelines.train.tiny import generic_corpus

log = logging.getLogger("devtune.demo")

DEMO_TEAM = "payments"

# Sized for 2 CPU cores and the ~0.6M-parameter tiny model: about 15 s of training per adapter, and enough
# steps for the team adapter to beat the base model on the held-out week (measured: held-out loss 5.08 ->
# 1.55 nats/token, edit similarity 0.10 -> 0.25). Each developer's adapter then trains the same 80 steps
# from it; the whole demo took about 2 minutes on 2 cores.
DEMO_OVERRIDES: dict[str, dict[str, Any]] = {
    "collect": {"interval_s": 60.0},
    "datasets": {"max_prefix_chars": 1200, "max_suffix_chars": 400, "max_row_tokens": 512,
                 "heldout_fraction": 0.15, "min_train_rows": 32, "min_heldout_rows": 8},
    "train": {"learning_rate": 5e-3, "max_steps": 80, "batch_size": 8, "logging_steps": 10,
              "warmup_ratio": 0.05, "train_timeout_s": 900.0},
    "evaluate": {"batch_size": 16, "max_rows": 200, "eval_timeout_s": 600.0},
}
PRETRAIN_STEPS = 300


def prepare_demo(state_dir: Path, pretrain_steps: int = PRETRAIN_STEPS) -> Path:
    """Sample data, tiny model and config under `state_dir` (reused when present); returns the config path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    sample = make_sample(state_dir / "sample")
    model_dir = state_dir / "tiny-model"
    if not (model_dir / "model.safetensors").is_file():
        log.info("building the tiny base model: a BPE tokenizer and a %d-step pretraining on Python's "
                 "standard library (about 30 s on 2 cores; log in %s)", pretrain_steps, state_dir / "tiny-model.log")
        corpus = state_dir / "sample" / "generic-corpus.py.txt"
        corpus.write_text("\n\n".join(generic_corpus()), encoding="utf-8")
        log_path = state_dir / "tiny-model.log"
        run_child("pipelines.train.tiny", [str(model_dir), str(corpus), "--pretrain-steps", str(pretrain_steps)],
                  log_path, timeout_s=1800, tick_s=10, on_tick=lambda: log.info("%s", tail(log_path, 1)))
    sources = [{"kind": "git", "path": str(sample.repo.relative_to(state_dir)), "name": "payments-repo"}]
    for email, folder in sorted(sample.continue_dirs.items()):
        sources.append({"kind": "continue", "path": str(folder.relative_to(state_dir)),
                        "name": f"continue-{email.split('@')[0]}", "developer": email})
    teams = [{"name": DEMO_TEAM, "members": [email for _, email in DEVELOPERS], "repos": ["acme/payments"]}]
    overrides = {"": {"state_dir": ".", "base_model": str(model_dir.resolve())}, **DEMO_OVERRIDES}
    config = state_dir / "config.toml"
    config.write_text(render_config(overrides, sources=sources, teams=teams))
    return config

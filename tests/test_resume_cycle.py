"""A training child killed with SIGKILL mid-run is picked up by the next cycle of its scope, from its checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from daemon import jobs
from daemon.config import load_config
from daemon.sample import DEVELOPERS, make_sample
from pipelines.store.db import Store
from support import ROOT, write_config


def test_the_next_cycle_resumes_a_killed_training_run(tmp_path: Path, tiny_model: Path) -> None:
    sample = make_sample(tmp_path / "sample", n_commits=16, n_events=60)
    setup = write_config(tmp_path / "site", [{"kind": "git", "path": str(sample.repo), "name": "repo"}],
                         teams=[{"name": "payments", "members": [e for _, e in DEVELOPERS]}], overrides={
        "": {"base_model": str(tiny_model)},
        "datasets": {"max_row_tokens": 256, "max_prefix_chars": 400, "max_suffix_chars": 100,
                     "min_train_rows": 8, "min_heldout_rows": 2},
        "train": {"max_steps": 200, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1,
                  "checkpoint_every_steps": 5, "dev_adapters": False},
        "evaluate": {"generate_rows": 4, "max_new_tokens": 8},
        # The gate is waived (this file tests resuming, not the gate): with 4 generated rows, a guardrail on
        # edit similarity decided promote or keep by chance (seen once under CI load).
        "gate": {"primary_metric": "heldout_loss", "min_improvement": -1.0, "edit_similarity_tolerance": 1.0,
                 "exact_match_tolerance": 1.0, "preference_accuracy_tolerance": 1.0,
                 "generated_length_tolerance": 10.0}})
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        results: list[dict[str, Any]] = []
        first = threading.Thread(target=lambda: results.append(jobs.cycle(store.cursor(), cfg, "payments")))
        first.start()
        run_dir = _wait_for_checkpoint(cfg.state_dir / "runs", first)
        pid = json.loads((run_dir / "progress.json").read_text())["pid"]
        os.killpg(pid, signal.SIGKILL)  # the child leads its own process group
        first.join(120)
        killed = results[0]
        assert killed["outcome"] == "failed" and "killed" in killed["error"]
        assert store.run(killed["run_id"])["stage"] == "train"  # type: ignore[index]
        saved = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints" / "sft").glob("step-*"))

        again = jobs.cycle(store, cfg, "payments")
        assert again["run_id"] == killed["run_id"] and again["outcome"] == "promoted", again
        run = store.run(again["run_id"])
        assert run is not None and run["attempts"] == 2 and run["summary"]["resumed"] == 2
        train = json.loads((run_dir / "train.json").read_text())
        assert train["resumed_from_step"] == {"sft": saved} and saved >= 5 and train["steps"] == 200
        assert "resumes at step" in (run_dir / "train.log").read_text()
        # The promoted adapter is, bit for bit, what the same run gives when nobody kills it.
        whole = tmp_path / "whole"
        whole.mkdir()
        shutil.copy(run_dir / "config.json", whole / "config.json")
        shutil.copytree(run_dir / "data", whole / "data")
        trained = subprocess.run([sys.executable, "-m", "pipelines.train", str(whole)], cwd=ROOT, capture_output=True,
                                 text=True, timeout=600)
        assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
        promoted = load_file(str(cfg.state_dir / "registry" / "team:payments" / again["version"] /
                                 "adapter_model.safetensors"))
        uninterrupted = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
        assert set(promoted) == set(uninterrupted)
        assert all(torch.equal(promoted[k], uninterrupted[k]) for k in promoted)
    finally:
        store.close()


def _wait_for_checkpoint(runs: Path, thread: threading.Thread) -> Path:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert thread.is_alive(), "the cycle ended before its training could be killed"
        for run_dir in runs.glob("*"):
            steps = list((run_dir / "checkpoints" / "sft").glob("step-*"))
            if steps and (run_dir / "progress.json").is_file():
                return run_dir
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")

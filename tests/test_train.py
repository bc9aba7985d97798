"""A real LoRA run on the tiny model through the child-process entry point."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from daemon.config import EvaluateConfig, TrainConfig
from pipelines.gate import EvalReport
from pipelines.rundir import RunConfig
from support import ROOT


def fim_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 9)
        prefix = f"def scale_{i}(amount):\n"
        rows.append({"prompt": f"<|fim_prefix|>{prefix}<|fim_suffix|>\n<|fim_middle|>",
                     "completion": f"    return amount * {k}\n<|endoftext|>", "ts": f"2026-10-{1 + i % 28:02d}"})
    return rows


def make_run(tmp_path: Path, tiny_model: Path, train: TrainConfig, served: str | None = None) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    for name, rows in (("sft.jsonl", fim_rows(24)), ("heldout.jsonl", fim_rows(8, seed=1))):
        (run_dir / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    RunConfig(run_id="test-run", scope="team:t", base_model=str(tiny_model), max_row_tokens=256, train=train,
              evaluate=EvaluateConfig(batch_size=4), served_adapter=served).write(run_dir)
    return run_dir


def run_module(module: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, str(run_dir)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, dict[str, str], Path]:
    tmp = tmp_path_factory.mktemp("train")
    base_before = digest(tiny_model)
    run_dir = make_run(tmp, tiny_model, TrainConfig(max_steps=2, batch_size=4, learning_rate=1e-2,
                                                    logging_steps=1, lora_r=4, lora_alpha=8))
    result = run_module("pipelines.train", run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, base_before, tiny_model


def test_lora_weights_changed_and_base_weights_did_not(trained: tuple[Path, dict[str, str], Path]) -> None:
    run_dir, base_before, tiny_model = trained
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)  # the adapter holds only LoRA weights
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    # peft initialises every lora_B to zero; two optimizer steps must have moved them.
    assert lora_b and all(t.abs().sum().item() > 0 for t in lora_b)
    assert digest(tiny_model) == base_before  # the base model's files are untouched


def test_training_reports_progress_and_metrics(trained: tuple[Path, dict[str, str], Path]) -> None:
    run_dir, _, _ = trained
    metrics = json.loads((run_dir / "train.json").read_text())
    assert metrics["steps"] == 2 and metrics["device"] == "cpu" and metrics["tokens"] > 0
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["step"] == 2 and progress["max_steps"] == 2 and progress["tokens_per_s"] > 0
    assert not (run_dir / "adapter.partial").exists()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def test_evaluation_scores_base_candidate_and_served(trained: tuple[Path, dict[str, str], Path]) -> None:
    run_dir, _, _ = trained
    # Serve the same adapter as the "champion": its scores must equal the candidate's exactly.
    config = json.loads((run_dir / "config.json").read_text())
    config["served_adapter"] = str(run_dir / "adapter")
    (run_dir / "config.json").write_text(json.dumps(config))
    result = run_module("pipelines.evaluate", run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = EvalReport.load(run_dir / "eval.json")
    assert report.rows == 8 and report.tokens > 0
    assert report.served is not None
    assert report.served.heldout_loss == pytest.approx(report.candidate.heldout_loss, rel=1e-6)
    assert report.candidate.heldout_loss != report.base.heldout_loss  # the adapter changes the model

"""Run directories for training and evaluation tests: small, real FIM rows in the tiny tokenizer's tokens.

The rows follow a rule a 0.1M-parameter model learns in a few dozen steps (the function's name says what
its one-line body does), so a trained adapter completes held-out functions exactly, and preference pairs
(right body vs another operation's body) have a right answer.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipelines.config import EvaluateConfig, TrainConfig
from pipelines.train.rundir import RunConfig
from support import ROOT

OPS = {"double": "x * 2", "triple": "x * 3", "negate": "-x", "square": "x * x", "halve": "x / 2",
       "succ": "x + 1"}
END = "<|endoftext|>"


def prompt(name: str) -> str:
    return f"<|fim_prefix|>def {name}(x):\n<|fim_suffix|>\n\n<|fim_middle|>"


def body(op: str) -> str:
    return f"    return {OPS[op]}\n"


def fim_rows(n: int, seed: int, start_day: int = 1, developer: str = "alice@example.com") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        op = rng.choice(sorted(OPS))
        name = f"{op}_{rng.randint(100, 999)}"
        rows.append({"kind": "fim", "id": f"fim-{seed}-{i}", "signal": "accepted", "developer": developer,
                     "ts": f"2026-10-{start_day + i * 20 // max(n, 1):02d}T09:{i % 60:02d}:00",
                     "prompt": prompt(name), "completion": body(op) + END})
    return rows


def pair_rows(n: int, seed: int, kind: str | None = None) -> list[dict[str, Any]]:
    """Preference pairs: the body the name asks for (chosen) against another operation's (rejected)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        op, wrong = rng.sample(sorted(OPS), 2)
        row: dict[str, Any] = {"id": f"pair-{seed}-{i}", "signal": "rewritten", "developer": "alice@example.com",
                               "ts": f"2026-10-{1 + i * 20 // max(n, 1):02d}T10:00:00",
                               "prompt": prompt(f"{op}_{rng.randint(100, 999)}"),
                               "chosen": body(op) + END, "rejected": body(wrong) + END}
        if kind:
            row["kind"] = kind
        rows.append(row)
    return rows


def kto_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Unpaired rows: a third desirable (the right body), the rest undesirable (a wrong one), as logged."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        op, wrong = rng.sample(sorted(OPS), 2)
        good = i % 3 == 0
        rows.append({"id": f"kto-{seed}-{i}", "signal": "accepted" if good else "rejected",
                     "developer": "alice@example.com", "ts": f"2026-10-{1 + i * 20 // max(n, 1):02d}T11:00:00",
                     "prompt": prompt(f"{op}_{rng.randint(100, 999)}"), "completion": body(op if good else wrong) + END,
                     "label": good})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(run_dir: Path, base_model: Path, train: TrainConfig, files: dict[str, list[dict[str, Any]]],
             served: str | None = None, init: str | None = None, data_until: str | None = None,
             evaluate: EvaluateConfig | None = None, manifest: dict[str, Any] | None = None) -> Path:
    """A run directory as the cycle writes it: data files, manifest.json and config.json."""
    for name, rows in files.items():
        write_jsonl(run_dir / "data" / name, rows)
    (run_dir / "data" / "manifest.json").write_text(json.dumps(manifest or {}))
    RunConfig(run_id=run_dir.name, scope="team:t", base_model=str(base_model), max_row_tokens=256, train=train,
              evaluate=evaluate or EvaluateConfig(batch_size=8, generate_rows=24, max_new_tokens=16),
              served_adapter=served, init_adapter=init, data_until=data_until).write(run_dir)
    return run_dir


def run_module(module: str, run_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", module, str(run_dir)], capture_output=True, text=True, cwd=ROOT,
                            timeout=timeout)
    assert result.returncode == 0, f"{module} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def train_config(**overrides: Any) -> TrainConfig:
    """Small and fast: rank 8, batch 8, a high learning rate for a tiny model, progress every step."""
    values: dict[str, Any] = {"lora_r": 8, "lora_alpha": 16, "batch_size": 8, "learning_rate": 1e-2,
                              "logging_steps": 1, "warmup_ratio": 0.0, "device": "cpu", "lora_dropout": 0.0}
    return TrainConfig(**{**values, **overrides})


def random_adapter(base_model: Path, out: Path, seed: int, scale: float = 0.15) -> Path:
    """A PEFT LoRA adapter for `base_model` with random weights (peft starts B at zero, which would change
    nothing): different seeds complete the same prompt differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    return out

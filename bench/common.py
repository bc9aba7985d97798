"""What every benchmark here shares: the 5M-parameter Llama, the FIM rows, and how runs are interleaved.

The cores of a CI or dev machine are shared, so a benchmark never compares numbers from two runs: each
measurement is a fresh worker process (its own peak RSS), baseline and candidate alternate, the order
flips every repetition, and the ratio reported is the median of the per-repetition ratios.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("DEVTUNE_TRAIN_BENCH_DIR", "/tmp/devtune-bench-train"))

# About 5.0M parameters: 4,096-token BPE vocabulary (untied input/output embeddings: 2.1M), 4 layers of
# width 256 with GQA (2 KV heads) and a 704-wide MLP (2.9M).
MODEL_SHAPE = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2}


def bench_model() -> Path:
    """The benchmark base model, built once (random weights: throughput does not depend on them)."""
    from pipelines.pretrain.scratch import ModelShape, build_model, build_tokenizer, stdlib_texts

    out = WORK / "model-5m"
    if not (out / "model.safetensors").is_file():
        shape = ModelShape(**MODEL_SHAPE)
        build_tokenizer(stdlib_texts(600_000), shape.vocab_size, out)
        build_model(out, shape).save_pretrained(out)
    return out


def bench_rows(data: str, name: str = "sft") -> list[dict[str, Any]]:
    """Rows of `name`.jsonl (sft: prompt/completion FIM rows; kto: the same with a label) of at most 512
    tokens from the sample repository and Continue logs, built by the real dataset builder.

    data = "built": the rows as the builder writes them (most prompts reach the 512-token cap).
    data = "spread": the same rows with the prefix cut at a uniformly random point, as a cursor anywhere
      in a file gives; padding to the longest row of a random batch then wastes ~40% of a batch, as in
      the measurement in DESIGN.md (58% real tokens).
    """
    path = WORK / "data" / f"{name}.jsonl"
    if not path.is_file():
        _build_rows(path.parent)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    if data == "built":
        return rows
    rng = random.Random(0)
    out = []
    for r in rows:
        head, rest = r["prompt"].split("<|fim_suffix|>", 1)
        prefix = head.removeprefix("<|fim_prefix|>")
        cut = len(prefix) - int(len(prefix) * rng.random())
        out.append({**r, "prompt": "<|fim_prefix|>" + prefix[cut:] + "<|fim_suffix|>" + rest})
    return out


def _build_rows(out_dir: Path) -> None:
    from daemon import jobs
    from daemon.config import load_config, render_config
    from daemon.sample import DEVELOPERS, make_sample
    from pipelines.datasets.build import build_datasets
    from pipelines.scope import team
    from pipelines.store.db import Store
    from pipelines.tokens import load_base_tokenizer

    sample = make_sample(WORK / "sample", n_commits=120, n_events=800)
    sources: list[dict[str, Any]] = [{"kind": "git", "path": str(sample.repo), "name": "repo"}]
    sources += [{"kind": "continue", "path": str(d), "name": f"continue-{e.split('@')[0]}", "developer": e}
                for e, d in sorted(sample.continue_dirs.items())]
    config = WORK / "site" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(render_config(
        {"": {"state_dir": "state", "base_model": str(bench_model())},
         "datasets": {"max_row_tokens": 512, "min_train_rows": 8, "min_heldout_rows": 4}},
        sources=sources, teams=[{"name": "payments", "members": [e for _, e in DEVELOPERS]}]))
    cfg = load_config(config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        assert jobs.collect(store, cfg)["error"] is None
        build_datasets(store, team("payments"), cfg.datasets, load_base_tokenizer(cfg.base_model), out_dir)
    finally:
        store.close()


def peak_rss_mb() -> float:
    from pipelines.progress import peak_rss_mb as own  # VmHWM: a worker's own peak, not its parent's

    return own()


def worker_env(threads: int) -> dict[str, str]:
    """The environment of every worker: the same intra-op thread count for baseline and candidate.

    0 keeps torch's default (one thread per core). On these shared cores a second OpenMP thread is a
    gamble: an op waits at each barrier for a thread the scheduler may have parked, and with a load of 4-5
    from other benchmarks devtune's SFT ran at 330-480 tokens/s with 2 threads against 2,250-2,400 with
    one (tests/conftest.py saw the same on evaluation). One thread per process measures the work each side
    does, not the scheduler's luck.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def interleave(script: Path, paths: list[str], reps: int, args: list[str],
               threads: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Run `script --worker PATH ARGS` for each path, `reps` times, alternating the order each repetition."""
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    for rep in range(reps):
        order = paths if rep % 2 == 0 else list(reversed(paths))
        for path in order:
            started = time.monotonic()
            out = subprocess.run([sys.executable, str(script), "--worker", path, *args], capture_output=True,
                                 text=True, cwd=ROOT, env=worker_env(threads))
            if out.returncode != 0:
                raise SystemExit(f"{path} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[path].append(result)
            shown = {k: v for k, v in result.items()
                     if k in ("tokens_per_s", "tokens_per_cpu_s", "pairs_per_s", "pairs_per_cpu_s", "rows_per_s",
                               "rows_per_cpu_s", "real_share", "loss", "peak_rss_mb")}
            print(f"  rep {rep + 1}/{reps} {path:>10}: " + ", ".join(
                f"{k} {v:.4f}" if k in ("loss", "real_share") else f"{k} {v:,.{1 if v >= 100 else 2}f}"
                for k, v in shown.items()),
                f"({time.monotonic() - started:.0f}s, load {os.getloadavg()[0]:.1f})", flush=True)
    return results


class Clock:
    """Wall and CPU seconds spent inside `with clock:` (CPU: every thread of this process). On shared cores
    the CPU seconds of a one-thread worker measure its work; the wall seconds also count the time other
    processes had the core."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._started = (time.monotonic(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.monotonic() - self._started[0]
        self.cpu += time.process_time() - self._started[1]

    def rates(self, count: float, unit: str) -> dict[str, float]:
        return {"seconds": self.wall, "cpu_seconds": self.cpu, f"{unit}_per_s": count / self.wall,
                f"{unit}_per_cpu_s": count / self.cpu}


def ratios(results: dict[str, list[dict[str, Any]]], key: str, baseline: str, candidate: str) -> list[float]:
    return [c[key] / b[key] for b, c in zip(results[baseline], results[candidate], strict=True)]


def summary(results: dict[str, list[dict[str, Any]]], unit: str, baseline: str, candidate: str) -> str:
    """Medians per side and the median per-repetition ratio, per wall second and per CPU second."""
    lines = []
    for key in (f"{unit}_per_s", f"{unit}_per_cpu_s"):
        r = ratios(results, key, baseline, candidate)
        for path, rs in results.items():
            values = [x[key] for x in rs]
            rss = max(x["peak_rss_mb"] for x in rs)
            digits = 1 if min(values) >= 100 else 2
            lines.append(f"{path:>10}: {key} median {statistics.median(values):,.{digits}f} "
                         f"(min {min(values):,.{digits}f}, max {max(values):,.{digits}f}); peak RSS {rss:,.0f} MB")
        lines.append(f"{candidate} / {baseline}: {key} median ratio {statistics.median(r):.2f}x "
                     f"(per repetition: {', '.join(f'{x:.2f}' for x in r)})")
    return "\n".join(lines)

"""Per-run overhead of the Ray backend against the local one, on a local head with the tiny model.

    python bench/ray_overhead.py [--reps 3] [--steps 30] [--parallel 4]

The same small run (the tests' tiny Llama, FIM rows, rank-8 LoRA for --steps steps, then evaluation) is
trained and evaluated through `pipelines.train.backends.run_stage` three ways, alternating:
  local    a child process, as `[train] backend = "local"` runs it;
  ray      a Ray job reading the service's own run directory (`[ray] shared_dir` empty);
  staged   a Ray job on a copy staged under a shared folder, its results fetched back.
It prints the wall seconds of each stage, the trainer's own seconds (train.json), and the difference to
local: what Ray adds per run. Then --parallel runs at once through Ray (as a night's developer runs go), to
show the jobs overlap. Requires the `ray` extra; starts and ends its own head (tests/support.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
# As in the tests (tests/conftest.py): two OpenMP threads on 2 shared cores made the tiny model's steps up to
# 50x slower. A Ray job gets OMP_NUM_THREADS = its CPUs when unset; set here, both ways run with one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipelines.config import RayConfig  # noqa: E402
from pipelines.train.backends import run_stage  # noqa: E402
from runs import fim_rows, make_run, train_config  # noqa: E402
from support import local_ray_head  # noqa: E402


def tiny_model(out: Path) -> Path:
    """The tests' tiny model (tests/conftest.py), pretrained briefly so evaluation has something to score."""
    from pipelines.pretrain.samples import FimShape
    from pipelines.pretrain.scratch import ModelShape, ScratchPlan, pretrain, stdlib_texts

    shape = ModelShape(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    plan = ScratchPlan(family="qwen2.5-coder", shape=shape, tokens=60 * 8 * 128, seq_len=128, batch_size=8,
                       learning_rate=6e-3, fim=FimShape(fim_rate=0.0, spm_rate=0.0, max_middle_lines=6,
                                                        max_block_lines=30, block_fraction=0.3))
    pretrain(out, stdlib_texts(400_000), plan, checkpoint_every=10**9, logging_steps=20)
    return out


def one_run(work: Path, model: Path, name: str, steps: int, backend: str, ray: RayConfig) -> dict[str, float]:
    cfg = train_config(backend=backend, max_steps=steps, checkpoint_every_steps=1000)
    run_dir = make_run(work / "runs" / name, model, cfg,
                       {"sft.jsonl": fim_rows(48, seed=0), "heldout.jsonl": fim_rows(16, seed=1, start_day=25)})
    t0 = time.monotonic()
    run_stage("train", run_dir, cfg, ray, 900)
    t1 = time.monotonic()
    run_stage("evaluate", run_dir, cfg, ray, 900)
    t2 = time.monotonic()
    trained = json.loads((run_dir / "train.json").read_text())
    return {"train_s": t1 - t0, "evaluate_s": t2 - t1, "total_s": t2 - t0, "trainer_s": trained["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dt-ray-bench-"))
    model = tiny_model(work / "model")
    results: dict[str, list[dict[str, float]]] = {"local": [], "ray": [], "staged": []}
    with local_ray_head(cpus=max(4, args.parallel)) as address:
        ways = {"local": ("local", RayConfig()),
                "ray": ("ray", RayConfig(address=address, cpus_per_run=1.0, poll_s=0.5)),
                "staged": ("ray", RayConfig(address=address, cpus_per_run=1.0, poll_s=0.5,
                                            shared_dir=str(work / "shared")))}
        one_run(work, model, "warm-up", 2, "ray", ways["ray"][1])  # uploads pipelines/ once (py_modules)
        for rep in range(args.reps):
            for way, (backend, ray) in ways.items():
                results[way].append(one_run(work, model, f"{way}-{rep}", args.steps, backend, ray))
                print(f"{way:7s} rep {rep}: " + ", ".join(f"{k} {v:.1f}" for k, v in results[way][-1].items()),
                      flush=True)
        spans: list[tuple[float, float]] = []

        def timed(i: int) -> None:
            t = time.monotonic()
            one_run(work, model, f"parallel-{i}", args.steps, "ray", ways["ray"][1])
            spans.append((t, time.monotonic()))

        t0 = time.monotonic()
        threads = [threading.Thread(target=timed, args=(i,)) for i in range(args.parallel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0

    med = {way: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for way, rs in results.items()}
    print("\nmedian seconds per run (train + evaluate), and what Ray adds to the local child:")
    for way, m in med.items():
        extra = m["total_s"] - med["local"]["total_s"]
        print(f"  {way:7s} train {m['train_s']:5.1f}  evaluate {m['evaluate_s']:5.1f}  total {m['total_s']:5.1f}  "
              f"trainer's own {m['trainer_s']:5.1f}  vs local {extra:+5.1f}")
    serial = med["ray"]["total_s"] * args.parallel
    print(f"\n{args.parallel} runs at once through Ray: {wall:.1f} s wall; one after another ~{serial:.0f} s "
          "(this machine's 2 cores, not GPUs, bound how much they gain)")
    summary: dict[str, Any] = {"median": med, "parallel": {"runs": args.parallel, "wall_s": wall}}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality on a real repository: base, +CPT, +SFT and +CPT+SFT on its history, the newest commits held out.

    python bench/quality_real.py PATH_TO_GIT_REPO [--name owner/name] [--work DIR]

1. A base model from scratch (`python -m pipelines.pretrain.scratch`, what `devtune pretrain --from-scratch`
   runs) on CPython's standard library: on every machine and none of the repository's code (the script checks
   that no file of the repository's HEAD is in the corpus). Built once per budget in WORK/base-*, reused.
2. The repository's whole history harvested into a store by the real collector (git only: no IDE logs), under
   one team; the dataset builder holds out the newest [datasets] heldout_fraction of its FIM rows by time.
3. Three copies of that store, one per pipeline, each run through the real code paths:
     +SFT      pipelines.cycle.run_cycle: a fresh LoRA, SFT on the committed-code FIM rows
     +CPT      pipelines.pretrain.run.run_pretrain: continued pretraining on the repository's files as of the
               held-out cutoff, gated on held-out loss
     +CPT+SFT  run_pretrain, then run_cycle, which starts the team adapter from the promoted CPT adapter
   Each is evaluated on the same held-out rows: loss per middle token, and greedy completions scored by edit
   similarity and exact match against the committed middles; the base's scores come from the same runs.

Prints one table with each pipeline's numbers, its gate decision and its minutes (JSON in WORK/result.json).
Sized for 2 CPU cores and about 20 minutes a repository; see bench/README.md for the measured figures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Shared cores: one thread per process was 3-10x faster than two here while other work ran (see tests/conftest.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"

# The base: ~1.3M parameters (4 layers x 128, 2,048-token vocabulary), trained on 3M tokens of the stdlib.
BASE_ARGS = ["--params", "1.3M", "--tokens", "3M", "--seq-len", "512", "--learning-rate", "3e-3",
             "--include", "*.py", "--exclude", "*/test/*", "--exclude", "*/tests/*", "--exclude", "test/*",
             "--exclude", "idlelib/*", "--exclude", "lib2to3/*", "--max-corpus-bytes", "12M"]

# The budgets of the runs in bench/README.md (2026-12-04, 2 shared cores at load 9-10): SFT 200 steps of 8 rows,
# continued pretraining 1M tokens, 200 held-out rows scored and 100 completed: about 10 min (SFT) and 25 min
# (+CPT+SFT) a repository when each pipeline runs in its own process (--only and its own --work).
SETTINGS: dict[str, dict[str, Any]] = {
    "datasets": {"max_row_tokens": 512, "max_prefix_chars": 1200, "max_suffix_chars": 400,
                 "heldout_fraction": 0.1},
    "train": {"learning_rate": 2e-3, "epochs": 1.0, "max_steps": 200, "batch_size": 8, "logging_steps": 25,
              "warmup_ratio": 0.05, "train_timeout_s": 3600.0, "checkpoint_every_steps": 1000},
    "pretrain": {"max_tokens": 1_000_000, "max_epochs": 4.0, "seq_tokens": 512, "batch_size": 8,
                 "learning_rate": 2e-3},
    "evaluate": {"batch_size": 16, "max_rows": 200, "generate_rows": 100, "eval_timeout_s": 3600.0},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="a git repository (bare or not)")
    parser.add_argument("--name", help="owner/name (default: the folder's name)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/devtune-quality"))
    parser.add_argument("--only", choices=["sft", "cpt", "cpt+sft"], action="append", help="pipelines to run")
    parser.add_argument("--base-params", help="base model parameters (default 1.3M)")
    parser.add_argument("--base-tokens", help="base model training tokens (default 3M)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config setting, e.g. pretrain.max_tokens=1000000")
    args = parser.parse_args()
    for flag, value in (("--params", args.base_params), ("--tokens", args.base_tokens)):
        if value:
            BASE_ARGS[BASE_ARGS.index(flag) + 1] = value
    for item in args.set:
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        SETTINGS.setdefault(section, {})[key] = json.loads(value)
    name = args.name or args.repo.resolve().name
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    base, base_minutes = build_base(work)
    clone = work / "repos" / name.replace("/", "+")
    if not clone.exists():
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(args.repo), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "remote", "set-url", "origin", f"https://github.com/{name}.git"],
                       check=True)
    overlap = corpus_overlap(base, clone)
    site = work / "sites" / name.replace("/", "+")
    shutil.rmtree(site, ignore_errors=True)
    collected = time.monotonic()
    config = write_config(site / "collected", base, clone)
    harvest = collect(config)
    collect_minutes = (time.monotonic() - collected) / 60
    results: dict[str, Any] = {}
    only = args.only or ["sft", "cpt", "cpt+sft"]
    # +CPT+SFT is the +CPT site carried on: its team cycle starts from the CPT adapter that run promoted.
    for pipeline in [p for p in ("sft", "cpt") if p in only or (p == "cpt" and "cpt+sft" in only)]:
        folder = site / pipeline
        shutil.copytree(site / "collected", folder)
        config = write_config(folder, base, clone)
        for step in (["sft"] if pipeline == "sft" else ["cpt", "cpt+sft"] if "cpt+sft" in only else ["cpt"]):
            t = time.monotonic()
            results[step] = run_step(config, "sft" if step == "cpt+sft" else step)
            results[step]["minutes"] = (time.monotonic() - t) / 60 + (results["cpt"]["minutes"]
                                                                       if step == "cpt+sft" else 0.0)
            print(f"{step}: {json.dumps(results[step]['row'])} ({results[step]['minutes']:.1f} min)", flush=True)
    report = {"repo": name, "base": str(base), "base_minutes": base_minutes, "corpus_overlap_files": overlap,
              "harvest": harvest, "collect_minutes": collect_minutes, "results": results,
              "minutes": (time.monotonic() - started) / 60}
    (work / f"result-{name.replace('/', '+')}.json").write_text(json.dumps(report, indent=2, default=str))
    print(table(report))
    return 0


def build_base(work: Path) -> tuple[Path, float]:
    """The from-scratch base for BASE_ARGS (built once; the minutes it took, from its pretrain.json)."""
    from pipelines.pretrain.scratch import stdlib_folder

    key = hashlib.sha256(json.dumps(BASE_ARGS).encode()).hexdigest()[:10]
    out = work / f"base-{key}"
    if not (out / "pretrain.json").is_file():
        subprocess.run([sys.executable, "-m", "pipelines.pretrain.scratch", str(out), str(stdlib_folder()),
                        *BASE_ARGS], check=True, cwd=ROOT)
    return out, json.loads((out / "pretrain.json").read_text())["seconds"] / 60


def corpus_overlap(base: Path, clone: Path) -> int:
    """Files of the repository's HEAD whose exact content is in the base's corpus (must be 0)."""
    from pipelines.pretrain.scratch import read_corpus, stdlib_folder

    plan = BASE_ARGS
    include = tuple(plan[i + 1] for i, a in enumerate(plan) if a == "--include")
    exclude = tuple(plan[i + 1] for i, a in enumerate(plan) if a == "--exclude")
    corpus = {hashlib.sha256(t.encode()).hexdigest() for _, t in read_corpus(stdlib_folder(), include, exclude)}
    listing = subprocess.run(["git", "-C", str(clone), "ls-tree", "-r", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.split("\n")
    hits = 0
    for line in filter(None, listing):
        meta, _ = line.split("\t", 1)
        blob = meta.split()[2]
        text = subprocess.run(["git", "-C", str(clone), "cat-file", "-p", blob], capture_output=True).stdout
        hits += hashlib.sha256(text).hexdigest() in corpus
    return hits


def write_config(state: Path, base: Path, clone: Path) -> Path:
    from daemon.config import render_config

    state.mkdir(parents=True, exist_ok=True)
    text = render_config({"": {"state_dir": ".", "base_model": str(base), "default_team": "repo"}, **SETTINGS},
                         sources=[{"kind": "git", "path": str(clone), "name": "repo"}])
    (state / "config.toml").write_text(text)
    return state / "config.toml"


def collect(config: Path) -> dict[str, Any]:
    from daemon import jobs
    from daemon.config import load_config
    from pipelines.store.db import Store

    cfg = load_config(config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        result = jobs.collect(store, cfg)
        assert result["error"] is None, result["error"]
        return {"commits": store.counts()["commits"]["total"]}
    finally:
        store.close()


@contextlib.contextmanager
def cpu_turn(run_id: str, scope: str) -> Iterator[tuple[str, ...]]:
    yield ()


def run_step(config: Path, step: str) -> dict[str, Any]:
    """Run continued pretraining ("cpt") or a team cycle ("sft") on the site of `config`."""
    from daemon.config import load_config
    from pipelines.cycle import run_cycle
    from pipelines.pretrain.run import run_pretrain
    from pipelines.scope import team
    from pipelines.store.db import Store
    from pipelines.train.rundir import new_run_id

    cfg = load_config(config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        scope = "cpt:repo" if step == "cpt" else "team:repo"
        run_id = new_run_id(scope)
        store.start_run(run_id, scope)
        if step == "cpt":
            result = run_pretrain(store, cfg, "repo", run_id, cpu_turn)
            outcome, summary = result.outcome, result.summary
        else:
            cycle = run_cycle(store, cfg, team("repo"), "repo", run_id, cpu_turn, lambda: [])
            outcome, summary = cycle.outcome, cycle.summary
    finally:
        store.close()
    summary = _slim(summary)
    return {"outcome": outcome, "summary": summary, "row": _row(summary.get("eval"), summary.get("gate"), outcome,
                                                                  summary)}


def _slim(summary: dict[str, Any]) -> dict[str, Any]:
    keep = ("dataset", "corpus", "train", "eval", "gate", "start", "skipped", "version")
    return {k: v for k, v in summary.items() if k in keep}


def _row(ev: dict[str, Any] | None, decision: dict[str, Any] | None, outcome: str,
         summary: dict[str, Any]) -> dict[str, Any]:
    if ev is None:
        return {"outcome": outcome, "why": summary.get("skipped")}
    return {"base": {k: ev["base"][k] for k in ("heldout_loss", "edit_similarity", "exact_match")},
            "candidate": {k: ev["candidate"][k] for k in ("heldout_loss", "edit_similarity", "exact_match")},
            "outcome": outcome, "reasons": decision["reasons"] if decision else []}


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['repo']}: {report['harvest']['commits']:,} commits; base built in "
             f"{report['base_minutes']:.1f} min (corpus/repository overlap: {report['corpus_overlap_files']} files); "
             f"harvest {report['collect_minutes']:.1f} min",
             f"{'pipeline':<10} {'held-out loss':>14} {'edit sim':>9} {'exact':>6}  {'gate':<9} {'min':>5}  why"]
    base_row = None
    for pipeline, r in report["results"].items():
        row = r["row"]
        if "base" not in row:
            lines.append(f"{pipeline:<10} skipped: {row.get('why')}")
            continue
        base_row = base_row or row["base"]
        c = row["candidate"]
        lines.append(f"{pipeline:<10} {c['heldout_loss']:>14.4f} {c['edit_similarity']:>9.4f} "
                     f"{c['exact_match']:>6.3f}  {row['outcome']:<9} {r['minutes']:>5.1f}  "
                     f"{'; '.join(row['reasons'])[:160]}")
    if base_row:
        lines.insert(2, f"{'base':<10} {base_row['heldout_loss']:>14.4f} {base_row['edit_similarity']:>9.4f} "
                        f"{base_row['exact_match']:>6.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

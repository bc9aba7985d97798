"""One continued-pretraining run for one team, on one screen: data, train, evaluate, gate, register.

    1. data      the team's datasets (pipelines/datasets/build.py) for their held-out rows and cutoff, and
                 the corpus: the team's repositories as of that cutoff (pipelines/pretrain/corpus.py)
    2. train     `python -m pipelines.pretrain RUN_DIR` as a child, on a GPU slot (or several, under
                 `accelerate launch`, as training does): a LoRA of [train]'s shape on the configured base_model
    3. evaluate  `python -m pipelines.evaluate RUN_DIR`: base, the served continued pretraining (if any) and
                 this run on the team's held-out rows
    4. gate      held-out loss is the primary metric: it must fall `[pretrain] min_improvement_rel` below the
                 champion's (the served cpt:/base:<team>, else the base model) and below the base's; the
                 [gate] guardrails (edit similarity, exact match, length) apply as to any adapter
    5. register  output "adapter": the adapter as cpt:<team>/vNNNN, which the team's next cycle starts from
                 (pipelines/pretrain/serving.py); output "base": merged into the base
                 (`python -m pipelines.pretrain.merge`), the model with its adapter/ as base:<team>/vNNNN

A run interrupted in training resumes from its checkpoint in its own run directory (the caller hands the same
run id back, as for cycles). Every run starts from the configured base_model, never from an earlier continued
pretraining: one run reads the whole of the team's code, and its gate compares it with the one it would replace.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.child import run_child
from pipelines.config import Config
from pipelines.datasets.build import build_datasets
from pipelines.datasets.cache import cache_dir
from pipelines.evaluate.gate import EvalReport, GateDecision, gate
from pipelines.files import read_json
from pipelines.ingest.identity import normalize_repo
from pipelines.pretrain.corpus import build_corpus
from pipelines.pretrain.rundir import write_settings
from pipelines.pretrain.samples import FimShape
from pipelines.progress import format_seconds
from pipelines.publish import registry
from pipelines.scope import Scope
from pipelines.store.db import Store
from pipelines.tokens import load_base_tokenizer
from pipelines.train.rundir import RunConfig

log = logging.getLogger("devtune.pretrain")

# Waits for a GPU slot for a run and holds it for the block; yields the slot's GPU ids ((), on CPU).
Turn = Callable[[str, str], AbstractContextManager[tuple[str, ...]]]


@dataclass(frozen=True)
class PretrainResult:
    run_id: str
    scope: str  # cpt:<team> or base:<team>
    outcome: str  # "promoted" | "kept" (the gate said no) | "skipped" (too little data or code)
    version: str | None
    summary: dict[str, Any]


def pretrain_scope(cfg: Config, team: str) -> str:
    return f"{'base' if cfg.pretrain.output == 'base' else 'cpt'}:{team}"


def run_pretrain(store: Store, cfg: Config, team: str, run_id: str, turn: Turn) -> PretrainResult:
    """Run one continued pretraining of `team` as run `run_id` (recorded in the store)."""
    scope = pretrain_scope(cfg, team)
    run_dir = cfg.state_dir / "runs" / run_id
    summary: dict[str, Any] = {**((store.run(run_id) or {}).get("summary") or {}), "run_dir": str(run_dir)}
    if not (run_dir / "config.json").is_file():
        tokenizer = load_base_tokenizer(cfg.base_model)
        dataset = build_datasets(store, Scope("team", team), cfg.datasets, tokenizer, run_dir / "data",
                                 cache_dir(cfg.state_dir))
        summary["dataset"] = dataset.as_dict()
        if dataset.skipped:
            return _skip(store, run_id, scope, summary, "dataset", dataset.skipped)
        cutoff = datetime.fromisoformat((read_json(run_dir / "data" / "manifest.json") or {})["heldout_cutoff"])
        repos = sorted(set(store.team_repos(team)) | {normalize_repo(r) for r in cfg.team(team).repos})
        corpus = build_corpus(store, repos, cutoff, cfg.datasets.near_dup_threshold, run_dir / "data" / "cpt.jsonl")
        summary["corpus"] = corpus.as_dict()
        if corpus.chars < cfg.pretrain.min_corpus_chars:
            return _skip(store, run_id, scope, summary, "corpus",
                         f"{corpus.chars:,} characters of code in {', '.join(repos) or 'no repository'} before "
                         f"{cutoff:%Y-%m-%d %H:%M}, fewer than [pretrain] min_corpus_chars = "
                         f"{cfg.pretrain.min_corpus_chars:,}")
        champion = served_pretraining(cfg, scope, store.retrain_marks().keys())
        summary["champion"] = {"scope": champion.scope, "version": champion.version} if champion else None
        RunConfig(run_id=run_id, scope=scope, base_model=cfg.base_model, max_row_tokens=cfg.datasets.max_row_tokens,
                  train=cfg.train, evaluate=cfg.evaluate,
                  served_adapter=str(adapter_dir(champion.path)) if champion else None).write(run_dir)
        write_settings(run_dir, cfg.pretrain, FimShape(
            fim_rate=cfg.pretrain.fim_rate, spm_rate=cfg.datasets.spm_fraction,
            max_middle_lines=cfg.datasets.max_middle_lines, max_block_lines=cfg.datasets.max_block_lines,
            block_fraction=cfg.datasets.block_fraction))
    else:
        log.info("run %s %s: resuming from its checkpoint", run_id, scope)

    store.update_run(run_id, stage="queued", summary=summary)
    if cfg.train.backend == "ray":  # the Ray backend's staging knows fine-tuning run directories only
        log.warning("run %s %s: continued pretraining runs on this host, not on the Ray cluster ([train] backend "
                    "= \"ray\" sends fine-tuning and evaluation runs only)", run_id, scope)
    with turn(run_id, scope) as gpus:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {}
        processes = len(gpus) if cfg.train.gpus_per_run > 1 else 1
        store.update_run(run_id, stage="pretrain", summary=summary)
        run_child("pipelines.pretrain", [str(run_dir)], run_dir / "train.log", cfg.pretrain.timeout_s,
                  on_tick=lambda: log_progress(run_id, run_dir), processes=processes, env=env)
        summary["train"] = read_json(run_dir / "train.json")
        store.update_run(run_id, stage="evaluate", summary=summary)
        run_child("pipelines.evaluate", [str(run_dir)], run_dir / "eval.log", cfg.evaluate.eval_timeout_s, env=env)
        report = EvalReport.load(run_dir / "eval.json")
        decision = gate_pretraining(report, cfg)
        summary["eval"], summary["gate"] = report.as_dict(), decision.as_dict()
        version = None
        if decision.promote:
            folder = run_dir / "adapter"
            if cfg.pretrain.output == "base":
                store.update_run(run_id, stage="merge", summary=summary)
                run_child("pipelines.pretrain.merge", [str(run_dir)], run_dir / "merge.log", cfg.pretrain.timeout_s,
                          env=env)
                folder = run_dir / "base"
                shutil.copytree(run_dir / "adapter", folder / "adapter", dirs_exist_ok=True)
            lineage = {"run_id": run_id, "base_model": cfg.base_model, "team": team,
                       "dataset_sha256": summary["dataset"]["sha256"], "corpus": summary["corpus"],
                       "pretrain_config": asdict(cfg.pretrain), "train_config": asdict(cfg.train),
                       "train": summary["train"], "eval": report.as_dict(), "gate": decision.as_dict(),
                       "parent": registry.served_version(cfg.state_dir, scope), "init": None}
            version = registry.register(cfg.state_dir, scope, folder, lineage)
            registry.promote(cfg.state_dir, scope, version, reason="; ".join(decision.reasons))
            summary["version"] = version
    log.info("run %s %s: %s (%s)", run_id, scope, f"promoted {version}" if version else "not used",
             "; ".join(decision.reasons))
    store.update_run(run_id, status="succeeded", stage="done", summary=summary)
    return PretrainResult(run_id, scope, "promoted" if version else "kept", version, summary)


def gate_pretraining(report: EvalReport, cfg: Config) -> GateDecision:
    """The [gate] rules with held-out loss as the primary metric, to fall `min_improvement_rel` below the
    champion's: continued pretraining teaches the team's code, which its loss on the team's newest code shows."""
    champion = report.served or report.base
    rules = replace(cfg.gate, primary_metric="heldout_loss",
                    min_improvement=cfg.pretrain.min_improvement_rel * champion.heldout_loss)
    return gate(report, rules)


def served_pretraining(cfg: Config, scope: str, marked: Any = ()) -> registry.Served | None:
    """What `scope` (cpt:/base:<team>) serves now, when it was made from the configured base_model."""
    served = registry.served(cfg.state_dir).get(scope)
    if served is None or served.lineage.get("base_model") != cfg.base_model or (scope, served.version) in marked:
        return None
    return served


def adapter_dir(version_dir: Path) -> Path:
    """The continued-pretraining adapter of a registered version: the version itself (cpt:), or its adapter/
    (base:, whose version folder is the merged model)."""
    return version_dir / "adapter" if (version_dir / "adapter").is_dir() else version_dir


def log_progress(run_id: str, run_dir: Path) -> None:
    p = read_json(run_dir / "progress.json")
    if p:
        eta = format_seconds(p["eta_s"]) if p.get("eta_s") else "-"
        log.info("run %s pretrain: step %d/%d loss %.4f %s tokens/s ETA %s", run_id, p["step"], p["max_steps"],
                 p["loss"], f"{p['tokens_per_s']:,.0f}", eta)


def _skip(store: Store, run_id: str, scope: str, summary: dict[str, Any], stage: str, why: str) -> PretrainResult:
    log.info("run %s %s skipped: %s", run_id, scope, why)
    summary["skipped"] = why
    store.update_run(run_id, status="skipped", stage=stage, summary=summary, error=why)
    return PretrainResult(run_id, scope, "skipped", None, summary)


def run_scratch(out_dir: Path, corpus: Path, options: list[str], timeout_s: float = 30 * 24 * 3600.0) -> dict[str, Any]:
    """Build a base model from scratch (`python -m pipelines.pretrain.scratch OUT_DIR CORPUS OPTIONS`) as a
    child process, logging its progress; returns OUT_DIR/pretrain.json. Run again to resume."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "scratch.log"

    def tick() -> None:
        p = read_json(out_dir / "progress.json")
        if p:
            eta = format_seconds(p["eta_s"]) if p.get("eta_s") else "-"
            log.info("from scratch: step %d/%d loss %.4f %s tokens/s ETA %s", p["step"], p["max_steps"], p["loss"],
                     f"{p['tokens_per_s']:,.0f}", eta)

    run_child("pipelines.pretrain.scratch", [str(out_dir), str(corpus), *options], log_path, timeout_s,
              on_tick=tick, tick_s=15.0)
    metrics: dict[str, Any] = read_json(out_dir / "pretrain.json") or {}
    return metrics

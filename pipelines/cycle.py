"""One nightly cycle for one team, on one screen: collect, build, train, evaluate, gate, publish.

The store is used only to collect and build the dataset and to record the run; training and evaluation
are child processes that read the run directory. The caller (daemon.runner) owns failure handling: an
exception here leaves the run marked failed with its error, and the next cycle starts a fresh run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.config import Config
from pipelines import registry
from pipelines.child import run_child
from pipelines.datasets import build_datasets
from pipelines.gate import EvalReport, gate
from pipelines.ingest import Directory, collect_all
from pipelines.progress import format_seconds
from pipelines.rundir import RunConfig, read_json
from pipelines.scope import team as team_scope
from pipelines.store import Store
from pipelines.tokens import load_base_tokenizer

log = logging.getLogger("devtune.cycle")


@dataclass(frozen=True)
class CycleResult:
    run_id: str
    scope: str
    outcome: str  # "promoted" | "kept" (gate said no) | "skipped" (not enough data)
    version: str | None  # the version promoted, if any
    summary: dict[str, Any]


def run_cycle(store: Store, cfg: Config, team: str, run_id: str) -> CycleResult:
    """Run one full cycle for `team:<team>` as run `run_id` (already recorded as running)."""
    scope = str(team_scope(team))
    run_dir = cfg.state_dir / "runs" / run_id
    summary: dict[str, Any] = {"run_dir": str(run_dir)}

    directory = Directory.from_config(cfg.teams, cfg.default_team, cfg.collect.opt_out)
    summary["collect"] = [r.as_dict() for r in collect_all(store, cfg.sources, cfg.collect, directory)]

    tokenizer = load_base_tokenizer(cfg.base_model)
    dataset = build_datasets(store, team_scope(team), cfg.datasets, tokenizer, run_dir / "data")
    summary["dataset"] = dataset.as_dict()
    if dataset.skipped:
        log.info("run %s %s skipped: %s", run_id, scope, dataset.skipped)
        store.update_run(run_id, status="skipped", stage="dataset", summary=summary, error=dataset.skipped)
        return CycleResult(run_id, scope, "skipped", None, summary)

    champion = champion_adapter(cfg.state_dir, scope, cfg.base_model)
    RunConfig(run_id=run_id, scope=scope, base_model=cfg.base_model, max_row_tokens=cfg.datasets.max_row_tokens,
              train=cfg.train, evaluate=cfg.evaluate, served_adapter=str(champion) if champion else None,
              ).write(run_dir)

    store.update_run(run_id, stage="train", summary=summary)
    run_child("pipelines.train", [str(run_dir)], run_dir / "train.log", cfg.train.train_timeout_s,
              on_tick=lambda: log_progress(run_id, run_dir))
    summary["train"] = read_json(run_dir / "train.json")

    store.update_run(run_id, stage="evaluate", summary=summary)
    run_child("pipelines.evaluate", [str(run_dir)], run_dir / "eval.log", cfg.evaluate.eval_timeout_s)
    report = EvalReport.load(run_dir / "eval.json")
    decision = gate(report, cfg.gate)
    summary["eval"], summary["gate"] = report.as_dict(), decision.as_dict()

    version = None
    if decision.promote:
        lineage = {"run_id": run_id, "base_model": cfg.base_model, "dataset_sha256": dataset.sha256,
                   "dataset": dataset.as_dict(), "train_config": asdict(cfg.train), "train": summary["train"],
                   "eval": report.as_dict(), "gate": decision.as_dict(),
                   "parent": registry.served_version(cfg.state_dir, scope)}
        version = registry.register(cfg.state_dir, scope, run_dir / "adapter", lineage)
        registry.promote(cfg.state_dir, scope, version, reason="; ".join(decision.reasons))
        summary["version"] = version
    log.info("run %s %s: %s (%s)", run_id, scope, f"promoted {version}" if version else "kept the champion",
             "; ".join(decision.reasons))
    store.update_run(run_id, status="succeeded", stage="done", summary=summary)
    return CycleResult(run_id, scope, "promoted" if version else "kept", version, summary)


def champion_adapter(state_dir: Path, scope: str, base_model: str) -> Path | None:
    """The served adapter to beat, if one is served for `scope` and was trained on the same base model."""
    current = registry.served(state_dir).get(scope)
    if current is None:
        return None
    if current.lineage.get("base_model") != base_model:
        log.warning("%s serves %s, trained on %s, not the configured base_model %s: the candidate will be "
                    "compared with the base model only", scope, current.version,
                    current.lineage.get("base_model"), base_model)
        return None
    return current.path


def log_progress(run_id: str, run_dir: Path) -> None:
    p = read_json(run_dir / "progress.json")
    if p:
        eta = format_seconds(p["eta_s"]) if p.get("eta_s") else "-"
        log.info("run %s train: step %d/%d loss %.4f %s tokens/s ETA %s", run_id, p["step"], p["max_steps"],
                 p["loss"], f"{p['tokens_per_s']:,.0f}", eta)

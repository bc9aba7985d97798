"""One nightly cycle for one scope, on one screen: collect, build, train, evaluate, gate, publish.

Collecting is the caller's (`collect`: each source a job of its own, so one that fails is reported and the
cycle goes on with what the others brought).

A team's cycle starts from the team's served adapter (warm start: new rows plus a replay sample; a full
retrain with `[train] warm_start = false`). A developer's cycle (run by daemon.jobs after their team's)
starts from the team's current adapter and trains on that developer's rows only; it is gated against what
the developer is served now (their own adapter, else the team's).

The store is used only to collect and build the dataset and to record the run; training and evaluation
read only the run directory, as child processes or Ray jobs (`[train] backend`: pipelines/train/backends.py),
and they wait for a slot (`turn`). A run that was interrupted in training is resumed in its own run
directory, from its checkpoint, by the next cycle of its scope (daemon.jobs.start_cycle hands the same run
id back). The caller (daemon.runner) owns failure
handling: an exception here leaves the run marked failed with its error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from pipelines.child import Primed
from pipelines.config import Config
from pipelines.datasets.build import build_datasets
from pipelines.datasets.cache import cache_dir
from pipelines.evaluate.gate import EvalReport, gate
from pipelines.files import read_json
from pipelines.pretrain.serving import descends_from, pretrained_adapter, team_base
from pipelines.progress import format_seconds
from pipelines.publish import registry
from pipelines.publish.publish import register_with_exports
from pipelines.scope import Scope
from pipelines.store.db import Store
from pipelines.tokens import load_base_tokenizer
from pipelines.train.backends import prime_stage, run_stage
from pipelines.train.replay import newer
from pipelines.train.rundir import RunConfig

log = logging.getLogger("devtune.cycle")


class Turn(Protocol):
    """Waits for a GPU slot for a run and holds it for the block; yields the slot's GPU ids ((), on CPU)."""

    def __call__(self, run_id: str, scope: str) -> AbstractContextManager[tuple[str, ...]]: ...


class Collect(Protocol):
    """Collects every source, each on its own (one that fails is reported, the others still collected);
    returns a report per source."""

    def __call__(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class CycleResult:
    run_id: str
    scope: str
    outcome: str  # "promoted" | "canary" (served to a share first) | "kept" (gate said no) | "skipped"
    version: str | None  # the version promoted, if any
    summary: dict[str, Any]


@dataclass(frozen=True)
class Start:
    """Where a run's adapter starts and what it must beat."""

    champion: registry.Served | None  # what the scope is served now (gated against)
    init: registry.Served | None  # the adapter training continues from; None = a fresh LoRA
    data_until: str | None  # rows up to here were seen by `init` (replay only); None = train on all rows
    why: str  # the reason to skip the run, or ""


def run_cycle(store: Store, cfg: Config, scope: Scope, team: str, run_id: str, turn: Turn,
              collect: Collect) -> CycleResult:
    """Run one full cycle for `scope` (team:<team>, or dev:<id> of `team`) as run `run_id` (recorded)."""
    run_dir = cfg.state_dir / "runs" / run_id
    made = not run_dir.exists()  # a run skipped before its datasets leaves no empty folder behind
    # The training child starts now and imports torch, transformers and peft (4.8-6.5 s on 2 cores) while
    # this thread collects and builds the datasets (7.5 s for 100k stored suggestions): the night saves up to
    # the shorter of the two. A run resuming from its checkpoint has nothing to build; a skipped one discards
    # it. The evaluation's child is not started early as well: three busy processes on 2 cores slowed the
    # collect and the build more than its import saved (the 100k night 37.5 -> 40.9 s, bench/README).
    primed = None if (run_dir / "config.json").is_file() else prime_stage("train", run_dir, cfg.train)
    try:
        return _cycle(store, cfg, scope, team, run_id, turn, collect, primed)
    finally:
        if primed is not None:
            primed.discard()  # a no-op once its stage took it
            if made:  # skipped before its datasets: leave no folder that holds nothing
                with contextlib.suppress(OSError):
                    run_dir.rmdir()


def _cycle(store: Store, cfg: Config, scope: Scope, team: str, run_id: str, turn: Turn, collect: Collect,
           primed: Primed | None) -> CycleResult:
    name = str(scope)
    marked = store.retrain_marks().keys()
    cfg = replace(cfg, base_model=team_base(cfg, team, marked))  # the team's own, when continued pretraining made one
    run_dir = cfg.state_dir / "runs" / run_id
    resuming = (run_dir / "config.json").is_file()
    summary: dict[str, Any] = {**((store.run(run_id) or {}).get("summary") or {}), "run_dir": str(run_dir)}

    if not resuming:
        if scope.kind == "team":
            summary["collect"] = collect()
        start = plan_start(cfg, scope, team, marked)
        if start.why:
            return skip(store, run_id, name, summary, "plan", start.why)
        tokenizer = load_base_tokenizer(cfg.base_model)
        dataset = build_datasets(store, scope, cfg.datasets, tokenizer, run_dir / "data",
                                 cache_dir(cfg.state_dir))
        summary["dataset"] = dataset.as_dict()
        if dataset.skipped:
            return skip(store, run_id, name, summary, "dataset", dataset.skipped)
        fresh = newer(dataset.train_ts, start.data_until)
        if scope.kind == "team" and start.init is not None and not fresh:
            return skip(store, run_id, name, summary, "dataset",
                        f"no rows newer than {start.init.version}'s (up to {start.data_until}): nothing new to "
                        "learn; [train] warm_start = false retrains anyway")
        if scope.kind == "dev":
            why = unchanged_developer(store, name, start, max(dataset.train_ts, default=None))
            if why:
                return skip(store, run_id, name, summary, "dataset", why)
        summary["start"] = {"champion": _describe(start.champion), "init": _describe(start.init),
                            "data_until": start.data_until, "new_rows": fresh}
        RunConfig(run_id=run_id, scope=name, base_model=cfg.base_model, max_row_tokens=cfg.datasets.max_row_tokens,
                  train=cfg.train, evaluate=cfg.evaluate,
                  served_adapter=str(start.champion.path) if start.champion else None,
                  init_adapter=str(start.init.path) if start.init else None, data_until=start.data_until,
                  # A Ray job may run where the state folder is not: it scores every row.
                  scores_dir=str(cfg.state_dir / "scores") if cfg.train.backend == "local" else None,
                  ).write(run_dir)
    else:
        log.info("run %s %s: resuming from its checkpoint", run_id, name)
        summary["resumed"] = (store.run(run_id) or {}).get("attempts", 2)

    store.update_run(run_id, stage="queued", summary=summary)
    with turn(run_id, name) as gpus:  # a local GPU slot, or (backend "ray") one of [ray] max_jobs
        store.update_run(run_id, stage="train", summary=summary)
        run_stage("train", run_dir, cfg.train, cfg.ray, cfg.train.train_timeout_s, gpus, primed=primed,
                  on_tick=lambda: log_progress(run_id, run_dir))
        summary["train"] = read_json(run_dir / "train.json")
        store.update_run(run_id, stage="evaluate", summary=summary)
        run_stage("evaluate", run_dir, cfg.train, cfg.ray, cfg.evaluate.eval_timeout_s, gpus)
    report = EvalReport.load(run_dir / "eval.json")
    decision = gate(report, cfg.gate)
    summary["eval"], summary["gate"] = report.as_dict(), decision.as_dict()

    version = None
    if decision.promote:
        run = RunConfig.read(run_dir)
        init = read_json(Path(run.init_adapter) / "lineage.json") if run.init_adapter else None
        lineage = {"run_id": run_id, "base_model": cfg.base_model, "team": team,
                   "dataset_sha256": summary.get("dataset", {}).get("sha256"), "dataset": summary.get("dataset"),
                   "train_config": asdict(run.train), "train": summary["train"], "eval": report.as_dict(),
                   "gate": decision.as_dict(), "parent": registry.served_version(cfg.state_dir, name),
                   "init": {"scope": init.get("scope"), "version": init.get("version")} if init else None}
        # Exports (vLLM folder, GGUF, Modelfile) are written before the version exists; a failed one is
        # reported and does not block the promotion (pipelines/publish/publish.py).
        version, summary["exports"] = register_with_exports(
            cfg.state_dir, name, run_dir / "adapter", lineage, cfg.base_model, cfg.publish.export_timeout_s,
            run_dir / "export.log")
        if scope.kind == "team" and cfg.online.canary_share > 0 and registry.served_version(cfg.state_dir, name):
            # Served first to a share of the team; the field decides the rest (pipelines/online/review.py).
            registry.start_canary(cfg.state_dir, name, version, cfg.online.canary_share, "; ".join(decision.reasons))
            summary["canary"] = {"version": version, "share": cfg.online.canary_share}
        else:
            registry.promote(cfg.state_dir, name, version, reason="; ".join(decision.reasons))
        summary["version"] = version
    outcome = "kept" if version is None else "canary" if "canary" in summary else "promoted"
    log.info("run %s %s: %s (%s)", run_id, name, {"kept": "kept the champion", "promoted": f"promoted {version}",
                                                  "canary": f"serves {version} to a canary share first"}[outcome],
             "; ".join(decision.reasons))
    store.update_run(run_id, status="succeeded", stage="done", summary=summary)
    return CycleResult(run_id, name, outcome, version, summary)


def plan_start(cfg: Config, scope: Scope, team: str, marked: Collection[tuple[str, str]] = ()) -> Start:
    """The champion to beat and the adapter to start from, for a team or one of its developers.

    A served version in `marked` (trained on rows of a developer who was since forgotten) is neither a
    starting point nor a champion: the run retrains from the base model on the remaining rows, and is
    promoted when it beats the base."""
    team_adapter = same_base(cfg, registry.served(cfg.state_dir).get(f"team:{team}"))
    if team_adapter is not None and (team_adapter.scope, team_adapter.version) in marked:
        if scope.kind == "dev":
            return Start(None, None, None, f"team:{team} serves {team_adapter.version}, trained on rows of a "
                                           "forgotten developer: a developer's adapter waits for its retrain")
        return Start(None, pretrained_adapter(cfg, team, marked), None, "")
    if scope.kind == "team":
        cpt = pretrained_adapter(cfg, team, marked)
        if cpt is not None and (team_adapter is None or not cfg.train.warm_start
                                or not descends_from(cfg.state_dir, team_adapter, cpt)):
            # Continued pretraining is the team adapter's first stage: SFT continues on it, on every row.
            return Start(team_adapter, cpt, None, "")
        if not cfg.train.warm_start or team_adapter is None:
            return Start(team_adapter, None, None, "")
        return Start(team_adapter, team_adapter, _data_until(team_adapter), "")
    if team_adapter is None:
        return Start(None, None, None, f"team:{team} serves no adapter yet: a developer's adapter starts from "
                                       "their team's, so it waits for the team's first promotion")
    own = same_base(cfg, registry.served(cfg.state_dir).get(str(scope)))
    if own is not None and (own.scope, own.version) in marked:
        own = None
    # Every night from the team's current adapter, on all of the developer's rows: the team adapter saw
    # them diluted among everyone's, and a personal adapter exists to weigh them more.
    return Start(own or team_adapter, team_adapter, None, "")


def same_base(cfg: Config, served: registry.Served | None) -> registry.Served | None:
    """`served`, unless it was trained on another base model than the configured one (then unusable)."""
    if served is None or served.lineage.get("base_model") == cfg.base_model:
        return served
    log.warning("%s serves %s, trained on %s, not the configured base_model %s: it is neither a starting point "
                "nor a champion", served.scope, served.version, served.lineage.get("base_model"), cfg.base_model)
    return None


def _data_until(served: registry.Served) -> str | None:
    until: str | None = (served.lineage.get("train") or {}).get("data_until")
    return until


def unchanged_developer(store: Store, scope: str, start: Start, newest: str | None) -> str:
    """Why a developer's run would only repeat the last one, or "".

    A developer's run trains on all their rows from the team's current adapter, so it is worth running when
    either changed since their last run: a new team version, or rows newer than that run saw.
    """
    last = next((r for r in store.latest_runs_by_scope(with_gate=True) if r["scope"] == scope), None)
    if last is None or start.init is None:
        return ""
    before = last["summary"]
    started_from = (before.get("start") or {}).get("init") or {}
    seen = (before.get("train") or {}).get("data_until")
    if started_from.get("scope") != start.init.scope or started_from.get("version") != start.init.version:
        return ""
    if newest is not None and (seen is None or newest > seen):
        return ""
    outcome = f"promoted {before['version']}" if before.get("version") else "kept the champion"
    return (f"nothing changed since run {last['run_id']} ({outcome}): {start.init.scope} still serves "
            f"{start.init.version} and no row is newer than {seen}")


def _describe(served: registry.Served | None) -> dict[str, str] | None:
    return {"scope": served.scope, "version": served.version, "path": str(served.path)} if served else None


def skip(store: Store, run_id: str, scope: str, summary: dict[str, Any], stage: str, why: str) -> CycleResult:
    log.info("run %s %s skipped: %s", run_id, scope, why)
    summary["skipped"] = why
    store.update_run(run_id, status="skipped", stage=stage, summary=summary, error=why)
    return CycleResult(run_id, scope, "skipped", None, summary)


def log_progress(run_id: str, run_dir: Path) -> None:
    p = read_json(run_dir / "progress.json")
    if p:
        eta = format_seconds(p["eta_s"]) if p.get("eta_s") else "-"
        log.info("run %s train %s %s/%s: step %d/%d loss %.4f %s tokens/s ETA %s", run_id, p.get("stage", ""),
                 p.get("stage_index", 1), p.get("stages", 1), p["step"], p["max_steps"], p["loss"],
                 f"{p['tokens_per_s']:,.0f}", eta)

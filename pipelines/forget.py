"""Forget a developer for good, on one screen: their rows, datasets, runs and personal adapters, and a
tombstone so later collects store nothing of theirs.

    1. plan      every identity of theirs (id, config aliases, identities their events were stored under,
                 their git author emails and names), what goes, and which adapters saw their rows
    2. store     one transaction: their IDE rows and identities deleted, their commits reduced to sha,
                 parents and time (as `opt_out` keeps them), other rows' texts that name them replaced by
                 "<forgotten>", tombstones and retrain marks written, and a job listing the file work
    3. files     their own runs and personal adapters (registry/dev:<id>, served/dev:<id>) removed; their
                 teams' runs lose data/ and checkpoints/; exports/, the evaluations' remembered row scores
                 (scores/) and the dataset builds' caches (cache/) emptied; their lines in the HTTP inbox
                 and the gateway's request log blanked in place (offsets stay valid); their tokens removed
    4. done      the job is marked done; the store file is rewritten without the deleted bytes the next time
                 a process opens it alone (DuckDB keeps deleted rows' bytes in the file until then)

A kill before step 2 commits leaves the old state; after it, the tombstones already stop new data, and
`finish_forgets` (run at service start, before every collect and by the command itself) redoes step 3,
which is idempotent. The person's id is never written anywhere but as a tombstone hash: files are found by
hashing what they name. Team adapters that were trained on their rows stay served until the next cycle,
which retrains them from the base model without those rows (`retrain_marks`, shown by `devtune status`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.files import read_json, write_json_atomic
from pipelines.ingest.identity import Directory, tombstone, tombstone_key
from pipelines.ingest.ingest import collect_lock
from pipelines.publish import registry
from pipelines.store.db import Store, request_rewrite

log = logging.getLogger("devtune.forget")

MARK_REASON = "trained on rows of a developer who was forgotten: the next cycle retrains it from the base model"


@dataclass
class ForgetPlan:
    """What forgetting one developer removes. Shown to the operator; never stored (it names the person)."""

    developer: str
    identities: list[str]
    counts: dict[str, int]
    teams: list[str]
    team_runs: list[str]
    personal_versions: list[str]
    retrain: list[tuple[str, str]] = field(default_factory=list)  # (scope, version) of adapters that saw their rows
    tombstone: bool = True  # False for an opt-out: the config keeps them out, and removing it lets them back

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_forget(store: Store, cfg: Config, developer: str) -> ForgetPlan:
    """Everything `forget` would remove for `developer` (an id or any alias), without changing anything."""
    directory = Directory.from_config(cfg)
    who = directory.resolve(developer, ()).developer
    ids = sorted({*directory.identities_of(who), *(i.lower() for i in store.stored_identities(who))})
    teams, team_runs = store.team_runs_of(who)
    own_sources = [s.name for s in cfg.sources if s.developer and directory.resolve(s.developer, ()).developer == who]
    return ForgetPlan(developer=who, identities=ids, counts=store.footprint(who, ids, own_sources), teams=teams,
                      team_runs=team_runs, personal_versions=registry.versions(cfg.state_dir, f"dev:{who}"),
                      retrain=_retrain_marks(cfg.state_dir, teams, who))


def forget(store: Store, cfg: Config, developer: str, tombstone_them: bool = True) -> ForgetPlan:
    """Remove everything stored of `developer` (see the module docstring); returns what was removed."""
    # A forget of them killed after its commit left its file work pending, and only that job still knows
    # their teams' runs: the plan below finds no rows of theirs, so it would name none (CI saw exactly
    # this: a second `devtune forget` left their rows in a team run's data/).
    finish_forgets(store, cfg)
    plan = plan_forget(store, cfg, developer)
    plan.tombstone = tombstone_them
    key = tombstone_key(cfg.state_dir)
    hashes = sorted({tombstone(key, i) for i in plan.identities})
    directory = Directory.from_config(cfg)
    own_sources = [s.name for s in cfg.sources
                   if s.developer and directory.resolve(s.developer, ()).developer == plan.developer]
    job_id = secrets.token_hex(8)
    # The job names no one: its files are found again by hashing what they name.
    job = {"tombstone": tombstone_them, "hashes": hashes, "team_runs": plan.team_runs,
           "counts": plan.counts}
    with collect_lock:  # no collect is between batches of this person while their rows go
        store.forget_rows(plan.developer, plan.identities, own_sources, hashes if tombstone_them else [],
                          [(scope, version, MARK_REASON) for scope, version in plan.retrain], job_id, job)
    log.info("forgot a developer (%s): %s; %d adapter version(s) marked for retraining",
             "tombstoned" if tombstone_them else "opted out",
             ", ".join(f"{k} {v}" for k, v in plan.counts.items() if v) or "nothing stored", len(plan.retrain))
    _finish(store, cfg, job_id, job)
    return plan


def finish_forgets(store: Store, cfg: Config) -> int:
    """Finish the file work of forgets a kill interrupted; returns how many were finished."""
    pending = store.pending_forgets()
    for job_id, job in pending:
        log.warning("finishing an interrupted forget (job %s)", job_id)
        _finish(store, cfg, job_id, job)
    return len(pending)


def undo_forget(store: Store, cfg: Config, developer: str, aliases: Iterable[str] = ()) -> int:
    """Let a forgotten developer's future events be stored again; returns the tombstones removed. Only the
    identities named here and in the config are known (their stored ones were deleted with them)."""
    directory = Directory.from_config(cfg)
    who = directory.resolve(developer, ()).developer
    key = tombstone_key(cfg.state_dir)
    ids = {*directory.identities_of(who), developer.lower(), *(a.lower() for a in aliases)}
    return store.remove_tombstones(sorted(tombstone(key, i) for i in ids))


def forget_opted_out(store: Store, cfg: Config) -> list[ForgetPlan]:
    """`[collect] opt_out` is retroactive: what was stored of someone before they opted out goes at the next
    collect, as `forget` removes it, but without a tombstone (the config keeps them out from then on)."""
    directory = Directory.from_config(cfg)
    done = []
    for who in sorted({directory.resolve(o, ()).developer for o in cfg.collect.opt_out}):
        if store.has_rows_of(who, directory.identities_of(who)):
            done.append(forget(store, cfg, who, tombstone_them=False))
    return done


# -- the file work (step 3): idempotent, found by hashes ------------------------------------------------------

def _finish(store: Store, cfg: Config, job_id: str, job: dict[str, Any]) -> None:
    key = tombstone_key(cfg.state_dir)
    hashes = set(job["hashes"])

    def named(identity: str | None) -> bool:
        return bool(identity) and tombstone(key, str(identity)) in hashes

    state = cfg.state_dir
    runs = state / "runs"
    for run_dir in sorted(runs.iterdir()) if runs.is_dir() else []:
        scope = _run_scope(run_dir)
        if scope.startswith("dev:") and named(scope[4:]):
            _remove(run_dir)
        elif run_dir.name in job["team_runs"]:  # their rows are in its datasets and checkpoints
            _remove(run_dir / "data")
            _remove(run_dir / "checkpoints")
    for link in sorted((state / "served").glob("dev:*")) if (state / "served").is_dir() else []:
        if named(link.name[4:]):
            link.unlink()
    for scope_dir in sorted((state / "registry").glob("dev:*")) if (state / "registry").is_dir() else []:
        if named(scope_dir.name[4:]):
            _remove(scope_dir)
    _remove(state / "exports")
    _remove(state / "scores")  # held-out row digests, every scope's: the next evaluations score every row again
    _remove(state / "cache")  # dataset builds' cached rows and sketches (their code): the next builds start cold
    for inbox in sorted((state / "inbox").rglob("*.jsonl")) if (state / "inbox").is_dir() else []:
        _blank_lines(inbox, lambda line: any(named(i) for i in _line_identities(line)))
    # The serving gateway's request log names its callers the same way (a top-level "developer").
    for requests in sorted((state / "gateway").glob("requests-*.jsonl")) if (state / "gateway").is_dir() else []:
        _blank_lines(requests, lambda line: any(named(i) for i in _line_identities(line)))
    _drop_tokens(state, named)
    request_rewrite(state / "store.duckdb")
    store.finish_forget(job_id)


def _run_scope(run_dir: Path) -> str:
    """A run directory's scope: its config.json's, else from its name ("<stamp>-dev-<id>-<hex4>")."""
    config = read_json(run_dir / "config.json")
    if isinstance(config, dict) and isinstance(config.get("scope"), str):
        return str(config["scope"])
    middle = run_dir.name[16:-5]  # "20261122-204115-" ... "-05b9"
    kind, _, name = middle.partition("-")
    return f"{kind}:{name}"


def _remove(path: Path) -> None:
    """Remove a file or tree, read-only registry versions included (they are 0555/0444 by design)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.is_dir():
        return
    for p in [path, *path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


def _line_identities(line: bytes) -> list[str]:
    """The identities an inbox line names: who sent it, and Continue's userId and uniqueId in its body."""
    try:
        obj = json.loads(line)
    except ValueError:
        return []
    if not isinstance(obj, dict):
        return []
    data = (obj.get("body") or {}).get("data") if isinstance(obj.get("body"), dict) else None
    found = [obj.get("developer")]
    if isinstance(data, dict):
        found += [data.get("userId"), data.get("uniqueId")]
    return [str(i) for i in found if isinstance(i, str) and i]


def _blank_lines(path: Path, match: Any) -> int:
    """Overwrite the matching lines of an append-only log with spaces, in place: offsets, and so every saved
    cursor, stay valid, and a reader skips a blank line."""
    blanked = 0
    with path.open("r+b") as f:
        offset = 0
        for line in f.read().split(b"\n"):
            if line.strip() and match(line):
                f.seek(offset)
                f.write(b" " * len(line))
                blanked += 1
            offset += len(line) + 1
        f.flush()
        os.fsync(f.fileno())
    return blanked


def _drop_tokens(state_dir: Path, named: Any) -> None:
    path = state_dir / "tokens.json"
    data = read_json(path)
    if not isinstance(data, dict):
        return
    kept = [t for t in data.get("tokens", []) if not named(t.get("developer"))]
    if len(kept) != len(data.get("tokens", [])):
        write_json_atomic(path, {"tokens": kept})
        path.chmod(0o600)


def _retrain_marks(state_dir: Path, teams: list[str], who: str) -> list[tuple[str, str]]:
    """Every version of the teams' adapters (each warm-started from the one before, so all may carry their
    rows) and continued pretraining, and every other developer's version that started from one of those
    (theirs are removed)."""
    # cpt:/base:<team> (continued pretraining) read every file of the team's repositories, theirs included.
    marks = [(f"{kind}:{t}", v) for t in teams for kind in ("team", "cpt", "base")
             for v in registry.versions(state_dir, f"{kind}:{t}")]
    tainted = set(marks)
    for scope_dir in sorted((state_dir / "registry").glob("dev:*")) if (state_dir / "registry").is_dir() else []:
        if scope_dir.name == f"dev:{who}":
            continue
        for version in registry.versions(state_dir, scope_dir.name):
            init = (read_json(scope_dir / version / "lineage.json") or {}).get("init") or {}
            if (init.get("scope"), init.get("version")) in tainted:
                marks.append((scope_dir.name, version))
    return marks

"""Field measurement: editor events attributed to the version that served them, acceptance per version, canary
rollout with automatic rollback, and personal versions judged before/after (real registry, store, collectors)."""

from __future__ import annotations

import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from collectors.base import GatewayRequest
from collectors.gateway_log import append_request
from daemon import jobs
from daemon.config import load_config
from pipelines.config import Config
from pipelines.online.attribution import attribute
from pipelines.online.stats import wilson
from pipelines.publish import registry
from pipelines.store.db import Store
from support import autocomplete_event, continue_log, run_devtune, store_suggestions, tabby_suggestion, write_config

TEAM = [f"dev{i:02d}@example.com" for i in range(12)]


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def site(tmp_path: Path, tiny_model: Path, sources: list[dict[str, Any]] | None = None,
         online: dict[str, Any] | None = None) -> Config:
    setup = write_config(tmp_path / "site", sources or [], teams=[{"name": "payments", "members": TEAM}], overrides={
        "": {"base_model": str(tiny_model)}, "serve": {"enabled": True},
        "online": {"min_shown": 1500, "min_linked": 100000, "canary_share": 0.5, **(online or {})}})
    return load_config(setup.config)


def register(cfg: Config, adapter: Path, scope: str = "team:payments") -> str:
    return registry.register(cfg.state_dir, scope, adapter, {"base_model": str(cfg.base_model), "run_id": "r",
                                                             "train": {"seconds": 12.5, "device": "cpu"}})


def ms(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds") + "Z"


def test_continue_events_are_attributed_to_the_version_that_served_them(tmp_path: Path, tiny_model: Path,
                                                                        strong_run: Path) -> None:
    cfg = site(tmp_path, tiny_model, sources=[
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice", "developer": TEAM[0]},
        {"kind": "continue", "path": str(tmp_path / "bob"), "name": "bob", "developer": TEAM[1]}],
        online={"canary_share": 0.0})
    v1 = register(cfg, strong_run / "adapter")
    before = utcnow()
    time.sleep(0.05)
    registry.promote(cfg.state_dir, "team:payments", v1)
    time.sleep(0.3)
    between = utcnow()
    time.sleep(0.3)
    v2 = register(cfg, strong_run / "adapter")
    registry.promote(cfg.state_dir, "team:payments", v2)
    time.sleep(0.1)
    after = utcnow()
    time.sleep(0.2)
    # As Continue writes them: each event's timestamp is when it was decided; modelName the gateway's stable name.
    continue_log(tmp_path / "alice", [
        autocomplete_event(completionId="a-base", timestamp=ms(before - timedelta(seconds=1)), modelName="devtune"),
        autocomplete_event(completionId="a-v1", timestamp=ms(between), modelName="devtune"),
        autocomplete_event(completionId="a-v2", timestamp=ms(after), modelName="devtune"),
        autocomplete_event(completionId="a-other", timestamp=ms(after), modelName="qwen2.5-coder:1.5b")])
    # Bob's editor asked the gateway, which answered with v1 (say, a router still on it), 3 s before his event.
    asked = utcnow() + timedelta(seconds=5)
    append_request(cfg.state_dir / "gateway", GatewayRequest(
        key=f"cmpl-{uuid.uuid4()}", received_at=asked, developer=TEAM[1], team="payments", scope="team:payments",
        version=v1, served_name="devtune-team-payments-v0001", model="devtune", backend="builtin", stream=True,
        status=200, latency_ms=120.0, first_token_ms=40.0, prompt_tokens=300, completion_tokens=12,
        finish_reason="stop", error=None))
    continue_log(tmp_path / "bob", [
        autocomplete_event(completionId="b-gw", timestamp=ms(asked + timedelta(seconds=3)), modelName="devtune"),
        autocomplete_event(completionId="b-late", timestamp=ms(asked + timedelta(seconds=90)), modelName="devtune")])

    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        result = jobs.collect(store, cfg)
        assert result["error"] is None
        served = {r[0]: r[1:4] for r in store.con.execute(
            "SELECT suggestion_id, scope, version, served_by FROM suggestion_served").fetchall()}
        assert served == {
            "a-base": ("base", None, "timeline"), "a-v1": ("team:payments", v1, "timeline"),
            "a-v2": ("team:payments", v2, "timeline"), "a-other": (None, None, "unknown"),
            "b-gw": ("team:payments", v1, "gateway"),  # the gateway's answer beats the timeline
            "b-late": ("team:payments", v2, "timeline")}  # 90 s after the request: not its event
        # A rollback rewrites the timeline, and the attribution follows it at the next pass.
        registry.rollback(cfg.state_dir, "team:payments")
        continue_log(tmp_path / "alice", [autocomplete_event(
            completionId="a-after-rollback", timestamp=ms(utcnow() + timedelta(seconds=3)), modelName="devtune")],
            append=True)
        jobs.collect(store, cfg)
        again = dict(store.con.execute("SELECT suggestion_id, version FROM suggestion_served").fetchall())
        assert again["a-after-rollback"] == v1 and again["a-v2"] == v2  # shown while v2 was served
    finally:
        store.close()


def simulate(store: Store, arms: dict[str, float], start: datetime, per_developer: int, seed: int) -> None:
    """Suggestions shown to each developer after `start`, accepted at exactly their arm's rate (in shuffled
    order: the rates are known, so the verdicts are too)."""
    rng = random.Random(seed)
    rows = []
    for developer, rate in arms.items():
        accepted = [i < round(rate * per_developer) for i in range(per_developer)]
        rng.shuffle(accepted)
        for i in range(per_developer):
            rows.append(tabby_suggestion(
                id=f"{developer}-{seed}-{i}", developer=developer, team="payments", model="devtune",
                shown_at=start + timedelta(seconds=1 + i), accepted=accepted[i],
                completion=f"    return x + {i}\n", filepath=f"lib/m{i % 50}.py"))
    store_suggestions(store, rows)


def canary_site(tmp_path: Path, tiny_model: Path, strong_run: Path) -> tuple[Config, str, list[str], list[str]]:
    cfg = site(tmp_path, tiny_model)
    v1 = register(cfg, strong_run / "adapter")
    registry.promote(cfg.state_dir, "team:payments", v1)
    v2 = register(cfg, strong_run / "adapter")
    registry.start_canary(cfg.state_dir, "team:payments", v2, 0.5, "gate passed")
    arm = [d for d in TEAM if registry.in_canary(d, v2, 0.5)]
    rest = [d for d in TEAM if d not in arm]
    assert arm and rest
    return cfg, v2, arm, rest


@pytest.mark.parametrize(("canary_rate", "rest_rate", "expected"), [(0.30, 0.22, "promoted"),
                                                                    (0.22, 0.30, "rolled_back"),
                                                                    (0.25, 0.25, "promoted")])
def test_a_canary_is_promoted_or_rolled_back_by_what_editors_did(tmp_path: Path, tiny_model: Path, strong_run: Path,
                                                                 canary_rate: float, rest_rate: float,
                                                                 expected: str) -> None:
    cfg, v2, arm, rest = canary_site(tmp_path, tiny_model, strong_run)
    adapter = registry.adapter_for(cfg.state_dir, arm[0], "payments")
    assert adapter is not None and adapter.version == v2  # the arm is served the canary...
    others = registry.adapter_for(cfg.state_dir, rest[0], "payments")
    assert others is not None and others.version == "v0001"  # ...and everyone else what was served
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        start = datetime.fromisoformat(registry.canary(cfg.state_dir, "team:payments").started_at)  # type: ignore[union-attr]
        # Too few events: nothing is decided yet.
        simulate(store, {d: canary_rate for d in arm} | {d: rest_rate for d in rest}, start, 20, seed=1)
        assert jobs.collect(store, cfg)["online"] == []
        assert registry.canary(cfg.state_dir, "team:payments") is not None
        # Enough: ~4,000 per arm.
        per = 8000 // len(TEAM)
        simulate(store, {d: canary_rate for d in arm} | {d: rest_rate for d in rest}, start, per, seed=2)
        (decision,) = jobs.collect(store, cfg)["online"]
        assert decision["scope"] == "team:payments" and decision["action"] == expected, decision["reason"]
        assert registry.canary(cfg.state_dir, "team:payments") is None
        served = registry.served_version(cfg.state_dir, "team:payments")
        assert served == (v2 if expected == "promoted" else "v0001")
        last = registry.history(cfg.state_dir, "team:payments")[-1]
        assert last["action"] == "canary_end" and last["verdict"]["candidate"]["shown"] >= 1500
        # The numbers in status are the reference computation's.
        report = jobs.status(store, cfg)
        numbers = report["online"]["team:payments"][v2]
        expected_shown = store.con.execute(
            "SELECT count(*), count(*) FILTER (WHERE accepted) FROM suggestions WHERE developer IN "
            "(SELECT unnest(?::VARCHAR[]))", [arm]).fetchone()
        assert (numbers["shown"], numbers["accepted"]) == expected_shown
        low, high = wilson(numbers["accepted"], numbers["shown"])
        assert (numbers["acceptance_low"], numbers["acceptance_high"]) == (round(low, 4), round(high, 4))
        assert numbers["developers"] == len(arm) and numbers["train_seconds"] == 12.5
        assert report["field"]["team:payments"]["last"]["outcome"] == expected
    finally:
        store.close()
    human = run_devtune("--config", str(cfg.path), "status")
    assert "online" in human.stdout and f"team:payments               {v2}" in human.stdout


def test_a_canary_past_its_deadline_without_evidence_is_served_to_everyone(tmp_path: Path, tiny_model: Path,
                                                                          strong_run: Path) -> None:
    cfg, v2, _, _ = canary_site(tmp_path, tiny_model, strong_run)
    path = cfg.state_dir / "registry" / "team:payments" / "canary.json"
    state = json.loads(path.read_text())
    state["started_at"] = (utcnow() - timedelta(hours=80)).isoformat()  # a canary 80 h old (max_canary_h 72)
    path.write_text(json.dumps(state))
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        (decision,) = jobs.collect(store, cfg)["online"]
        assert decision["action"] == "promoted" and "max_canary_h = 72 passed" in decision["reason"]
        assert registry.served_version(cfg.state_dir, "team:payments") == v2
    finally:
        store.close()


def test_a_personal_version_worse_than_the_one_it_replaced_is_rolled_back(tmp_path: Path, tiny_model: Path,
                                                                          strong_run: Path) -> None:
    cfg = site(tmp_path, tiny_model, online={"min_shown": 800})
    team = register(cfg, strong_run / "adapter")
    registry.promote(cfg.state_dir, "team:payments", team)
    alice = TEAM[0]
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        simulate(store, {alice: 0.32}, utcnow() - timedelta(hours=2), 1000, seed=3)  # on the team's version
        own = register(cfg, strong_run / "adapter", scope=f"dev:{alice}")
        registry.promote(cfg.state_dir, f"dev:{alice}", own)
        simulate(store, {alice: 0.20}, utcnow(), 1000, seed=4)  # on her own: she accepts less
        (decision,) = jobs.collect(store, cfg)["online"]
        assert decision["scope"] == f"dev:{alice}" and decision["action"] == "rolled_back", decision["reason"]
        assert registry.served_version(cfg.state_dir, f"dev:{alice}") is None  # back to the team's
        served = registry.adapter_for(cfg.state_dir, alice, "payments")
        assert served is not None and served.scope == "team:payments"
        assert jobs.collect(store, cfg)["online"] == []  # judged once
    finally:
        store.close()


def history_entry(cfg: Config, scope: str, at: datetime, **entry: Any) -> None:
    """A registry history line as `registry` appends it, dated `at`: as if the service had been down since."""
    (cfg.state_dir / "registry" / scope).mkdir(parents=True, exist_ok=True)
    with (cfg.state_dir / "registry" / scope / "history.jsonl").open("a") as f:
        f.write(json.dumps({"at": at.isoformat(), **entry}) + "\n")


def test_after_a_history_grows_only_events_it_can_change_are_attributed_again(tmp_path: Path, tiny_model: Path,
                                                                             strong_run: Path) -> None:
    """A promotion redoes the events from its history entry on (and those naming a new version), not every
    event, and the table ends as a recompute of everything leaves it."""
    cfg = site(tmp_path, tiny_model)
    t0 = utcnow() - timedelta(days=20)
    v1 = register(cfg, strong_run / "adapter")
    history_entry(cfg, "team:payments", t0 + timedelta(days=1), action="promote", version=v1, previous=None)
    rows = [tabby_suggestion(id=f"{d}-{h}", developer=d, team="payments", model="devtune",
                             shown_at=t0 + timedelta(hours=h), accepted=h % 3 == 0)
            for d in TEAM[:6] for h in range(0, 15 * 24, 7)]
    rows += [tabby_suggestion(id=f"early-v2-{d}", developer=d, team="payments", model="devtune-team-payments-v0002",
                              shown_at=t0 + timedelta(days=3)) for d in TEAM[:2]]
    rows += [tabby_suggestion(id="other", developer=TEAM[0], team="payments", model="qwen", shown_at=t0)]
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        store_suggestions(store, rows)
        first = attribute(store, cfg.state_dir, {"devtune"})
        assert first.full and first.attributed == len(rows)

        # Days later: a canary of v2, its end, v2 promoted, a personal version; then a day of new events.
        v2 = register(cfg, strong_run / "adapter")
        mine = register(cfg, strong_run / "adapter", scope=f"dev:{TEAM[1]}")
        history_entry(cfg, "team:payments", t0 + timedelta(days=6), action="canary", version=v2, previous=v1,
                      share=0.5)
        history_entry(cfg, "team:payments", t0 + timedelta(days=7), action="canary_end", version=v2)
        history_entry(cfg, "team:payments", t0 + timedelta(days=8), action="promote", version=v2, previous=v1)
        history_entry(cfg, f"dev:{TEAM[1]}", t0 + timedelta(days=9), action="promote", version=mine, previous=None)
        store_suggestions(store, [tabby_suggestion(id=f"new-{i}", developer=TEAM[i % 6], team="payments",
                                                   model="devtune", shown_at=t0 + timedelta(days=15, hours=i))
                                  for i in range(20)])
        table = "SELECT suggestion_id, scope, version, served_by FROM suggestion_served ORDER BY 1"
        before = {r[0]: r[1:] for r in store.con.execute(table).fetchall()}
        again = attribute(store, cfg.state_dir, {"devtune"})
        incremental = store.con.execute(table).fetchall()
        redone = sum(1 for r in rows if r["shown_at"] >= t0 + timedelta(days=6)) + 2 + 20  # + early-v2, new
        assert not again.full and again.attributed == redone < len(rows)

        store.set_online_state("history", "")  # forget what the last pass saw: everything is recomputed
        assert attribute(store, cfg.state_dir, {"devtune"}).full
        assert incremental == store.con.execute(table).fetchall()
        after = {r[0]: r[1:] for r in incremental}
        changed = {k for k in before if before[k] != after[k]}
        assert {"early-v2-" + d for d in TEAM[:2]} <= changed  # a version's name known since: now the timeline's
        assert after[f"{TEAM[0]}-210"] == ("team:payments", v2, "timeline")  # day 8.75: v2, no longer v1
        assert after[f"{TEAM[1]}-217"] == (f"dev:{TEAM[1]}", mine, "timeline")
        assert after[f"{TEAM[0]}-28"] == before[f"{TEAM[0]}-28"] == ("team:payments", v1, "timeline")
    finally:
        store.close()

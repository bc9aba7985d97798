"""`devtune demo` prepares everything offline; its config drives the real CLI (training is covered in test_cli)."""

from __future__ import annotations

import json
from pathlib import Path

from daemon import auth, jobs
from daemon.config import load_config
from daemon.demo import DEMO_TEAM, demo_developers, editor_path, prepare_demo, simulate_editors
from pipelines.publish import registry
from pipelines.store.db import Store
from runs import random_adapter
from support import devtune_json, read_jsonl


def test_demo_builds_sample_data_a_tiny_model_and_a_config_the_cli_uses(tmp_path: Path) -> None:
    config = prepare_demo(tmp_path / "state", pretrain_tokens=10_000)
    cfg = load_config(config)
    assert cfg.state_dir == tmp_path / "state"
    assert Path(cfg.base_model, "model.safetensors").is_file()
    assert [s.kind for s in cfg.sources] == ["git", "continue", "continue", "gateway"]
    assert DEMO_TEAM in cfg.team_names()
    devtune_json("--config", str(config), "collect", "--json")
    status = devtune_json("--config", str(config), "status", "--json")
    meta = json.loads((tmp_path / "state" / "sample" / "sample.json").read_text())
    assert status["commits"]["total"] == meta["commits"] == 72
    assert status["suggestions"]["total"] + status["quarantined"]["total"] == meta["events"]
    assert status["quarantined"]["total"] == meta["malformed_lines"] == 2
    # a second prepare reuses everything and rewrites the same config
    assert prepare_demo(tmp_path / "state", pretrain_tokens=10_000).read_text() == config.read_text()


def test_the_demo_shows_the_editor_path_through_the_gateway(tmp_path: Path) -> None:
    cfg = load_config(prepare_demo(tmp_path / "state", pretrain_tokens=10_000))
    assert demo_developers(cfg, DEMO_TEAM) == ["alice@example.com", "dana@example.com"]  # nothing promoted yet
    for scope, seed in (("team:payments", 1), ("dev:alice@example.com", 2)):
        adapter = random_adapter(Path(cfg.base_model), tmp_path / f"adapter{seed}", seed)
        registry.promote(cfg.state_dir, scope, registry.register(cfg.state_dir, scope, adapter,
                                                                 {"base_model": cfg.base_model}))
    developers = demo_developers(cfg, DEMO_TEAM)
    assert developers == ["alice@example.com", "bob@example.com"]  # one with an own adapter, one without
    answers = editor_path(cfg, developers, max_tokens=8)
    assert [a["adapter"] for a in answers] == ["dev:alice@example.com/v0001", "team:payments/v0001"]
    assert all(a["text"] for a in answers) and answers[0]["text"] != answers[1]["text"]
    # The demo's tokens were issued for the occasion and are revoked; the requests are in the gateway's log.
    assert all(t.revoked_at for t in auth.list_tokens(cfg.state_dir))
    logged = [line for p in (cfg.state_dir / "gateway").glob("requests-*.jsonl") for line in read_jsonl(p)]
    assert [(x["developer"], x["scope"]) for x in logged] == [("alice@example.com", "dev:alice@example.com"),
                                                                ("bob@example.com", "team:payments")]
    # Then the editors' side: simulated editing, as Continue logs it, attributed to what served each developer.
    assert simulate_editors(cfg, events_per_developer=40) == 80
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        assert jobs.collect(store, cfg)["error"] is None
        online = jobs.status(store, cfg)["online"]
    finally:
        store.close()
    assert online["dev:alice@example.com"]["v0001"]["shown"] == 40  # alice has her own
    assert online["team:payments"]["v0001"]["shown"] == 40  # bob gets the team's
    assert online["dev:alice@example.com"]["v0001"]["developers"] == 1

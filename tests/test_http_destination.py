"""Continue's HTTP `data:` destination: real POSTs on 127.0.0.1 to the service's own route, then a collect."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import auth, jobs
from daemon.api import ApiServer
from daemon.config import http_token_file, inbox_dir, load_config
from daemon.service import _inbound
from pipelines.config import Config
from pipelines.store.db import Store
from support import autocomplete_event, continue_event, continue_log, table_rows, write_config, write_lines


class Destination:
    def __init__(self, cfg: Config, server: ApiServer, triggered: list[str]):
        self.cfg, self.server, self.triggered = cfg, server, triggered
        self.url = server.url + "/continue/devdata"
        self.token, _ = auth.issue(cfg.state_dir, "alice@example.com")  # what alice's editor sends

    def post(self, body: dict[str, Any] | bytes, token: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        auth = {"Authorization": f"Bearer {self.token if token is None else token}"} if token != "" else {}
        req = urllib.request.Request(self.url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **auth, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def collect(self) -> tuple[dict[str, Any], Path]:
        store = Store.open(self.cfg.state_dir / "store.duckdb")
        try:
            return {**jobs.collect(store, self.cfg), "status": jobs.status(store, self.cfg)}, store.path
        finally:
            store.close()


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[Destination]:
    setup = write_config(tmp_path / "site", [{"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice",
                                              "developer": "alice@example.com"}],
                         overrides={"continue_http": {"enabled": True, "max_body_bytes": 64 * 1024}},
                         developers=[{"id": "alice@example.com"}])
    cfg = load_config(setup.config)
    triggered: list[str] = []
    server = ApiServer("127.0.0.1", 0, "api-token", {}, {}, inbound=_inbound(cfg, triggered.append)).start()
    try:
        yield Destination(cfg, server, triggered)
    finally:
        server.stop()


def body(name: str, data: dict[str, Any], schema: str = "0.2.0", level: str = "all") -> dict[str, Any]:
    return {"name": name, "data": data, "schema": schema, "level": level, "profileId": "local"}


def test_replayed_bodies_are_stored_once_alongside_the_files(destination: Destination, tmp_path: Path) -> None:
    a = autocomplete_event(completionId="a", accepted=True)
    b = autocomplete_event(completionId="b", accepted=False)
    edit = continue_event("editOutcome")
    continue_log(tmp_path / "alice", [a, b])
    write_lines(tmp_path / "alice" / "dev_data" / "0.2.0" / "editOutcome.jsonl", [edit])
    no_code = ("prefix", "suffix", "prompt", "completion")
    carol, _ = auth.issue(destination.cfg.state_dir, "carol@example.com")
    replies = [
        destination.post(body("autocomplete", a)),  # also in the file
        destination.post(body("autocomplete", {k: v for k, v in b.items() if k not in no_code}, level="noCode")),
        destination.post(body("autocomplete", {k: v for k, v in autocomplete_event(completionId="c").items()
                                               if k not in no_code}, level="noCode"), token=carol),
        # schema 0.1.0: no base fields, so no timestamp: the time of receipt stands in
        destination.post(body("autocomplete", {k: v for k, v in autocomplete_event(completionId="d").items()
                                               if k not in ("eventName", "schema", "timestamp", "userId",
                                                            "userAgent", "selectedProfileId")}, schema="0.1.0")),
        # the same edit as the file's: Continue stamps each copy separately, a few ms apart
        destination.post(body("editOutcome", edit | {"timestamp": "2026-10-01T09:05:00.004Z"})),
    ]
    assert [r[0] for r in replies] == [200] * 5 and all(r[1]["stored"] for r in replies)
    ignored = destination.post(body("tokensGenerated", {"model": "qwen", "promptTokens": 3}))
    assert ignored == (200, {"stored": False, "reason": "devtune does not keep tokensGenerated events"})
    assert set(destination.triggered) == {"continue-http"}  # each stored POST asks for a collect

    result, db = destination.collect()
    assert result["error"] is None and result["status"]["quarantined"]["total"] == 0
    rows = {r[0]: r for r in table_rows(db, "suggestions")}
    assert set(rows) == {"a", "b", "c", "d"}
    # id, source, ..., developer(5), ..., prefix(12), prefix_compiled, prefix_recovery, suffix, completion(16)
    assert rows["b"][12] == b["prefix"] and rows["b"][16] == b["completion"]  # the file's copy filled the text
    assert rows["c"][12] is None and rows["c"][14] == "no_code" and rows["c"][5] == "carol@example.com"
    assert rows["d"][16] == autocomplete_event()["completion"]
    assert len(table_rows(db, "edit_outcomes")) == 1


def test_wrong_or_missing_token_is_401_and_nothing_is_kept(destination: Destination) -> None:
    event = body("autocomplete", autocomplete_event())
    assert destination.post(event, token="wrong")[0] == 401
    assert destination.post(event, token="")[0] == 401
    assert not list(inbox_dir(destination.cfg.state_dir).iterdir())
    result, _ = destination.collect()
    assert result["status"]["suggestions"]["total"] == 0


def test_oversized_and_malformed_bodies_are_refused(destination: Destination) -> None:
    big = body("autocomplete", autocomplete_event(prefix="x" * 70_000))
    status, reply = destination.post(big)
    assert status == 413 and "over the 65536-byte limit" in reply["error"]
    status, reply = destination.post(b"{not json")
    assert status == 400 and "not JSON" in reply["error"]
    status, reply = destination.post({"name": "autocomplete", "data": {}, "schema": "9.9.9"})
    assert status == 400 and "schema '9.9.9'" in reply["error"]
    assert not list(inbox_dir(destination.cfg.state_dir).iterdir())


def test_a_body_that_fails_the_event_schema_is_quarantined_not_lost(destination: Destination) -> None:
    status, _ = destination.post(body("autocomplete", autocomplete_event(accepted="yes")))
    assert status == 200  # Continue never retries: keep it, and say why it could not be used
    result, db = destination.collect()
    (row,) = table_rows(db, "quarantine")
    assert row[0] == "continue-http" and "field 'accepted' must be a boolean, got string" in row[5]
    assert result["status"]["suggestions"]["total"] == 0


def test_a_token_writes_as_its_developer_whatever_the_headers_say(destination: Destination) -> None:
    mallory, record = auth.issue(destination.cfg.state_dir, "mallory@example.com")
    # Neither a header nor Continue's own userId in the body can name someone else.
    forged = body("autocomplete", autocomplete_event(completionId="forged", userId="alice@example.com"))
    assert destination.post(forged, token=mallory, headers={"X-Developer": "alice@example.com"})[0] == 200
    _, db = destination.collect()
    (row,) = [r for r in table_rows(db, "suggestions") if r[0] == "forged"]
    assert row[5] == "mallory@example.com"  # the token's owner, not the header's claim
    auth.revoke(destination.cfg.state_dir, record.id)
    assert destination.post(body("autocomplete", autocomplete_event(completionId="late")), token=mallory)[0] == 401


def test_the_team_wide_token_works_only_when_configured(tmp_path: Path) -> None:
    def serve(shared: bool) -> tuple[Config, ApiServer]:
        site = tmp_path / ("shared" if shared else "own")
        cfg = load_config(write_config(site, [], overrides={"continue_http": {"enabled": True,
                                                                              "shared_token": shared}}).config)
        return cfg, ApiServer("127.0.0.1", 0, "api-token", {}, {}, inbound=_inbound(cfg, lambda _: None)).start()

    cfg, server = serve(shared=False)
    try:
        assert not http_token_file(cfg).exists()  # no team-wide token is even made
        status, _ = Destination(cfg, server, []).post(body("autocomplete", autocomplete_event()), token="anything")
        assert status == 401
    finally:
        server.stop()
    cfg, server = serve(shared=True)
    try:
        team_token = http_token_file(cfg).read_text().strip()
        post = Destination(cfg, server, [])
        event = body("autocomplete", autocomplete_event(completionId="shared"))
        assert post.post(event, token=team_token, headers={"X-Developer": "bob@example.com"})[0] == 200
        _, db = post.collect()
        assert [r[5] for r in table_rows(db, "suggestions")] == ["bob@example.com"]
    finally:
        server.stop()

"""The serving gateway on 127.0.0.1 with the builtin backend: a real worker child on the tiny model, real
adapters in a real registry, real tokens; requests as Continue sends them, then the request log collected."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon import auth, jobs
from daemon.config import gateway_dir, load_config
from daemon.gateway import Gateway, start_gateway
from pipelines.child import free_port
from pipelines.config import Config
from pipelines.publish import registry
from pipelines.publish.names import served_name
from pipelines.store.db import Store
from runs import random_adapter
from support import ROOT, all_text, read_jsonl, run_devtune, write_config

PREFIX = "def settle_invoice_7f3a(amount):\n"  # a marker no table may hold: the log keeps no code
SUFFIX = "\n\nprint('done')\n"
PROMPT = f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>"


@dataclass
class Site:
    cfg: Config
    gateway: Gateway
    tokens: dict[str, str]  # developer -> token
    adapters: Path  # random adapters of the tiny model, by seed
    base_model: Path

    def post(self, body: dict[str, Any], token: str | None = None, developer: str = "alice@example.com"
             ) -> tuple[int, dict[str, str], Any]:
        """A completion as Continue's openai provider sends it; (status, headers, JSON or SSE payloads)."""
        host, port = self.gateway.httpd.server_address[:2]
        conn = http.client.HTTPConnection(str(host), port, timeout=120)
        headers = {"Content-Type": "application/json"}
        key = self.tokens[developer] if token is None else token
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        found = {k.lower(): v for k, v in resp.getheaders()}
        if found.get("content-type") == "text/event-stream":
            return resp.status, found, sse(raw)
        return resp.status, found, json.loads(raw)

    def complete(self, developer: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
        return self.post({"model": "devtune", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **extra},
                         developer=developer)

    def promote_new(self, scope: str, seed: int) -> str:
        adapter = random_adapter(self.base_model, self.adapters / f"seed{seed}", seed)
        version = registry.register(self.cfg.state_dir, scope, adapter, {"base_model": str(self.base_model)})
        registry.promote(self.cfg.state_dir, scope, version)
        return version


def sse(raw: bytes) -> list[Any]:
    """The `data:` payloads of an event stream, in order; "[DONE]" as the string."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("gateway")
    setup = write_config(tmp, [], teams=[{"name": "payments", "members": ["alice@example.com", "bob@example.com"]}],
                         overrides={"": {"base_model": str(tiny_model)},
                                    "serve": {"enabled": True, "port": 0, "device": "cpu", "batch_window_ms": 5.0}})
    cfg = load_config(setup.config)
    tokens = {d: auth.issue(cfg.state_dir, d)[0] for d in ("alice@example.com", "bob@example.com", "carol@example.com")}
    s = Site(cfg, None, tokens, tmp / "adapters", tiny_model)  # type: ignore[arg-type]
    s.promote_new("team:payments", seed=1)
    s.promote_new("dev:alice@example.com", seed=2)
    s.gateway = start_gateway(cfg, port=0)
    try:
        yield s
    finally:
        s.gateway.stop()


def test_plain_and_streamed_completions_answer_with_the_callers_adapter(site: Site) -> None:
    status, headers, body = site.complete("alice@example.com")
    assert status == 200, body
    assert headers["x-devtune-adapter"] == "dev:alice@example.com/v0001"
    assert body["object"] == "text_completion" and body["model"] == "devtune" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["text"] and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] > 5 and 0 < body["usage"]["completion_tokens"] <= 12

    status, headers, events = site.complete("alice@example.com", stream=True, stream_options={"include_usage": True})
    assert status == 200 and headers["x-devtune-adapter"] == "dev:alice@example.com/v0001"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == choice["text"]  # greedy: the same completion, token by token
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == choice["finish_reason"]
    assert chunks[-1]["usage"] == body["usage"]

    # prompt + suffix is rendered with the base family's FIM tokens: the same prompt as Continue's template.
    status, _, split = site.post({"model": "devtune", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12,
                                  "temperature": 0})
    assert status == 200 and split["choices"][0]["text"] == choice["text"]


def test_a_developer_without_an_own_adapter_gets_the_teams_and_others_the_base(site: Site) -> None:
    status, headers, bob = site.complete("bob@example.com")
    assert status == 200 and headers["x-devtune-adapter"] == "team:payments/v0001"
    status, headers, carol = site.complete("carol@example.com")  # in no team: default team, which serves nothing
    assert status == 200 and headers["x-devtune-adapter"] == "base"
    status, _, alice = site.complete("alice@example.com")
    texts = {bob["choices"][0]["text"], carol["choices"][0]["text"], alice["choices"][0]["text"]}
    assert len(texts) == 3  # three different models answered the same prompt


def test_a_wrong_missing_or_revoked_token_gets_401(site: Site) -> None:
    log_before = _log_lines(site)
    for token in ("dt_not-a-real-token", "", "not even the prefix"):
        status, headers, body = site.post({"model": "devtune", "prompt": PROMPT}, token=token)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert headers["www-authenticate"] == "Bearer"
    token, record = auth.issue(site.cfg.state_dir, "dave@example.com")
    assert site.post({"model": "devtune", "prompt": PROMPT, "max_tokens": 2}, token=token)[0] == 200
    auth.revoke(site.cfg.state_dir, record.id)
    assert site.post({"model": "devtune", "prompt": PROMPT}, token=token)[0] == 401
    assert len(_log_lines(site)) == len(log_before) + 1  # refused callers are nobody: only dave's answer is logged


def test_models_and_bad_requests(site: Site) -> None:
    host, port = site.gateway.httpd.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=30)
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {site.tokens['bob@example.com']}"})
    resp = conn.getresponse()
    assert resp.status == 200 and [m["id"] for m in json.loads(resp.read())["data"]] == ["devtune"]
    conn.close()
    assert site.post({"model": "gpt-4", "prompt": PROMPT})[0] == 404
    assert site.post({"model": "devtune", "prompt": PROMPT, "n": 2})[0] == 400
    assert site.post({"model": "devtune", "prompt": ""})[0] == 400
    status, _, body = site.post({"model": "devtune", "prompt": PROMPT, "max_tokens": 3, "stop": ["\n", "x"]})
    assert status == 200 and "\n" not in body["choices"][0]["text"]


def test_a_promotion_during_traffic_switches_the_header_and_fails_no_request(site: Site) -> None:
    seen: dict[int, list[str]] = {}
    failures: list[str] = []
    stop = threading.Event()

    def editor(worker: int) -> None:
        seen[worker] = []
        while not stop.is_set():
            stream = worker % 2 == 0
            status, headers, body = site.complete("bob@example.com", stream=stream, max_tokens=4)
            if status != 200 or (stream and body[-1] != "[DONE]"):
                failures.append(f"{status} {body}")
            seen[worker].append(headers.get("x-devtune-adapter", "?"))

    threads = [threading.Thread(target=editor, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    version = site.promote_new("team:payments", seed=3)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert failures == []
    assert version == "v0002"
    for labels in seen.values():
        assert labels[0] == "team:payments/v0001" and labels[-1] == "team:payments/v0002", labels
        switched = labels.index("team:payments/v0002")
        assert set(labels[switched:]) == {"team:payments/v0002"}  # each editor's requests switch once, for good
    worker_log = (gateway_dir(site.cfg.state_dir) / "worker.log").read_text()
    assert worker_log.count("loaded adapter devtune-team-payments-v0002 ") == 1  # loaded once, on first use


def test_the_request_log_is_collected_with_who_what_and_when_but_no_code(site: Site) -> None:
    site.complete("carol@example.com")
    lines = _log_lines(site)
    assert lines and {"developer", "scope", "version", "received_at", "latency_ms", "prompt_tokens"} <= set(lines[0])
    store = Store.open(site.cfg.state_dir / "store.duckdb")
    try:
        result = jobs.collect(store, site.cfg)
        assert result["error"] is None
        assert result["sources"][-1]["source"] == "gateway"
        rows = store.con.execute("SELECT developer, scope, version, served_name, status, prompt_tokens, "
                                 "completion_tokens, latency_ms FROM gateway_requests").fetchall()
        assert len(rows) == len(lines)
        by = {(r[0], r[1], r[2]) for r in rows}
        assert ("alice@example.com", "dev:alice@example.com", "v0001") in by
        assert ("bob@example.com", "team:payments", "v0002") in by and ("carol@example.com", None, None) in by
        ok = [r for r in rows if r[4] == 200]
        assert all(r[5] > 0 and r[7] > 0 for r in ok)
        assert {r[3] for r in rows if r[0] == "alice@example.com" and r[4] == 200} == \
            {served_name("dev:alice@example.com", "v0001")}
        status = jobs.status(store, site.cfg)
        assert status["gateway"]["by_adapter"]["team:payments/v0002"]["requests"] >= 4
        assert jobs.collect(store, site.cfg)["sources"][-1]["stored"].get("gateway_requests", 0) == 0
    finally:
        store.close()
    assert "settle_invoice_7f3a" not in all_text(site.cfg.state_dir / "store.duckdb")
    assert "settle_invoice_7f3a" not in "".join(p.read_text() for p in gateway_dir(site.cfg.state_dir).glob("req*"))


def _log_lines(site: Site) -> list[dict[str, Any]]:
    assert site.gateway.wait_idle(30)  # a request's line is appended right after its answer is sent
    return [line for p in sorted(gateway_dir(site.cfg.state_dir).glob("requests-*.jsonl")) for line in read_jsonl(p)]


def test_a_request_line_that_is_not_one_is_quarantined_not_stored() -> None:
    from collectors.gateway_log import parse_line

    assert "lacks" in str(parse_line(b'{"key": "cmpl-1"}'))
    assert "not JSON" in str(parse_line(b"{"))


def test_devtune_run_serves_completions_collects_their_log_and_stops_its_worker(tmp_path: Path,
                                                                                tiny_model: Path) -> None:
    port = free_port()
    setup = write_config(tmp_path, [], overrides={
        "": {"base_model": str(tiny_model)}, "schedule": {"cycle_cron": "0 3 1 1 *"},
        "collect": {"interval_s": 3600.0}, "serve": {"enabled": True, "port": port, "device": "cpu"}})
    token, _ = auth.issue(setup.state_dir, "alice@example.com")
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(setup.config), "run"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = json.dumps({"model": "devtune", "prompt": PROMPT, "max_tokens": 4}).encode()
        deadline = time.monotonic() + 120
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body, method="POST",
                                             headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    assert resp.status == 200 and resp.headers["X-Devtune-Adapter"] == "base"
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and proc.poll() is None, "the gateway did not come up"
                time.sleep(0.5)
        collect = run_devtune("--config", str(setup.config), "collect", "--json")  # through the service's API
        assert collect.returncode == 0, collect.stderr
        stored = {r["source"]: r["stored"] for r in json.loads(collect.stdout)["sources"]}
        assert stored["gateway"].get("gateway_requests") == 1
        worker_log = (gateway_dir(setup.state_dir) / "worker.log").read_text()
        worker_pid = int(re.search(r"\(pid (\d+),", worker_log).group(1))  # type: ignore[union-attr]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(ProcessLookupError):  # the worker went with the service
            for _ in range(100):
                os.kill(worker_pid, 0)
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_forgetting_a_developer_removes_their_served_requests_and_log_lines(tmp_path: Path) -> None:
    from datetime import datetime

    from collectors.base import GatewayRequest
    from collectors.gateway_log import append_request
    from pipelines.forget import forget

    team = {"name": "payments", "members": ["alice@example.com", "bob@example.com"]}
    setup = write_config(tmp_path, [], teams=[team], overrides={"serve": {"enabled": True}})
    cfg = load_config(setup.config)
    folder = gateway_dir(cfg.state_dir)
    for i, developer in enumerate(["alice@example.com", "bob@example.com", "alice@example.com"]):
        append_request(folder, GatewayRequest(
            key=f"cmpl-{i}", received_at=datetime(2026, 12, 1, 9, 0, i), developer=developer, team="payments",
            scope=f"dev:{developer}", version="v0001", served_name="x", model="devtune", backend="builtin",
            stream=False, status=200, latency_ms=10.0, first_token_ms=5.0, prompt_tokens=9, completion_tokens=4,
            finish_reason="stop", error=None))
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        assert jobs.collect(store, cfg)["sources"][-1]["stored"]["gateway_requests"] == 3
        forget(store, cfg, "alice@example.com")
        developers = [r[0] for r in store.con.execute("SELECT developer FROM gateway_requests").fetchall()]
        assert developers == ["bob@example.com"]
        assert jobs.collect(store, cfg)["sources"][-1]["stored"].get("gateway_requests", 0) == 0
    finally:
        store.close()
    text = "".join(p.read_text() for p in folder.glob("requests-*.jsonl"))
    assert "alice" not in text and "bob@example.com" in text  # her lines blanked in place, his kept

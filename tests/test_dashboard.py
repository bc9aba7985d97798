"""The team lead's view: the dashboard in a real browser (Debian's Chromium, headless, through chromedriver),
Prometheus /metrics over real HTTP, retraining on new data, and one log line for developers who wait.

The site behind the pages is real: events collected from Continue logs (with a malformed line and a secret),
a tiny run trained and evaluated by the real stage processes (its train.log is what the loss plot reads), a
canary decided by simulated editing, a developer forgotten through `forget`.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import jobs
from daemon.api import ApiServer
from daemon.config import load_config
from daemon.web.dashboard import COOKIE, Dashboard, build_dashboard
from daemon.web.pages import loss_curve
from pipelines.config import Config
from pipelines.evaluate.gate import EvalReport, gate
from pipelines.files import read_json
from pipelines.publish import registry
from pipelines.store import series
from pipelines.store.db import Store, now
from pipelines.train import backends
from runs import fim_rows, make_run, train_config
from support import ROOT, autocomplete_event, continue_log, store_suggestions, tabby_suggestion, write_config

TEAM = [f"dev{i:02d}@example.com" for i in range(8)]
FORGOTTEN = "dev07@example.com"
SECRET = "ghp_" + "Z8k2Lq9Vx4Rt7Mn1Bc6Hy3Jw5Pd0Fs2Ga8Ke"
SCREENSHOTS = ROOT / "test-output" / "dashboard"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@dataclass
class Lead:
    cfg: Config
    store: Store
    url: str
    token: str
    run_id: str
    run_dir: Path


@pytest.fixture(scope="module")
def lead(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, strong_run: Path) -> Iterator[Lead]:
    root = tmp_path_factory.mktemp("lead")
    at = now()
    # Continue logs of two developers over the last three days: a malformed line and a token in a completion.
    for d in range(2):
        lines: list[Any] = [autocomplete_event(
            timestamp=(at - timedelta(days=i % 3, minutes=i)).isoformat(timespec="milliseconds") + "Z",
            accepted=i % 3 != 0, completion=f"    return a + {i}\n" if i != 4 else f"    token = '{SECRET}'\n")
            for i in range(12)]
        lines.insert(5, "{not json")
        continue_log(root / f"continue-{d}", lines)
    setup = write_config(root / "site", [
        {"kind": "continue", "path": str(root / f"continue-{d}"), "name": f"continue-{d}", "developer": TEAM[d]}
        for d in range(2)], teams=[{"name": "payments", "members": TEAM}],
        overrides={"": {"base_model": str(tiny_model)}, "online": {"min_shown": 400, "min_linked": 100000,
                                                                   "canary_share": 0.5}})
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    jobs.collect(store, cfg)

    # A run as the cycle makes one: trained and evaluated by the real stage processes, gated, recorded.
    run_id = "20261204-090000-team-payments-0001"
    run_dir = make_run(cfg.state_dir / "runs" / run_id, tiny_model, train_config(max_steps=12),
                       {"sft.jsonl": fim_rows(48, seed=0), "heldout.jsonl": fim_rows(16, seed=2, start_day=25)})
    backends.run_stage("train", run_dir, cfg.train, cfg.ray, 600)
    backends.run_stage("evaluate", run_dir, cfg.train, cfg.ray, 600)
    report = EvalReport.load(run_dir / "eval.json")
    decision = gate(report, cfg.gate)
    store.start_run(run_id, "team:payments")
    store.update_run(run_id, status="succeeded", stage="done",
                     summary={"train": read_json(run_dir / "train.json"), "eval": report.as_dict(),
                              "gate": decision.as_dict(), "version": "v0001"})

    # v0001 served, v0002 on a canary that editing decides (its arm accepts less: rolled back).
    v1 = registry.register(cfg.state_dir, "team:payments", strong_run / "adapter",
                           {"base_model": str(tiny_model), "run_id": run_id})
    registry.promote(cfg.state_dir, "team:payments", v1)
    v2 = registry.register(cfg.state_dir, "team:payments", strong_run / "adapter", {"base_model": str(tiny_model)})
    registry.start_canary(cfg.state_dir, "team:payments", v2, 0.5, "gate passed")
    started = registry.canary(cfg.state_dir, "team:payments")
    assert started is not None
    arm = [d for d in TEAM if registry.in_canary(d, v2, 0.5)]
    assert 0 < len(arm) < len(TEAM)
    begun = datetime.fromisoformat(started.started_at)
    rows = []
    # 400 each: either arm has the 400 ([online] min_shown) a verdict needs. A millisecond apart, not a second:
    # shown after the canary began, they lie ahead of the clock, and 400 s ahead crossed midnight in CI
    # (the overview's days end today, so 189 of them were missing from its chart).
    for developer in TEAM:
        rate = 0.15 if developer in arm else 0.35
        for i in range(400):
            rows.append(tabby_suggestion(
                id=f"{developer}-{i}", developer=developer, team="payments", model="devtune", accepted=i < rate * 400,
                shown_at=begun + timedelta(milliseconds=1 + i), completion=f"    return x + {i}\n", ingested_at=now()))
    store_suggestions(store, rows)
    decided = jobs.collect(store, cfg)["online"]
    assert [d["action"] for d in decided] == ["rolled_back"], decided
    jobs.forget_developer(store, cfg, FORGOTTEN)

    token = "t0ken-" + "x" * 40
    api = ApiServer("127.0.0.1", 0, token, {}, {}, web=build_dashboard(store, cfg, token)).start()
    try:
        yield Lead(cfg, store, api.url, token, run_id, run_dir)
    finally:
        api.stop()
        store.close()


def fetch(url: str, token: str | None = None, data: bytes | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {token}"} if token else {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


# -- the browser -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are missing: .ci/run installs Debian's chromium and "
                        "chromium-driver")
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver (as .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags keep a headless Chromium from reaching out: this machine has no network beyond loopback.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def points(driver: Any, caption: str) -> list[dict[str, str]]:
    """The data points of the chart captioned `caption`: series, x, y of every drawn point."""
    return list(driver.execute_script("""
        const fig = [...document.querySelectorAll('figure.chart')]
            .find(f => f.querySelector('figcaption')?.textContent.startsWith(arguments[0]));
        if (!fig) return null;
        return [...fig.querySelectorAll('.pt')].map(p => ({series: p.dataset.series, x: p.dataset.x, y: p.dataset.y}));
    """, caption) or [])


def screenshot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1400, max(900, min(int(height) + 40, 6000)))
    assert driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def test_the_dashboard_in_chromium(lead: Lead, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    # Not logged in: the dashboard sends the browser to the login page.
    browser.get(lead.url + "/dashboard/runs")
    assert browser.current_url.startswith(lead.url + "/login")
    screenshot(browser, "login")
    # A wrong token is refused, with no cookie.
    browser.find_element(By.NAME, "token").send_keys("not-the-token")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.ID, "error"))
    assert "not the service's API token" in browser.find_element(By.ID, "error").text
    assert browser.get_cookies() == []
    browser.get(lead.url + "/dashboard")
    assert browser.current_url.startswith(lead.url + "/login")
    # The right one logs in, back to the page asked for, with an HttpOnly cookie no script can read.
    browser.get(lead.url + "/dashboard/runs")
    browser.find_element(By.NAME, "token").send_keys(lead.token)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 30).until(lambda d: d.current_url == lead.url + "/dashboard/runs")
    (cookie,) = browser.get_cookies()
    assert cookie["name"] == COOKIE and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""

    # Runs: held-out loss of the run as eval.json has it, and its loss curve as train.log has it.
    heldout = {p["series"]: float(p["y"]) for p in points(browser, "team:payments: held-out loss")}
    report = EvalReport.load(lead.run_dir / "eval.json").as_dict()
    assert heldout["base"] == pytest.approx(report["base"]["heldout_loss"], rel=1e-5)
    assert heldout["candidate"] == pytest.approx(report["candidate"]["heldout_loss"], rel=1e-5)
    curve = points(browser, f"team:payments {lead.run_id}: training loss")
    steps = loss_curve(lead.run_dir / "train.log")
    assert len(curve) == sum(len(v) for v in steps.values()) == 12
    decisions = browser.find_element(By.ID, "decisions").text
    assert "canary_end rolled_back v0002" in decisions and "gate" in decisions
    assert points(browser, "Decisions per day")
    screenshot(browser, "runs")

    # Overview: every event plot has points, and they add up to what the store holds.
    browser.get(lead.url + "/dashboard")
    by_source = points(browser, "Events per day by source")
    events = lead.store.con.execute(
        "SELECT count(*) FROM suggestions WHERE shown_at >= ?", [series.since(30)]).fetchone()
    assert events is not None and sum(float(p["y"]) for p in by_source) == events[0]
    assert {p["series"] for p in by_source} >= {"continue-0", "continue-1"}
    assert sum(float(p["y"]) for p in points(browser, "Events per day by developer")) == events[0]
    quarantined = points(browser, "Lines quarantined per day")
    assert sum(float(p["y"]) for p in quarantined) == 2  # one malformed line per log
    assert any(p["series"] == "scrubbed" for p in points(browser, "Secrets scrubbed"))
    acceptance = points(browser, "Acceptance per day by served version")
    assert {"team:payments/v0001", "team:payments/v0002"} <= {p["series"] for p in acceptance}
    assert SECRET not in browser.page_source
    screenshot(browser, "overview")

    # Developers: who uses what, the forgotten one counted and never named.
    browser.get(lead.url + "/dashboard/developers")
    table = browser.find_element(By.ID, "developers").text
    assert TEAM[0] in table and "team:payments" in table
    assert FORGOTTEN not in browser.page_source
    privacy = browser.find_element(By.ID, "privacy").text
    assert "1\npeople forgotten" in privacy
    assert points(browser, "Stored data per developer")
    screenshot(browser, "developers")

    shots = {p.name: p.stat().st_size for p in SCREENSHOTS.glob("*.png")}  # kept for a reader of the test output
    assert set(shots) >= {"login.png", "overview.png", "runs.png", "developers.png"} and min(shots.values()) > 5_000

    browser.get(lead.url + "/logout")
    browser.get(lead.url + "/dashboard")
    assert browser.current_url.startswith(lead.url + "/login")


# -- access without a browser ----------------------------------------------------------------------------------

def test_a_forged_or_expired_session_and_an_outside_redirect_are_refused(lead: Lead) -> None:
    status, headers, _ = fetch(lead.url + "/dashboard")
    assert status == 303 and headers["Location"].startswith("/login")
    for forged in ("9999999999.00", "abc", f"{int(time.time()) + 3600}." + "0" * 64):
        request = urllib.request.Request(lead.url + "/dashboard", headers={"Cookie": f"{COOKIE}={forged}"})
        with pytest.raises(urllib.error.HTTPError) as redirected:  # urllib follows to /login... which is 200
            urllib.request.build_opener(_Refuse).open(request, timeout=30)
        assert redirected.value.code == 303
    clock = [time.time()]
    dash = Dashboard(lead.token, {}, lambda: b"", "text/plain", clock=lambda: clock[0])
    session = dash.session()
    assert dash.valid_session(session)
    clock[0] += 13 * 3600  # past the 12-hour session
    assert not dash.valid_session(session)
    assert not Dashboard("another-token", {}, lambda: b"", "text/plain").valid_session(session)
    # After logging in, only a dashboard page is a destination: never another site.
    status, headers, _ = fetch(lead.url + "/login", data=f"token={lead.token}&next=https://evil.example/".encode())
    assert status == 303 and headers["Location"] == "/dashboard" and "HttpOnly" in headers["Set-Cookie"]
    status, _, body = fetch(lead.url + "/login", data=b"token=wrong")
    assert status == 401 and "That is not the service" in body


class _Refuse(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def test_metrics_for_prometheus(lead: Lead) -> None:
    status, _, _ = fetch(lead.url + "/metrics")
    assert status == 401
    status, headers, text = fetch(lead.url + "/metrics", token=lead.token)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    store = lead.store
    for (source, kind), n in series.ingested_by_source(store).items():
        assert value("devtune_events_ingested_total", source=source, kind=kind) == n
    assert value("devtune_events_quarantined_total", source="continue-0") == 1
    scrubbed = store.counts()["scrubbed"]
    assert scrubbed and all(value("devtune_secrets_scrubbed_total", kind=k) == n for k, n in scrubbed.items())
    assert value("devtune_runs_total", scope_kind="team", status="succeeded") == 1
    assert value("devtune_served_version", scope="team:payments", version="v0001") == 1
    assert value("devtune_field_decisions_total", decision="canary_end", outcome="rolled_back") == 1
    online = jobs.status(store, lead.cfg)["online"]["team:payments"]["v0001"]
    assert value("devtune_online_acceptance", scope="team:payments", version="v0001") == \
        pytest.approx(online["acceptance"])
    assert value("devtune_training_tokens_per_second", scope="team:payments") > 0
    assert value("devtune_gateway_latency_seconds_count") == 0  # no gateway in this site
    assert ("process_resident_memory_bytes", ()) in samples


# -- retraining on new data, and a quiet log ---------------------------------------------------------------------

def test_a_team_retrains_once_enough_new_suggestions_are_accepted(tmp_path: Path) -> None:
    setup = write_config(tmp_path / "site", [], teams=[{"name": "payments", "members": TEAM[:2]}],
                         overrides={"schedule": {"retrain_after_accepted": 30, "min_retrain_interval_h": 6}})
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        def accepted(n: int, tag: str) -> None:
            store_suggestions(store, [tabby_suggestion(id=f"{tag}-{i}", developer=TEAM[i % 2], team="payments",
                                                       accepted=True, ingested_at=now()) for i in range(n)])

        accepted(29, "a")
        assert jobs.due_retrains(store, cfg) == []  # 29 < 30
        accepted(1, "b")
        assert jobs.due_retrains(store, cfg) == [("payments", 30)]
        store.start_run("r1", "team:payments")  # a run starts: what it saw no longer counts
        accepted(40, "c")
        assert jobs.due_retrains(store, cfg) == []  # 40 new, but the last run started under 6 h ago
        # Seven hours on: the run started 7 h ago, after the first 30 were ingested.
        store.con.execute("UPDATE runs SET started_at = started_at - INTERVAL 7 HOUR")
        store.con.execute("UPDATE suggestions SET ingested_at = ingested_at - INTERVAL 8 HOUR "
                          "WHERE id[1] IN ('a', 'b')")
        assert jobs.due_retrains(store, cfg) == [("payments", 40)]
        off = load_config(write_config(tmp_path / "off", [], teams=[{"name": "payments", "members": TEAM}]).config)
        assert jobs.due_retrains(store, off) == []  # 0 = the cron only
    finally:
        store.close()


def test_developers_waiting_for_their_teams_first_adapter_are_one_log_line(tmp_path: Path, tiny_model: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    setup = write_config(tmp_path / "site", [], teams=[{"name": "payments", "members": TEAM}],
                         overrides={"": {"base_model": str(tiny_model)}})
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        store_suggestions(store, [tabby_suggestion(id=f"s{i}", developer=TEAM[i % len(TEAM)], team="payments")
                                  for i in range(40)])
        caplog.set_level(logging.INFO)
        result = jobs.cycle(store, cfg, "payments")
        assert result["outcome"] == "skipped"  # 40 rows: too few for a team adapter
        assert result["developers"] == [] and result["developers_waiting"]["count"] == len(TEAM)
        waiting = [r.getMessage() for r in caplog.records if "developer adapter(s) wait" in r.getMessage()]
        assert len(waiting) == 1 and "serves no adapter yet" in waiting[0]
        assert not [r for r in caplog.records if "dev:" in r.getMessage() and "skipped" in r.getMessage()]
        assert [r["scope"] for r in store.runs()] == ["team:payments"]  # no run per developer
    finally:
        store.close()

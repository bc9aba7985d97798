"""The dashboard's pages: overview, runs, developers, and the login form. Plain HTML with inline SVG plots
(daemon/web/svg.py) and one small stylesheet; read-only: no page changes anything.

Each page is a function of the store and the config, drawn fresh on every request (a team lead looks once a
day; a page costs a few DuckDB queries, ~20-60 ms on the demo's store).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, timedelta
from html import escape
from pathlib import Path
from typing import Any

from daemon.web import svg
from pipelines.config import Config
from pipelines.publish import registry
from pipelines.store import series
from pipelines.store.db import Store

DAYS = 30  # the window of the per-day plots
MAX_KEYS = 7  # series drawn one by one; the rest are summed into "others" (a plot of 31 colours reads as none)
LOSS_RUNS = 6  # runs whose loss curve the runs page draws
# A progress line of the training loop (pipelines/train/fit.py): "sft 1/2: step 5/30 loss 2.3456 ..."
_STEP = re.compile(r"devtune\.fit: (\w+) (\d+)/(\d+): step (\d+)/(\d+) loss ([0-9.]+|nan|inf)")

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
nav{background:#23395d;padding:10px 20px}nav a{color:#fff;margin-right:18px;text-decoration:none}
nav a.here{font-weight:bold;text-decoration:underline}
main{padding:16px 20px;max-width:1400px}h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:22px 0 6px}
.tiles{display:flex;flex-wrap:wrap;gap:10px}
.tile{background:#fff;border:1px solid #ddd;padding:8px 14px;min-width:110px}
.tile b{display:block;font-size:20px}.grid{display:flex;flex-wrap:wrap;gap:14px}
figure.chart{background:#fff;border:1px solid #ddd;margin:0;padding:6px}figcaption{font-weight:600;margin:2px 4px}
.nodata{color:#888;width:640px;margin:40px 8px}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right}.bad{color:#b00020}.good{color:#006b3c}.muted{color:#777}
form.login{background:#fff;border:1px solid #ddd;padding:20px;width:380px;margin:60px auto}
form.login input[type=password]{width:100%;padding:6px;margin:8px 0}
"""
PAGES = (("overview", "/dashboard", "Overview"), ("runs", "/dashboard/runs", "Runs"),
         ("developers", "/dashboard/developers", "Developers"))


def layout(here: str, title: str, body: str) -> str:
    links = "".join(f'<a href="{href}"{" class=here" if name == here else ""}>{label}</a>'
                    for name, href, label in PAGES)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>devtune: {escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><nav>{links}<a href=/logout>Log out</a></nav>"
            f"<main id={here}><h1>{escape(title)}</h1>{body}</main></body></html>")


def login_page(error: str = "", next_path: str = "/dashboard") -> str:
    message = f'<p class="bad" id="error">{escape(error)}</p>' if error else ""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>devtune: log in</title>"
            f"<style>{STYLE}</style></head><body><form class=login method=post action=/login>"
            "<h1>devtune dashboard</h1><p>The service's API token: <code>api.token</code> in its state directory "
            "(<code>sudo cat /var/lib/devtune/api.token</code> on a packaged install).</p>"
            f'{message}<input type=password name=token autocomplete=current-password autofocus required>'
            f'<input type=hidden name=next value="{escape(next_path)}"><button type=submit>Log in</button></form>'
            "</body></html>")


# -- overview --------------------------------------------------------------------------------------------------

def overview(store: Store, cfg: Config, report: Mapping[str, Any]) -> str:
    first = series.since(DAYS)
    days = [first + timedelta(days=i) for i in range(DAYS)]
    counts = report
    tiles = [("suggestions", counts["suggestions"]["total"]), ("accepted", counts["suggestions"]["accepted"]),
             ("commits", counts["commits"]["total"]), ("edit outcomes", counts["edit_outcomes"]["total"]),
             ("quarantined", counts["quarantined"]["total"]),
             ("secrets scrubbed", sum(counts["scrubbed"].values())), ("served versions", len(counts["served"]))]
    body = ['<div class="tiles">' + "".join(f'<div class="tile"><b>{v:,}</b>{escape(k)}</div>' for k, v in tiles)
            + "</div>", '<h2>Data</h2><div class="grid">']
    for by in ("source", "developer"):
        rows = series.events_per_day(store, by, first)
        body.append(svg.bar_chart([d.strftime("%m-%d") for d in days], _per_day(rows, days),
                                  title=f"Events per day by {by} (last {DAYS} days)"))
    quarantined = series.quarantined_per_day(store, first)
    body.append(svg.bar_chart([d.strftime("%m-%d") for d in days], _per_day(quarantined, days),
                              title="Lines quarantined per day by source"))
    scrubbed = counts["scrubbed"]
    kinds = sorted(scrubbed, key=lambda k: -scrubbed[k])[:12]
    body.append(svg.bar_chart(kinds, {"scrubbed": [float(scrubbed[k]) for k in kinds]},
                              title="Secrets scrubbed before storage, by kind"))
    body.append("</div><h2>In the field</h2><div class=grid>")
    rates = series.acceptance_per_day(store, first)
    body.append(svg.line_chart(_acceptance(rates, days), x_labels=_day_labels(days), x_range=(0, len(days) - 1),
                               y_format="{:.0%}", y_from_zero=True, title="Acceptance per day by served version"))
    body.append("</div>")
    body.append(_field_table(report.get("online", {})))
    body.append(_sources_table(report.get("sources", {})))
    return layout("overview", "Overview", "".join(body))


def _per_day(rows: Iterable[series.DayCount], days: Sequence[date]) -> dict[str, list[float]]:
    """{key: [count per day]} for the `MAX_KEYS` largest keys, the rest summed as "others"."""
    index = {d: i for i, d in enumerate(days)}
    by_key: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(days))
    for row in rows:
        if row.day in index:
            by_key[row.key][index[row.day]] += row.count
    ranked = sorted(by_key, key=lambda k: -sum(by_key[k]))
    out = {k: by_key[k] for k in ranked[:MAX_KEYS]}
    if len(ranked) > MAX_KEYS:
        out["others"] = [sum(by_key[k][i] for k in ranked[MAX_KEYS:]) for i in range(len(days))]
    return out


def _acceptance(rates: Iterable[series.DayRate], days: Sequence[date]) -> dict[str, list[svg.Point]]:
    index = {d: i for i, d in enumerate(days)}
    out: dict[str, list[svg.Point]] = defaultdict(list)
    for r in rates:
        if r.day in index and r.shown:
            out[r.key].append((float(index[r.day]), r.accepted / r.shown))
    ranked = sorted(out, key=lambda k: -len(out[k]))[:MAX_KEYS]
    return {k: out[k] for k in sorted(ranked)}


def _day_labels(days: Sequence[date]) -> dict[float, str]:
    return {float(i): d.strftime("%m-%d") for i, d in enumerate(days)}


def _field_table(online: Mapping[str, Any]) -> str:
    rows = []
    for scope, versions in sorted(online.items()):
        for version, m in sorted(versions.items()):
            low, high = m.get("acceptance_low"), m.get("acceptance_high")
            interval = f"{low:.0%}–{high:.0%}" if low is not None and high is not None else ""
            kept = m.get("kept_rate")
            rows.append(f"<tr><td>{escape(scope)}</td><td>{escape(version)}</td><td class=n>{m.get('shown', 0):,}</td>"
                        f"<td class=n>{m.get('accepted', 0):,}</td><td class=n>{_pct(m.get('acceptance'))}</td>"
                        f"<td class=n>{interval}</td><td class=n>{_num(m.get('accepted_chars_per_dev_day'))}</td>"
                        f"<td class=n>{_pct(kept)}</td><td class=n>{m.get('developers', 0)}</td></tr>")
    if not rows:
        return "<p class=muted>No suggestion has been attributed to a served version yet.</p>"
    return ("<table id=field><tr><th>scope</th><th>version</th><th>shown</th><th>accepted</th><th>acceptance</th>"
            "<th>95% interval</th><th>accepted chars per developer-day</th><th>kept</th><th>developers</th></tr>"
            + "".join(rows) + "</table>")


def _sources_table(sources: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{escape(s['kind'])}</td><td>{escape(str(s.get('collected_at') or '-'))}</td>"
        f"<td class=n>{s.get('suggestions', 0):,}</td><td class=n>{s.get('commits', 0):,}</td>"
        f"<td class=n>{s.get('quarantined', 0):,}</td>"
        f"<td class={'bad' if s.get('error') else 'good'}>{escape(s.get('error') or 'ok')}</td></tr>"
        for name, s in sorted(sources.items()))
    return ("<h2>Sources</h2><table id=sources><tr><th>source</th><th>kind</th><th>last collected</th>"
            f"<th>suggestions</th><th>commits</th><th>quarantined</th><th>health</th></tr>{rows}</table>")


# -- runs ------------------------------------------------------------------------------------------------------

def runs(store: Store, cfg: Config, report: Mapping[str, Any]) -> str:
    recent = store.runs(limit=200)
    body = ["<h2>Held-out metrics per run</h2><div class=grid>"]
    by_scope: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in reversed(recent):  # oldest first
        if isinstance(run["summary"].get("eval"), dict):
            by_scope[run["scope"]].append(run)
    for scope in sorted(by_scope, key=lambda s: (not s.startswith("team:"), s))[:6]:
        scored = by_scope[scope]
        labels = {float(i + 1): _short_time(r["started_at"]) for i, r in enumerate(scored)}
        for name, caption in (("heldout_loss", "held-out loss per token"), ("edit_similarity", "edit similarity")):
            lines: dict[str, list[svg.Point]] = defaultdict(list)
            for i, run in enumerate(scored):
                for arm in ("base", "served", "candidate"):
                    value = (run["summary"]["eval"].get(arm) or {}).get(name)
                    if value is not None:
                        lines[arm].append((float(i + 1), float(value)))
            body.append(svg.line_chart(lines, x_labels=labels, title=f"{scope}: {caption}, per run"))
    if not by_scope:
        body.append("<p class=muted>No run has been evaluated yet.</p>")
    body.append("</div><h2>Gate and field decisions over time</h2><div class=grid>")
    decisions = _decisions(recent, cfg.state_dir)
    body.append(_decision_chart(decisions))
    body.append("</div>" + _decision_table(decisions))
    body.append("<h2>Loss curves</h2><div class=grid>")
    drawn = 0
    for run in recent:
        curve = loss_curve(cfg.state_dir / "runs" / run["run_id"] / "train.log")
        if curve and drawn < LOSS_RUNS:
            body.append(svg.line_chart(curve, title=f"{run['scope']} {run['run_id']}: training loss per step"))
            drawn += 1
    if not drawn:
        body.append("<p class=muted>No run has a training log yet.</p>")
    body.append("</div>" + _runs_table(recent[:30]))
    return layout("runs", "Runs", "".join(body))


def loss_curve(train_log: Path) -> dict[str, list[svg.Point]]:
    """{stage: [(step, loss)]} from a run's train.log; a resumed run's repeated steps keep the latest."""
    try:
        text = train_log.read_text(errors="replace")
    except OSError:
        return {}
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    for m in _STEP.finditer(text):
        curves[f"{m[2]}. {m[1]}"][int(m[4])] = float(m[6])
    return {stage: [(float(x), y) for x, y in sorted(points.items())] for stage, points in sorted(curves.items())}


def _decisions(recent: list[dict[str, Any]], state_dir: Path) -> list[dict[str, Any]]:
    """Gate decisions of runs and field events of the registry (canaries, verdicts, rollbacks), newest first."""
    out = []
    for run in recent:
        gate = run["summary"].get("gate")
        if isinstance(gate, dict) and run.get("finished_at"):
            outcome = ("canary" if run["summary"].get("canary") else "promoted") if gate.get("promote") else "kept"
            out.append({"at": str(run["finished_at"]), "scope": run["scope"], "kind": "gate", "outcome": outcome,
                        "version": run["summary"].get("version") or "", "reason": "; ".join(gate.get("reasons", []))})
    root = state_dir / "registry"
    for scope_dir in sorted(root.iterdir()) if root.is_dir() else []:
        for entry in registry.history(state_dir, scope_dir.name) if scope_dir.is_dir() else []:
            action = entry.get("action")
            if action in ("canary_end", "field_verdict", "rollback"):
                out.append({"at": entry.get("at", ""), "scope": scope_dir.name, "kind": action,
                            "outcome": entry.get("outcome", action), "version": entry.get("version") or "",
                            "reason": entry.get("reason", "")})
    return sorted(out, key=lambda d: d["at"], reverse=True)


def _decision_chart(decisions: list[dict[str, Any]]) -> str:
    if not decisions:
        return svg.bar_chart([], {}, title="Decisions per day")
    first = min(date.fromisoformat(d["at"][:10]) for d in decisions)
    last = max(date.fromisoformat(d["at"][:10]) for d in decisions)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)][-DAYS:]
    counted = [series.DayCount(date.fromisoformat(d["at"][:10]), f"{d['kind']}: {d['outcome']}", 1)
               for d in decisions]
    return svg.bar_chart([d.strftime("%m-%d") for d in days], _per_day(counted, days),
                         title="Decisions per day (gate: promoted / canary / kept; field: canary ends, verdicts)")


def _decision_table(decisions: list[dict[str, Any]]) -> str:
    rows = "".join(f"<tr><td>{escape(d['at'][:19])}</td><td>{escape(d['scope'])}</td><td>{escape(d['kind'])}</td>"
                   f"<td>{escape(str(d['outcome']))}</td><td>{escape(d['version'])}</td>"
                   f"<td>{escape(d['reason'][:200])}</td></tr>" for d in decisions[:40])
    return ("<table id=decisions><tr><th>at (UTC)</th><th>scope</th><th>decision</th><th>outcome</th>"
            f"<th>version</th><th>reason</th></tr>{rows}</table>")


def _runs_table(recent: list[dict[str, Any]]) -> str:
    rows = []
    for run in recent:
        ev = run["summary"].get("eval") or {}
        losses = [(ev.get(arm) or {}).get("heldout_loss") for arm in ("base", "served", "candidate")]
        rows.append(f"<tr><td>{escape(run['run_id'])}</td><td>{escape(run['scope'])}</td>"
                    f"<td>{escape(_short_time(run['started_at']))}</td><td>{escape(run['status'])}</td>"
                    f"<td>{escape(run['stage'])}</td>"
                    + "".join(f"<td class=n>{_num(v)}</td>" for v in losses)
                    + f"<td>{escape((run.get('error') or '')[:160])}</td></tr>")
    return ("<h2>Recent runs</h2><table id=runs><tr><th>run</th><th>scope</th><th>started (UTC)</th><th>status</th>"
            "<th>stage</th><th>base loss</th><th>served loss</th><th>candidate loss</th><th>note</th></tr>"
            + "".join(rows) + "</table>")


# -- developers ------------------------------------------------------------------------------------------------

def developers(store: Store, cfg: Config, report: Mapping[str, Any]) -> str:
    volumes = series.developer_volumes(store)
    uses = report.get("developers", {})
    top = volumes[:20]
    chart = svg.bar_chart([v.developer.split("@")[0] for v in top],
                          {"suggestions": [float(v.suggestions) for v in top],
                           "commits": [float(v.commits) for v in top], "edits": [float(v.edits) for v in top]},
                          title="Stored data per developer (the 20 with most)")
    rows = []
    for v in volumes:
        adapter = (uses.get(v.developer) or {}).get("adapter") or "base model"
        rows.append(f"<tr><td>{escape(v.developer)}</td><td>{escape(v.team)}</td><td>{escape(adapter)}</td>"
                    f"<td class=n>{v.suggestions:,}</td><td class=n>{v.accepted:,}</td>"
                    f"<td class=n>{_pct(v.accepted / v.suggestions if v.suggestions else None)}</td>"
                    f"<td class=n>{v.commits:,}</td><td class=n>{v.edits:,}</td>"
                    f"<td>{escape(_short_time(v.last_seen))}</td></tr>")
    forgotten = report.get("forgotten", {})
    dropped = report.get("dropped", {})
    privacy = [("developers opted out", len(cfg.collect.opt_out)),
               ("events not stored (opted out)", dropped.get("opted_out", 0) + dropped.get("opted_out_commit", 0)),
               ("people forgotten", forgotten.get("forgotten", 0)),
               ("identities tombstoned", forgotten.get("tombstones", 0))]
    body = [f"<div class=grid>{chart}</div>",
            "<h2>Privacy</h2><div class=tiles id=privacy>"
            + "".join(f'<div class="tile"><b>{n:,}</b>{escape(k)}</div>' for k, n in privacy) + "</div>",
            "<p class=muted>Forgotten people are counted, never named: their rows, datasets and adapters are gone.</p>",
            "<h2>Who uses which adapter</h2><table id=developers><tr><th>developer</th><th>team</th><th>adapter</th>"
            "<th>suggestions</th><th>accepted</th><th>acceptance</th><th>commits</th><th>edits</th>"
            f"<th>last seen (UTC)</th></tr>{''.join(rows)}</table>"]
    return layout("developers", "Developers", "".join(body))


# -- small formatting ------------------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.1%}"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _short_time(v: Any) -> str:
    return "" if v is None else str(v)[:16].replace("T", " ")

"""The `devtune` command.

Commands that touch the store go through the running service's API when there is one (it owns the DuckDB
file), and open the store themselves otherwise. Nothing here imports torch or transformers: training and
evaluation run in child processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collectors import COLLECTORS
from daemon import auth
from daemon.api import ApiClient, ApiError
from daemon.config import ConfigError, find_config, load_config, render_config
from daemon.logs import setup_logging
from pipelines.child import ChildFailed
from pipelines.config import Config
from pipelines.ingest.identity import Directory
from pipelines.progress import format_seconds
from pipelines.publish.registry import RegistryError
from pipelines.scope import Scope, ScopeError
from pipelines.store import StoreBusy
from pipelines.tokens import TokenizerError

if TYPE_CHECKING:  # imported where used: `devtune run` (the service) must not load DuckDB (daemon/front.py)
    from pipelines.store.db import Store

log = logging.getLogger("devtune")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "info")
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"devtune: {e}", file=sys.stderr)
        return 2
    except (StoreBusy, ApiError, TokenizerError, RegistryError, auth.TokenError) as e:
        print(f"devtune: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devtune", description="Nightly LoRA adapters from your team's "
                                     "accepted, rejected and committed code.")
    parser.add_argument("--config", metavar="FILE", help="config file (default: $DEVTUNE_CONFIG, ./config.toml, "
                        "/etc/devtune/config.toml)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: the config's")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a complete, commented config.toml into DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--force", action="store_true", help="overwrite an existing config.toml")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("collect", help="harvest every source into the store now")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("cycle", help="run one full cycle (collect, dataset, train, evaluate, gate, publish)")
    p.add_argument("--team", help="only this team (default: every team)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cycle)

    p = sub.add_parser("pretrain", help="continued pretraining on each team's code, gated on held-out loss "
                       "([pretrain]); or --from-scratch CORPUS: a new base model trained on a folder of code")
    p.add_argument("--team", help="only this team (default: every team)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--from-scratch", type=Path, metavar="CORPUS", help="a folder of code: build a tokenizer and a "
                   "Llama-shaped model trained on it into --out (the same command again resumes)")
    p.add_argument("--out", type=Path, metavar="DIR", help="--from-scratch: the model folder (base_model can name it)")
    for flag, what in SCRATCH_OPTIONS.items():
        p.add_argument(flag, help=f"--from-scratch: {what}", action="append" if flag in ("--include", "--exclude")
                       else "store")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("dataset", help="build a scope's datasets into a folder, or show one as a table")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("build", help="write sft/dpo/kto/chat/heldout.jsonl and manifest.json for a scope")
    a.add_argument("--scope", required=True, help="team:NAME or dev:ID")
    a.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write (created if missing)")
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    a.set_defaults(func=cmd_dataset_build)
    a = actions.add_parser("show", help="a dataset folder's rows per file and signal, and its drops, as tables")
    a.add_argument("dir", type=Path, nargs="?", metavar="DIR", help="default: the newest run's data/ folder")
    a.set_defaults(func=cmd_dataset_show)

    p = sub.add_parser("status", help="what is stored, served and running")
    p.add_argument("--json", action="store_true", help="one JSON object (a stable contract)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("quarantine", help="lines that could not be parsed: list, show, retry after a fix")
    qsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = qsub.add_parser("list", help="quarantined lines, newest first, with their ids")
    q.add_argument("--source", help="only this source")
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quarantine)
    q = qsub.add_parser("show", help="one line: source, file, offset, reason, the line as it reads now")
    q.add_argument("id")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quarantine)
    q = qsub.add_parser("retry", help="re-parse quarantined lines (after fixing the file or upgrading devtune)")
    q.add_argument("id", nargs="?", help="one line's id (default: every quarantined line)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quarantine)

    p = sub.add_parser("forget", help="remove everything stored of a developer, for good (asks first)")
    p.add_argument("developer", help="their id or any alias")
    p.add_argument("--yes", action="store_true", help="do it without asking")
    p.add_argument("--undo", action="store_true", help="store their events again from now on (lifts the tombstone)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("token", help="per-developer tokens for what editors send (events, completions)")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("issue", help="a new token for DEVELOPER (an id or alias), printed once")
    t.add_argument("developer")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_token)
    t = tsub.add_parser("revoke", help="revoke one token by the id `token list` shows, or all of a developer's")
    t.add_argument("id", nargs="?", help="the token's id (8 characters)")
    t.add_argument("--developer", help="revoke every token of this developer instead")
    t.set_defaults(func=cmd_token)
    t = tsub.add_parser("list", help="every token: id, developer, issued, revoked (never the token itself)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_token)

    p = sub.add_parser("promote", help="serve VERSION of a scope now (atomic), e.g. promote v0003 --scope "
                       "team:payments")
    p.add_argument("version", help="a registered version, e.g. v0003")
    p.add_argument("--scope", required=True, help="team:NAME or dev:ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="serve again what SCOPE served before its current version (atomic)")
    p.add_argument("scope", help="team:NAME or dev:ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("cancel", help="stop a running run for good: its training or evaluation (a local child "
                       "or a Ray job) is stopped and no later cycle resumes it")
    p.add_argument("run_id", help="a run id, as `devtune status` shows it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("run", help="run the service: schedules, file watching, local API (systemd runs this)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="a full cycle on local sample data and a tiny model (no network)")
    p.add_argument("--state-dir", type=Path, default=Path("devtune-state"))
    p.set_defaults(func=cmd_demo)

    add_serving_commands(sub)
    return parser


def add_serving_commands(sub: Any) -> None:
    """serve, publish, continue-config: the path from a promoted version to an editor."""
    p = sub.add_parser("serve", help="run the serving gateway alone (OpenAI-compatible completions, one model "
                       "name per developer); `devtune run` starts it when [serve] enabled")
    p.add_argument("--port", type=int, help="default: [serve] port")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("publish", help="write a registered version's exports (vLLM folder, adapter.gguf, "
                       "Modelfile), e.g. publish v0002 --scope team:payments")
    p.add_argument("version", help="a registered version, e.g. v0002")
    p.add_argument("--scope", required=True, help="team:NAME or dev:ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("continue-config", help="print the Continue config.yaml for DEVELOPER: autocomplete from the "
                       "gateway and events back to devtune, with their token")
    p.add_argument("developer", help="an id or alias")
    p.add_argument("--gateway-url", help="how the editor reaches the gateway (default: http://[serve] host:port)")
    p.add_argument("--api-url", help="how the editor reaches the service's API (default: http://[api] host:port)")
    p.set_defaults(func=cmd_continue_config)


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(find_config(args.config))
    if args.log_level is None:
        logging.getLogger().setLevel(cfg.log_level.upper())
    return cfg


@contextlib.contextmanager
def local_store(cfg: Config) -> Iterator[Store]:
    from pipelines.store.db import Store

    store = Store.open(cfg.state_dir / "store.duckdb", lock_timeout_s=cfg.api.lock_timeout_s)
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def service_or_store(cfg: Config) -> Iterator[ApiClient | Store]:
    """The running service's API client (it holds the store: DuckDB allows one writer process), else the store
    opened here. A service that is starting holds the store a few seconds before it writes service.json (more
    under load: a restarted service took over 2 s in CI), so while the store is busy the service is looked
    for again, up to [api] lock_timeout_s."""
    from pipelines.store.db import Store

    deadline = time.monotonic() + cfg.api.lock_timeout_s
    while True:
        client = ApiClient.discover(cfg.state_dir)
        if client is not None:
            yield client
            return
        try:
            store = Store.open(cfg.state_dir / "store.duckdb",
                               lock_timeout_s=min(1.0, max(0.0, deadline - time.monotonic())))
        except StoreBusy:
            if time.monotonic() >= deadline:
                raise
            continue
        try:
            yield store
        finally:
            store.close()
        return


def ask(cfg: Config, method: str, path: str, body: dict[str, Any] | None,
        local: Callable[[Store], Any]) -> tuple[Any, bool]:
    """The running service's answer to `method path`, or, when no service runs, `local` done here on the
    store. The flag says which."""
    with service_or_store(cfg) as target:
        if isinstance(target, ApiClient):
            return target.call(method, path, body), True
        return local(target), False


# -- commands ------------------------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    target = args.dir / "config.toml"
    if target.exists() and not args.force:
        print(f"devtune: {target} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    args.dir.mkdir(parents=True, exist_ok=True)
    found = local_sources()
    target.write_text(render_config(sources=[{k: v for k, v in s.items() if k != "why"} for s in found]))
    print(f"wrote {target}")
    for s in found:
        print(f"  added [[sources]] kind = {s['kind']!r} path = {s['path']!r} ({s['why']})")
    print("next: add [[sources]], [[developers]] and [[teams]], set base_model, then run "
          f"`devtune --config {target} collect`")
    return 0


def local_sources() -> list[dict[str, str]]:
    """This machine's installs of every source kind, where each tool writes by default (`Collector.discover`)."""
    return [{"kind": kind, "path": str(f.path), "why": f.why} for kind, c in COLLECTORS.items() for f in c.discover()]


def cmd_collect(args: argparse.Namespace) -> int:
    from daemon import jobs  # here, not at the top: `devtune run` stays free of DuckDB

    cfg = _config(args)
    result, _ = ask(cfg, "POST", "/api/collect", {}, lambda store: jobs.collect(store, cfg))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for r in result["sources"]:
            stored = ", ".join(f"{n} {k}" for k, n in r["stored"].items() if n) or "nothing new"
            verdict = f"FAILED: {r['error']}" if r["error"] else r.get("skipped") or "ok"
            workers = f", parsed and scrubbed by {r['workers']} worker processes" if r.get("workers") else ""
            print(f"{r['source']}: read {r['seen']:,} records, stored {stored} ({r['seconds']:.1f}s{workers}); "
                  f"{verdict}")
            for note in r["notes"]:
                print(f"  note: {note}")
        if result["failed"]:
            print(f"devtune: {len(result['failed'])} source(s) failed: {', '.join(result['failed'])}; every other "
                  "source was collected. What was stored before a failure stays; fix the cause and collect again",
                  file=sys.stderr)
    return 1 if result["failed"] else 0


def cmd_cycle(args: argparse.Namespace) -> int:
    from daemon import jobs

    return _team_runs(args, "/api/cycle", jobs.cycle, describe_cycle)


def _team_runs(args: argparse.Namespace, path: str, local: Callable[[Store, Config, str], dict[str, Any]],
               describe: Callable[[dict[str, Any]], str]) -> int:
    """`devtune cycle` and `devtune pretrain`: one run per team (or --team), through the service when it runs
    (POST `path`, then its progress), else in this process on the store; exit 1 when any failed or was busy."""
    cfg = _config(args)
    teams = [args.team] if args.team else cfg.team_names()
    unknown = next((why for t in teams if (why := cfg.unknown_team(t))), None)
    if unknown:
        print(f"devtune: {unknown}", file=sys.stderr)
        return 2
    results = []
    for team in teams:
        with service_or_store(cfg) as target:
            results.append(_remote_run(target, team, path) if isinstance(target, ApiClient)
                           else local(target, cfg, team))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for r in results:
            print(describe(r))
    return 1 if any(r["outcome"] in ("failed", "busy") for r in results) else 0


def _remote_run(client: ApiClient, team: str, path: str) -> dict[str, Any]:
    started = client.call("POST", path, {"team": team})
    run_id, stage = started["run_id"], ""
    log.info("run=%s started by the service", run_id)
    while True:
        run = client.call("GET", f"/api/runs/{run_id}")
        if run["stage"] != stage:
            stage = run["stage"]
            log.info("run=%s stage=%s", run_id, stage)
        if run["status"] != "running":
            break
        time.sleep(2.0)
    summary = run["summary"]
    succeeded = ("canary" if summary.get("canary") else "promoted") if summary.get("version") else "kept"
    outcome = succeeded if run["status"] == "succeeded" else run["status"]
    return {"run_id": run_id, "scope": run["scope"], "outcome": outcome, "version": summary.get("version"),
            "error": run["error"] if run["status"] == "failed" else None, "summary": summary, "developers": []}


def describe_cycle(r: dict[str, Any]) -> str:
    """One line per run: the team's, then each developer's."""
    lines = [_describe_run(r)] + [_describe_run(d) for d in r.get("developers", [])]
    if waiting := r.get("developers_waiting"):
        lines.append(f"{waiting['count']} developer adapter(s) wait: {waiting['why']}")
    return "\n".join(lines)


def _describe_run(r: dict[str, Any]) -> str:
    head = f"{r['scope']} run {r['run_id']}: {r['outcome']}"
    s = r["summary"]
    if r["outcome"] in ("failed", "busy"):
        return f"{head}: {r['error']}"
    if r["outcome"] == "skipped":
        return f"{head}: {s.get('skipped') or s.get('dataset', {}).get('skipped')}"
    ev = s["eval"]
    line = f"{head}{' ' + r['version'] if r['version'] else ''}; " + _scores(ev)
    return line + f" ({'; '.join(s['gate']['reasons'][:1] if r['version'] else s['gate']['reasons'])})"


def _scores(ev: dict[str, Any]) -> str:
    """"held-out loss base 5.07, candidate 1.58; edit similarity base 0.21, candidate 0.63" (and served)."""
    names = [n for n in ("base", "served", "candidate") if ev.get(n)]
    parts = []
    for key, label in (("heldout_loss", "held-out loss"), ("edit_similarity", "edit similarity")):
        if all(ev[n].get(key) is not None for n in names):
            parts.append(f"{label} " + ", ".join(f"{n} {ev[n][key]:.4f}" for n in names))
    return "; ".join(parts)


SCRATCH_OPTIONS = {
    "--params": "parameter budget, e.g. 5M (or --flops)", "--flops": "compute budget, 6 x parameters x tokens",
    "--tokens": "training tokens (default 20 per parameter)", "--family": "FIM tokens of qwen2.5-coder (default), "
    "starcoder, codellama or deepseek-coder", "--seq-len": "tokens per sequence (512)",
    "--include": "glob of files to read (repeatable)", "--exclude": "glob of files to skip (repeatable)",
    "--max-corpus-bytes": "read at most this much of the folder",
}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from daemon import jobs

    if args.from_scratch is not None:
        if args.out is None:
            print("devtune: --from-scratch needs --out DIR, the folder the model is written to", file=sys.stderr)
            return 2
        options = []
        for flag in SCRATCH_OPTIONS:
            value = getattr(args, flag[2:].replace("-", "_"))
            for v in value if isinstance(value, list) else [value] if value is not None else []:
                options += [flag, v]
        if not {"--params", "--flops"} & set(options):
            options += ["--params", "5M"]
        from pipelines.pretrain.run import run_scratch

        try:
            metrics = run_scratch(args.out.resolve(), args.from_scratch.resolve(), options)
        except ChildFailed as e:
            print(f"devtune: {e}", file=sys.stderr)
            return 1
        print(json.dumps(metrics, indent=2) if args.json else
              f"{args.out}: {metrics['parameters']:,} parameters trained on {metrics['tokens']:,} tokens, loss "
              f"{metrics['first_loss']:.3f} -> {metrics['loss']:.3f} in {format_seconds(metrics['seconds'])}; set "
              f"base_model = \"{args.out.resolve()}\" to use it")
        return 0
    return _team_runs(args, "/api/pretrain", jobs.pretrain, _describe_run)


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from daemon import jobs

    cfg = _config(args)
    try:
        scope = Scope.parse(args.scope)
    except ScopeError as e:
        print(f"devtune: {e}", file=sys.stderr)
        return 2
    unknown = cfg.unknown_team(scope.name) if scope.kind == "team" else None
    if unknown:
        print(f"devtune: {unknown}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    report, remote = ask(cfg, "POST", "/api/dataset", {"scope": str(scope)},
                         lambda store: jobs.build_dataset(store, cfg, scope, out))
    if remote:  # the running service built the files in its own exports/ folder: copy them to --out
        report["out_dir"] = str(_copy_export(Path(report["out_dir"]), out))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"{report['scope']}: {report['train_rows']:,} SFT training rows, {report['heldout_rows']:,} held out "
              f"-> {report['out_dir']}")
        if report["skipped"]:
            print(f"skipped: {report['skipped']}")
        print(f"next: devtune dataset show {report['out_dir']}")
    return 0


def _copy_export(export: Path, out: Path) -> Path:
    from pipelines.datasets.build import FILES

    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copyfile(export / name, out / name)
        manifest = json.loads((export / "manifest.json").read_text())
    except PermissionError as e:
        raise ApiError(f"cannot copy the service's export {export} to {out}: {e.strerror} on {e.filename}. Run "
                       "this as a member of the service's group (sudo usermod -aG devtune $USER) or as its "
                       "user") from None
    manifest["out_dir"] = str(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def online_table(online: dict[str, dict[str, Any]]) -> str:
    """The field numbers per served version: what editors did with its suggestions, and what it cost."""
    head = (f"{'online':13s}{'scope':28s}{'version':8s}{'shown':>8s}{'accepted':>10s}{'95% interval':>15s}"
            f"{'kept':>7s}{'chars/dev-day':>14s}{'devs':>6s}{'train':>8s}{'p50/p95 ms':>14s}")
    lines = [head]
    for scope, versions in online.items():
        for version, v in versions.items():
            kept = f"{v['kept_rate']:.0%}" if v["kept_rate"] is not None else "-"
            latency = f"{v['latency_p50_ms']:.0f}/{v['latency_p95_ms']:.0f}" if "latency_p50_ms" in v else "-"
            train = format_seconds(v["train_seconds"]) if v.get("train_seconds") else "-"
            interval = f"{v['acceptance_low']:.1%}-{v['acceptance_high']:.1%}"
            lines.append(f"{'':13s}{scope[:27]:28s}{version:8s}{v['shown']:>8,}{v['acceptance']:>10.1%}"
                         f"{interval:>15s}{kept:>7s}{v['accepted_chars_per_dev_day']:>14,.0f}{v['developers']:>6}"
                         f"{train:>8s}{latency:>14s}")
    return "\n".join(lines)


def cmd_dataset_show(args: argparse.Namespace) -> int:
    folder = args.dir or _newest_dataset(_config(args).state_dir)
    manifest_path = folder / "manifest.json" if folder else None
    if manifest_path is None or not manifest_path.is_file():
        where = manifest_path or "any run directory"
        print(f"devtune: no manifest.json in {where}: build one with `devtune dataset build --scope team:NAME "
              "--out DIR`, or run a cycle", file=sys.stderr)
        return 1
    print(dataset_tables(json.loads(manifest_path.read_text())))
    return 0


def _newest_dataset(state_dir: Path) -> Path | None:
    manifests = sorted((state_dir / "runs").glob("*/data/manifest.json"), key=lambda p: p.stat().st_mtime)
    return manifests[-1].parent if manifests else None


def dataset_tables(m: dict[str, Any]) -> str:
    """A manifest as two tables: rows per signal and file, and rows dropped per reason."""
    files = list(m["files"])
    signals = sorted({s for counts in m["files"].values() for s in counts})
    heads = [f.removesuffix(".jsonl") for f in files]
    width = max([len("signal"), *map(len, signals)]) + 2
    lines = [f"{m['scope']}  sha256 {m['sha256'][:16]}  {m.get('created_at', '')}",
             f"skipped: {m['skipped']}" if m["skipped"] else "usable: yes", ""]
    lines.append("signal".ljust(width) + "".join(h.rjust(10) for h in heads))
    for s in signals:
        lines.append(s.ljust(width) + "".join(
            (f"{m['files'][f][s]:,}" if s in m["files"][f] else "-").rjust(10) for f in files))
    lines.append("total".ljust(width) + "".join(f"{sum(m['files'][f].values()):,}".rjust(10) for f in files))
    kto = m.get("kto", {})
    if kto:
        lines.append(f"\nKTO weights: desirable {kto['desirable_weight']}, undesirable {kto['undesirable_weight']}")
    if m.get("links"):
        lines.append("links: " + ", ".join(f"{k} {v:,}" for k, v in m["links"].items()))
    if m.get("served_by"):
        lines.append("served by: " + ", ".join(f"{k} {v:,}" for k, v in m["served_by"].items()))
    if m["dropped"]:
        reason_width = max(map(len, m["dropped"])) + 2
        lines += ["", "dropped".ljust(reason_width) + "rows".rjust(10)]
        lines += [r.ljust(reason_width) + f"{n:,}".rjust(10) for r, n in m["dropped"].items()]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from daemon import jobs

    cfg = _config(args)
    report, remote = ask(cfg, "GET", "/api/status", None, lambda store: jobs.status(store, cfg))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    sug = report["suggestions"]
    print(f"state        {report['state_dir']}{'  (service running)' if remote else ''}")
    print(f"suggestions  {sug['total']:,} (accepted {sug['accepted']:,}, rejected {sug['rejected']:,})")
    for kind, n in sug.get("by_kind", {}).items():
        print(f"  {kind} {n['total']:,} (accepted {n['accepted']:,})")
    for table in ("edit_outcomes", "interactions"):
        if report.get(table, {}).get("total"):
            kinds = ", ".join(f"{k} {v if isinstance(v, int) else v['total']:,}"
                              for k, v in report[table]["by_kind"].items())
            print(f"{table.replace('_', ' '):13s}{report[table]['total']:,} ({kinds})")
    print(f"commits      {report['commits']['total']:,}")
    for name, src in report.get("sources", {}).items():
        when = f"last collected {src['collected_at']}" if src["collected_at"] else "not collected yet"
        print(f"source       {name} ({src['kind']}): {src['streams']} stream(s), {src['suggestions']:,} suggestions, "
              f"{src['commits']:,} commits, {src['quarantined']:,} quarantined; {when}")
        if src["failures"]:
            print(f"  FAILING    {src['failures']} collect(s) in a row, last at {src['failed_at']}: {src['error']}")
    print(f"quarantined  {report['quarantined']['total']:,}")
    if report["dropped"]:
        print("dropped      " + ", ".join(f"{k} {v:,}" for k, v in report["dropped"].items()))
    if report["scrubbed"]:
        print("scrubbed     " + ", ".join(f"{k} {v:,}" for k, v in report["scrubbed"].items()))
    for u in report.get("unassigned", []):
        print(f"unassigned   {u['identity']} ({u['source_kind']}: {u['suggestions']:,} suggestions, "
              f"{u['commits']:,} commits): map it in [[developers]] or [[teams]]")
    for scope, s in report["served"].items():
        m = s.get("metrics") or {}
        extra = f", edit similarity {m['edit_similarity']:.3f}" if m.get("edit_similarity") is not None else ""
        loss = (f"held-out loss {s['heldout_loss']:.4f} (base {s['base_heldout_loss']:.4f})"
                if s["heldout_loss"] is not None and s["base_heldout_loss"] is not None else "no held-out scores")
        print(f"served       {scope} {s['version']}: {loss}{extra} at {s['path']}{_exports_note(scope, s)}")
    if not report["served"]:
        print("served       nothing yet")
    if report.get("online"):
        print(online_table(report["online"]))
    for scope, f in report.get("field", {}).items():
        if f["canary"]:
            c = f["canary"]
            print(f"canary       {scope} {c['version']} to {c['share']:.0%} of the team since {c['started_at']} "
                  f"(the rest: {c['previous']})")
        if f["last"]:
            last = f["last"]
            print(f"field        {scope} {last['version']}: {last['outcome'].replace('_', ' ')} at {last['at']}: "
                  f"{last['reason']}")
    for scope, r in report.get("retrain_required", {}).items():
        print(f"retrain      {scope} {r['version']}: {r['reason']}")
    if report.get("forgotten", {}).get("forgotten"):
        print(f"forgotten    {report['forgotten']['forgotten']} developer(s) ({report['forgotten']['tombstones']} "
              "identities kept as one-way hashes only)")
    for scope, g in report.get("gate", {}).items():
        verdict = "promoted" if g["promote"] else "kept the champion"
        print(f"gate         {scope} run {g['run_id']}: {verdict} on {g['primary_metric']}: {'; '.join(g['reasons'])}")
    for developer, d in report.get("developers", {}).items():
        print(f"developer    {developer} ({d['team']}) uses {d['adapter'] or 'the base model'}")
    if report.get("gateway", {}).get("total"):
        print(f"gateway      {report['gateway']['total']:,} completions served ("
              + ", ".join(f"{k} {v['requests']:,}" for k, v in report["gateway"]["by_adapter"].items()) + ")")
    for q in report.get("training_queue", []):
        gpus = f" on GPU {','.join(q['gpus'])}" if q["gpus"] else ""
        print(f"queue        {q['run_id']} {q['scope']} {q['state']}{gpus} since {q['since']}")
    for run in report["runs"][:5]:
        detail = run["error"] or run["summary"].get("version") or ""
        print(f"run          {run['run_id']} {run['status']} ({run['stage']}) {detail}".rstrip())
    return 0


def _exports_note(scope: str, served: dict[str, Any]) -> str:
    exports = served.get("exports")
    if exports is None:
        return f"; no exports (devtune publish {served['version']} --scope {scope})"
    if not exports.get("ok"):
        return f"; exports FAILED: {exports.get('error')} (devtune publish {served['version']} --scope {scope})"
    return f"; served as {exports['served_name']}"


def cmd_quarantine(args: argparse.Namespace) -> int:
    from daemon import jobs

    cfg = _config(args)
    if args.action == "list":
        rows, _ = ask(cfg, "POST", "/api/quarantine/list", {"source": args.source, "limit": args.limit},
                      lambda store: jobs.quarantine_list(store, args.source, args.limit))
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
        for r in [] if args.json else rows:
            print(f"{r['id']}  {r['source']}  {r['stream']}@{r['offset']}  {r['reason']}\n"
                  f"              {r['excerpt'][:100]!r}")
        if not rows and not args.json:
            print("nothing quarantined")
        return 0
    if args.action == "show":
        # Through the service, an unknown id is a 404: an ApiError naming the id.
        found, _ = ask(cfg, "GET", f"/api/quarantine/{args.id}", None,
                       lambda store: jobs.quarantine_show(store, cfg, args.id))
        if found is None:
            print(f"devtune: no quarantined line {args.id}; `devtune quarantine list` shows the ids", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(found, indent=2, default=str))
            return 0
        for k in ("id", "source", "file", "offset", "length", "reason", "quarantined_at", "excerpt"):
            print(f"{k:15s}{found[k]}")
        print(f"{'now':15s}{found['verdict']}")
        if found["now"] is not None:
            print(f"{'line now':15s}{found['now']}")
        return 0
    result, _ = ask(cfg, "POST", "/api/quarantine/retry", {"id": args.id},
                    lambda store: jobs.quarantine_retry(store, cfg, args.id))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for r in result["results"]:
            print(f"{r['id']}  {r['source']}  {r['stream']}@{r['offset']}  {r['outcome']}: {r['detail']}")
        if not result["results"]:
            print("nothing to retry" if args.id is None else f"no quarantined line {args.id}")
        if result["error"]:
            print(f"devtune: retry failed: {result['error']}", file=sys.stderr)
    return 1 if result["error"] or any(r["outcome"] != "stored" for r in result["results"]) else 0


def cmd_forget(args: argparse.Namespace) -> int:
    from daemon import jobs

    cfg = _config(args)

    def call(**body: Any) -> tuple[dict[str, Any], bool]:
        return ask(cfg, "POST", "/api/forget", {"developer": args.developer, **body},
                   lambda store: jobs.forget_developer(store, cfg, args.developer, **body))

    if args.undo:
        result, _ = call(undo=True)
        print(json.dumps(result, indent=2) if args.json else
              f"{result['tombstones_removed']} tombstone(s) lifted: events of {args.developer} logged from now on are "
              "stored again (what was logged while they were forgotten is not collected again)")
        return 0
    plan, _ = call(dry_run=True)
    if not args.yes:
        print(describe_forget(plan))
        if not sys.stdin.isatty():
            print("devtune: nothing changed; pass --yes to forget them", file=sys.stderr)
            return 1
        if input(f"forget {plan['developer']} for good? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing changed")
            return 1
    done, remote = call(dry_run=False)
    if not remote:  # this process holds the store alone: rewrite its file without their bytes now
        with local_store(cfg):
            pass
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    print(describe_forget(done))
    print(f"forgotten: {done['developer']} is kept only as one-way hashes, so later collects store nothing of theirs "
          f"(devtune forget --undo {done['developer']} lifts that). " + (
              "The store file is rewritten without their bytes when the service next starts (systemctl restart "
              "devtune)." if remote else "The store file was rewritten without their bytes."))
    return 0


def describe_forget(plan: dict[str, Any]) -> str:
    counts = ", ".join(f"{n:,} {k.replace('_', ' ')}" for k, n in plan["counts"].items() if n) or "no stored rows"
    verb = "removed" if plan["done"] else "would remove"
    lines = [f"{plan['developer']}: {verb} {counts}",
             f"  identities: {', '.join(plan['identities'])}",
             f"  their runs, personal adapters ({', '.join(plan['personal_versions']) or 'none'}), HTTP inbox lines "
             "and tokens; the datasets of their teams' runs"]
    if plan["retrain"]:
        lines.append("  retrained without them by the next cycle: "
                     + ", ".join(f"{scope} {version}" for scope, version in plan["retrain"]))
    return "\n".join(lines)


def cmd_token(args: argparse.Namespace) -> int:
    cfg = _config(args)
    directory = Directory.from_config(cfg)
    if args.action == "issue":
        who = directory.resolve(args.developer, ())
        token, record = auth.issue(cfg.state_dir, who.developer)
        if args.json:
            print(json.dumps({"token": token, **asdict(record)}, indent=2))
            return 0
        print(token)
        print(f"issued {record.id} to {record.developer}: put it in their ~/.continue/.env as DEVTUNE_TOKEN "
              "(devtune continue-config shows the rest); it is not shown again", file=sys.stderr)
        if not who.mapped:
            print(f"note: {record.developer} is in no [[developers]] or [[teams]] table: add it, or their events "
                  f"go to default_team ({cfg.default_team})", file=sys.stderr)
        return 0
    if args.action == "revoke":
        if (args.id is None) == (args.developer is None):
            print("devtune: give a token id or --developer ID", file=sys.stderr)
            return 2
        developer = directory.resolve(args.developer, ()).developer if args.developer else None
        revoked = auth.revoke(cfg.state_dir, args.id, developer)
        for r in revoked:
            print(f"revoked {r.id} of {r.developer}")
        if not revoked:
            print(f"{developer} has no live token")
        return 0
    records = auth.list_tokens(cfg.state_dir)
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2))
    for r in [] if args.json else records:
        state = f"revoked {r.revoked_at}" if r.revoked_at else "live"
        print(f"{r.id}  {r.developer}  issued {r.issued_at}  {state}")
    if not records and not args.json:
        print("no tokens: devtune token issue DEVELOPER")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from daemon import jobs

    cfg = _config(args)
    result = jobs.promote(cfg.state_dir, args.scope, args.version)
    print(json.dumps(result, indent=2) if args.json else
          f"{result['scope']} now serves {result['version']} (was {result['previous'] or 'nothing'}): {result['path']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from daemon import jobs

    cfg = _config(args)
    result = jobs.rollback(cfg.state_dir, args.scope)
    print(json.dumps(result, indent=2) if args.json else
          f"{result['scope']} now serves {result['version'] or 'nothing (its fallback)'} "
          f"(was {result['previous']})")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    cfg = _config(args)
    client = ApiClient.discover(cfg.state_dir)
    if client is None:  # runs run inside the service (or inside a `devtune cycle`, which Ctrl-C stops)
        print("devtune: no service is running, so no run is: nothing to cancel", file=sys.stderr)
        return 1
    result = client.call("POST", "/api/cancel", {"run_id": args.run_id})
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["cancelled"]:
        print(f"run {args.run_id} cancelled ({result['stopped']} process(es) or Ray job(s) stopped)")
    else:
        print(f"devtune: {result['error']}", file=sys.stderr)
    return 0 if result["cancelled"] else 1


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.service import run_service

    return run_service(_config(args), find_config(args.config), args.log_level)


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon import jobs
    from daemon.demo import DEMO_TEAM, prepare_demo, simulate_editors

    started = time.monotonic()
    state_dir = args.state_dir.resolve()
    print(f"devtune demo: sample data, a tiny base model and one full cycle in {state_dir}", flush=True)
    config_path = prepare_demo(state_dir)
    cfg = load_config(config_path)
    with local_store(cfg) as store:
        result = jobs.cycle(store, cfg, DEMO_TEAM)
        report = jobs.status(store, cfg)
    editors = demo_editors(cfg, DEMO_TEAM) if result["outcome"] in ("promoted", "canary", "kept") else ""
    if editors:  # then the editors' side: a simulated stretch of editing, collected and attributed
        written = simulate_editors(cfg)
        with local_store(cfg) as store:
            jobs.collect(store, cfg)
            online = jobs.status(store, cfg)["online"]
        editors += (f"\nfield       {written} simulated editor events since the promotions (Continue's format, the "
                    f"stable model name), collected and attributed to the versions that served them:\n"
                    + online_table(online))
    print(demo_summary(result, report, time.monotonic() - started, config_path, editors))
    return 0 if result["outcome"] in ("promoted", "canary", "kept") else 1


def demo_editors(cfg: Config, team: str) -> str:
    """The editor's path after the demo's cycles: the gateway answering two developers with their adapters."""
    import urllib.error

    from daemon.demo import demo_developers, editor_path

    try:
        answers = editor_path(cfg, demo_developers(cfg, team))
    except (urllib.error.URLError, OSError) as e:
        return f"editor      the gateway did not answer: {e} (see {cfg.state_dir / 'gateway' / 'worker.log'})"
    lines = [f"editor      gateway {answers[0]['url']}, model {cfg.serve.model_name!r}: the same prompt for "
             f"{len(answers)} developers"]
    lines += [f"            {a['developer']} -> {a['adapter']} ({a['ms']:,.0f} ms): {a['text'][:70]!r}"
              for a in answers]
    return "\n".join(lines)


def demo_summary(result: dict[str, Any], report: dict[str, Any], seconds: float, config_path: Path,
                 editors: str = "") -> str:
    if result["outcome"] in ("failed", "skipped", "busy"):
        return describe_cycle(result)
    s = result["summary"]
    collected = {r["source"]: r for r in s["collect"]}
    ds, tr, ev = s["dataset"], s["train"], s["eval"]
    base, cand = ev["base"], ev["candidate"]
    served = report["served"].get(result["scope"])
    stages = ", ".join(f"{st['name']} {st['steps']} steps" for st in tr["stages"])
    lines = [
        "",
        f"collected   {report['suggestions']['total']:,} Continue suggestions "
        f"({report['suggestions']['accepted']:,} accepted), {report['quarantined']['total']} malformed lines "
        f"quarantined, {report['commits']['total']:,} commits "
        f"(in {sum(r['seconds'] for r in collected.values()):.1f}s)",
        f"dataset     {ds['train_rows']:,} training rows "
        f"({', '.join(f'{k} {v}' for k, v in sorted(ds['counts']['train'].items()))}), "
        f"{ds['heldout_rows']:,} held-out rows (the most recent)",
        f"training    {stages} in {format_seconds(tr['seconds'])}, {tr['tokens_per_s']:,.0f} tokens/s "
        f"on {tr['device']}",
        f"held-out    loss per token: base {base['heldout_loss']:.4f} -> candidate {cand['heldout_loss']:.4f} "
        f"({(cand['heldout_loss'] - base['heldout_loss']) / base['heldout_loss']:+.1%})",
    ]
    if cand.get("edit_similarity") is not None:
        lines.append(f"completions {ev['generated_rows']} held-out middles generated: edit similarity "
                     f"{base['edit_similarity']:.3f} -> {cand['edit_similarity']:.3f}, exact match "
                     f"{base['exact_match']:.1%} -> {cand['exact_match']:.1%}, length {cand['generated_tokens']:.1f} "
                     f"tokens (kept middles {ev['reference_tokens']:.1f})")
    if result["version"] and served:
        lines.append(f"promoted    {result['scope']} {result['version']} -> {served['path']}")
    else:
        lines.append(f"not promoted: {'; '.join(s['gate']['reasons'])}")
    for d in result.get("developers", []):
        lines.append(f"developer   {_describe_run(d)}")
    if editors:
        lines.append(editors)
    lines.append(f"total       {format_seconds(seconds)}; now try: devtune --config {config_path} status")
    return "\n".join(lines)


# -- serving -------------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from daemon.gateway import start_gateway

    cfg = _config(args)
    port = cfg.serve.port if args.port is None else args.port
    if not cfg.serve.enabled:
        print("note: [serve] enabled = false: requests are logged in the gateway folder but the service does not "
              "collect them until it is true", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        gateway = start_gateway(cfg, port)
    except OSError as e:
        print(f"devtune: the gateway cannot listen on {cfg.serve.host}:{port}: {e.strerror} (another gateway, or "
              "`devtune run` with [serve] in_service = true, may hold it): pick another [serve] port", file=sys.stderr)
        return 2
    print(f"serving {cfg.serve.model_name!r} at {gateway.url}/v1 ({cfg.serve.backend} backend); Ctrl-C stops",
          flush=True)
    stop.wait()
    gateway.stop()
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from pipelines.publish.publish import export_version_by_hand

    cfg = _config(args)
    result = export_version_by_hand(cfg.state_dir, args.scope, args.version, cfg.publish.export_timeout_s)
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["ok"]:
        done = "was already exported" if result.get("already") else "exported"
        print(f"{args.scope} {args.version} {done} as {result['served_name']}: "
              f"{cfg.state_dir / 'registry' / args.scope / args.version / 'exports'}")
    else:
        print(f"devtune: the export of {args.scope} {args.version} failed: {result['error']} (log: {result['log']})",
              file=sys.stderr)
    return 0 if result["ok"] else 1


def cmd_continue_config(args: argparse.Namespace) -> int:
    from daemon.onboarding import continue_yaml
    from pipelines.serve.backend import Router
    from pipelines.tokens import load_base_tokenizer

    cfg = _config(args)
    directory = Directory.from_config(cfg)
    who = directory.resolve(args.developer, ())
    team = directory.team(who.developer, None)
    notes = []
    if not who.mapped:
        notes.append(f"{who.developer} is in no [[developers]] or [[teams]] table: they are served as team "
                     f"{team} (default_team)")
    if not cfg.serve.enabled:
        notes.append("[serve] enabled = false on the server: start the gateway (devtune serve) for completions")
    if not cfg.continue_http.enabled:
        notes.append("[continue_http] enabled = false on the server: the data: destination is refused until it is on")
    served = Router(cfg.state_dir, cfg.base_model).adapter_for(who.developer, team)
    notes.append(f"served now: {served.label if served else 'the base model'} (the gateway decides per request)")
    gateway_url = args.gateway_url or f"http://{cfg.serve.host}:{cfg.serve.port}"
    api_url = args.api_url or f"http://{cfg.api.host}:{cfg.api.port}"
    print(continue_yaml(cfg, who.developer, load_base_tokenizer(cfg.base_model).fim, gateway_url, api_url, notes),
          end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

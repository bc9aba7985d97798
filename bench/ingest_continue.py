"""Continue ingest (parse, identity, exclusion, scrubbing, DuckDB upserts with cursors) against DuckDB's own
`read_json` of the same file into a table: the floor no Python ingest can beat. Both in one run.

    python bench/ingest_continue.py --events 200000          # ~1 GB of realistic events
    python bench/ingest_continue.py --events 1000000 --workdir /var/tmp/devtune-bench

Events are realistic in size and shape: prefixes of 0.5-2 KB of real Python (the standard library), the
three compiled-prefix shapes of FORMATS.md §1.5, suffixes of 0.1-0.6 KB, the rendered prompt, completions
of 20-200 chars, and a planted credential in 1% of them. The page cache is warmed before each side runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon import jobs
from daemon.config import load_config, render_config
from pipelines.store.db import Store


def corpus() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for package in ("email", "json", "http", "logging", "asyncio", "unittest", "concurrent", "importlib"):
        for path in sorted((stdlib / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            if len(text) > 4000:
                out.append((f"{package}/{path.name}", text))
    return out


def event(rng: random.Random, files: list[tuple[str, str]], i: int) -> dict[str, object]:
    rel, text = rng.choice(files)
    pos = rng.randint(2100, len(text) - 700)
    prefix = text[pos - rng.randint(500, 2000):pos]
    suffix = text[pos:pos + rng.randint(100, 600)]
    completion = text[pos:pos + rng.randint(20, 200)]
    if i % 100 == 0:
        completion = f'API_TOKEN = "ghp_{uuid.UUID(int=rng.getrandbits(128)).hex}abcd"\n'
    shape = rng.random()
    if shape < 0.5:
        model, compiled = "qwen2.5-coder:1.5b-base", prefix
    elif shape < 0.8:
        model, compiled = "starcoder2:3b", f"\n# Path: other/util.py\n# x = 1\n# {rel}\n{prefix}"
    else:
        model, compiled = "codestral-latest", f"+++++ other/util.py\nx = 1\n\n+++++ {rel}\n{prefix}"
    return {
        "eventName": "autocomplete", "schema": "0.2.0",
        "timestamp": f"2026-10-{1 + i % 28:02d}T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}.000Z",
        "userId": "", "userAgent": "Visual Studio Code/1.105.1 (Continue/1.2.10)", "selectedProfileId": "local",
        "disable": False, "maxPromptTokens": 1024, "debounceDelay": 350, "maxSuffixPercentage": 0.2,
        "prefixPercentage": 0.3, "transform": True, "multilineCompletions": "auto",
        "slidingWindowPrefixPercentage": 0.75, "slidingWindowSize": 500, "useCache": True, "onlyMyCode": True,
        "useRecentlyEdited": True, "accepted": rng.random() < 0.3, "time": rng.randint(120, 900),
        "prefix": compiled, "suffix": suffix, "prompt": f"<|fim_prefix|>{compiled}<|fim_suffix|>{suffix}<|fim_middle|>",
        "completion": completion, "modelProvider": "ollama", "modelName": model, "cacheHit": False,
        "filepath": f"file:///home/dev{i % 7}/src/app/{rel}", "gitRepo": "git@github.com:acme/app",
        "completionId": str(uuid.UUID(int=rng.getrandbits(128))), "uniqueId": f"{i % 7:02d}" * 32,
    }


def write_events(path: Path, n: int) -> None:
    rng = random.Random(7)
    files = corpus()
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(event(rng, files, i), separators=(",", ":")) + "\n")
            if i and i % 200_000 == 0:
                print(f"  generated {i:,} events ({time.monotonic() - started:.0f}s)", flush=True)


def warm(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(1 << 24):
            pass


def duckdb_read_json(path: Path, db: Path) -> float:
    warm(path)
    started = time.monotonic()
    con = duckdb.connect(str(db))
    con.execute(f"CREATE TABLE events AS SELECT * FROM read_json('{path}', format = 'newline_delimited')")
    con.execute("CHECKPOINT")
    con.close()
    return time.monotonic() - started


def devtune_collect(folder: Path, site: Path, batch_events: int,
                    scrub_workers: int = 0) -> tuple[float, dict[str, object]]:
    config = site / "config.toml"
    config.write_text(render_config({"": {"state_dir": "state"},
                                     "collect": {"batch_events": batch_events, "scrub_workers": scrub_workers}},
                                    sources=[{"kind": "continue", "path": str(folder), "name": "bench"}]))
    cfg = load_config(config)
    warm(folder / "dev_data" / "0.2.0" / "autocomplete.jsonl")
    started = time.monotonic()
    store = Store.open(cfg.state_dir / "store.duckdb")
    result = jobs.collect(store, cfg)
    report = jobs.status(store, cfg)
    store.close()
    seconds = time.monotonic() - started
    assert result["error"] is None, result["error"]
    return seconds, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/devtune-bench-ingest"))
    parser.add_argument("--batch-events", type=int, default=2000, help="[collect] batch_events")
    parser.add_argument("--scrub-workers", type=int, default=0, help="[collect] scrub_workers (1: none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    folder = args.workdir / "continue"
    log_file = folder / "dev_data" / "0.2.0" / "autocomplete.jsonl"
    marker = args.workdir / f"events-{args.events}"
    if not marker.exists():
        shutil.rmtree(args.workdir, ignore_errors=True)
        print(f"generating {args.events:,} events in {log_file}", flush=True)
        write_events(log_file, args.events)
        marker.touch()
    size_mb = log_file.stat().st_size / 1e6
    for old in (args.workdir / "readjson.duckdb", args.workdir / "site"):
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    (args.workdir / "site").mkdir()

    base_s = duckdb_read_json(log_file, args.workdir / "readjson.duckdb")
    print(f"duckdb read_json:  {args.events:,} events ({size_mb:,.0f} MB) in {base_s:.1f}s = "
          f"{args.events / base_s:,.0f} events/s", flush=True)
    ours_s, report = devtune_collect(folder, args.workdir / "site", args.batch_events, args.scrub_workers)
    stored = report["suggestions"]["total"]  # type: ignore[index]
    print(f"devtune collect:   {stored:,} events in {ours_s:.1f}s = {args.events / ours_s:,.0f} events/s "
          f"(scrubbed {report['scrubbed']})", flush=True)
    print(f"ratio (devtune / read_json throughput): {base_s / ours_s:.2f}x  (goal >= 0.5x)")


if __name__ == "__main__":
    main()

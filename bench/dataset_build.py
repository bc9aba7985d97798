"""Benchmark: one team's dataset build over 1M suggestions and a 10k-commit repository.

    python bench/dataset_build.py [--suggestions 1000000] [--commits 10000] [--dir /tmp/devtune-bench]
                                  [--compare-rows 100000] [--cache]

1. Prepare (once; reused from --dir): a real git repository written with `git fast-import` (20 developers,
   300 modules growing by generated functions over a year), collected into a real store by the real git
   collector; then suggestions generated from those commits (each by the commit's author, shown up to a
   day before it, the cursor somewhere in the lines it added: 30% accepted, of which most were committed
   as suggested, some rewritten, some deleted, some never committed; 10% from Tabby, some partial) and
   stored through Store.apply_batch; a 32k-token byte-level BPE tokenizer with Qwen2.5-Coder's FIM tokens.
2. Measure: `build_datasets` for team:payments with the default [datasets] config, in a fresh child
   process so its peak RSS is its own: total seconds, seconds per stage and their shares.
   With --cache, the build the service runs: with the scope's build cache (state_dir/cache/datasets), measured
   twice, the cache removed first (a first night, which writes it) and then warm (a later night).
3. Compare, in the same run: near-duplicate removal on the same rows (the FIM and KTO rows of the build,
   before near-dup, first --compare-rows of them) with devtune's sketches vs a plain datasketch
   MinHashLSH pass (MinHash of the same byte 8-grams, 64 permutations, threshold 0.85, query-then-insert),
   and how far their verdicts agree.

Needs the bench extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START = datetime(2025, 6, 1, 8, 0, 0)
TEAM = "payments"
NOUNS = ("payment", "invoice", "transfer", "payout", "charge", "fee", "deposit", "refund", "ledger", "account",
         "balance", "customer", "merchant", "order", "card", "wallet", "budget", "statement", "tax", "rate")
VERBS = ("create", "settle", "cancel", "hold", "release", "capture", "void", "approve", "load", "save", "check",
         "compute", "apply", "merge", "split", "round", "format", "parse", "notify", "archive")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suggestions", type=int, default=1_000_000)
    parser.add_argument("--commits", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/devtune-bench"))
    parser.add_argument("--compare-rows", type=int, default=100_000)
    parser.add_argument("--compare-only", action="store_true", help="only step 3, on an already prepared --dir")
    parser.add_argument("--cache", action="store_true", help="measure with the build cache, cold then warm")
    parser.add_argument("--measure", choices=("plain", "cold", "warm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.dir / f"{args.commits}c-{args.suggestions}s"
    if args.measure:
        return measure(folder, args.measure)
    if args.compare_only:
        compare_near_dup(folder, args.compare_rows)
        return 0
    prepare(folder, args.commits, args.suggestions)
    for how in ("cold", "warm") if args.cache else ("plain",):
        print(f"measuring: build_datasets(team:{TEAM}) in a child process"
              + ("" if how == "plain" else f", {how} build cache"), flush=True)
        child = subprocess.run([sys.executable, __file__, "--measure", how, "--dir", str(args.dir), "--commits",
                                str(args.commits), "--suggestions", str(args.suggestions)], capture_output=True,
                               text=True)
        sys.stderr.write(child.stderr[-4000:])
        if child.returncode != 0:
            print(child.stdout)
            return child.returncode
        result = json.loads(child.stdout.strip().splitlines()[-1])
        report_build(result)
    compare_near_dup(folder, args.compare_rows)
    return 0


# -- 1. prepare ----------------------------------------------------------------------------------------------

def prepare(folder: Path, n_commits: int, n_suggestions: int) -> None:
    marker = folder / "prepared.json"
    if marker.is_file():
        print(f"reusing {folder} ({marker.read_text().strip()})", flush=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rng = random.Random(11)
    commits = write_repo(folder / "repo", n_commits, rng)
    print(f"repository: {n_commits:,} commits in {time.monotonic() - started:.0f}s", flush=True)
    config = write_bench_config(folder)
    from daemon import jobs
    from daemon.config import load_config
    from pipelines.store.db import Store

    cfg = load_config(config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    t = time.monotonic()
    result = jobs.collect(store, cfg)
    assert result["error"] is None, result["error"]
    print(f"collected the repository in {time.monotonic() - t:.0f}s", flush=True)
    t = time.monotonic()
    n = store_generated_suggestions(store, commits, n_suggestions, rng)
    print(f"stored {n:,} suggestions in {time.monotonic() - t:.0f}s", flush=True)
    store.close()
    t = time.monotonic()
    write_tokenizer(folder / "tokenizer")
    print(f"tokenizer in {time.monotonic() - t:.0f}s", flush=True)
    marker.write_text(json.dumps({"commits": n_commits, "suggestions": n}) + "\n")


def function_source(rng: random.Random) -> str:
    verb, noun, other = rng.choice(VERBS), rng.choice(NOUNS), rng.choice(NOUNS)
    name = f"{verb}_{noun}_{rng.randrange(10_000)}"
    lines = [f"def {name}({noun}, {other}_id, limit={rng.randrange(1, 500)}):",
             f'    """{verb.capitalize()} the {noun} for one {other}."""']
    for _ in range(rng.randint(2, 7)):
        kind = rng.random()
        var = f"{rng.choice(NOUNS)}_{rng.choice(('total', 'count', 'id', 'amount', 'items'))}"
        if kind < 0.3:
            lines.append(f"    {var} = {noun}.get({other}_id, {rng.randrange(100)}) * {rng.randrange(2, 9)}")
        elif kind < 0.5:
            lines += [f"    if {var} > limit:", f'        raise ValueError("{noun} {var} over limit: %s" % {var})']
        elif kind < 0.7:
            lines.append(f"    log.info(\"{verb}_{noun}\", {other}_id={other}_id, {var}={var})")
        elif kind < 0.85:
            lines += [f"    for item in {noun}.{rng.choice(VERBS)}({other}_id):",
                      f"        {var} += item.{rng.choice(NOUNS)}_{rng.choice(('amount', 'count'))}"]
        else:
            lines.append(f"    {var} = round({var} / {rng.randrange(2, 100)}, {rng.randrange(1, 4)})")
    lines.append(f"    return {noun}")
    return "\n".join(lines) + "\n"


def write_repo(path: Path, n_commits: int, rng: random.Random, step: timedelta | None = None) -> list[dict[str, Any]]:
    """A git repository made with one `git fast-import`, commits `step` apart (default: spread over a year);
    returns each commit's author, time and changes."""
    modules = [f"{rng.choice(('core', 'api', 'jobs', 'billing', 'ledger'))}/{noun}_{i}.py"
               for i, noun in enumerate(rng.choice(NOUNS) for _ in range(300))]
    files: dict[str, list[str]] = {}
    developers = [f"dev{i:02d}@example.com" for i in range(20)]
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "remote", "add", "origin", "git@github.com:acme/payments.git"], check=True)
    step = step or timedelta(days=365) / n_commits
    out: list[dict[str, Any]] = []
    proc = subprocess.Popen(["git", "-C", str(path), "fast-import", "--quiet"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    for c in range(n_commits):
        when = START + step * c
        dev = rng.choice(developers)
        changes = []
        stream = []
        for module in rng.sample(modules, rng.choice((1, 1, 2, 3))):
            lines = files.setdefault(module, ['"""Generated module."""\n', "\n", "import logging\n", "\n",
                                              'log = logging.getLogger(__name__)\n'])
            fn = ["\n", "\n", *function_source(rng).splitlines(keepends=True)]
            at = len(lines)
            if len(lines) > 40 and rng.random() < 0.5:  # insert between two functions, not only at the end
                starts = [i for i, ln in enumerate(lines) if ln.startswith("def ") and i > 5]
                at = rng.choice(starts) - 2 if starts else at
            lines[at:at] = fn
            first = at + 3  # 1-based first added non-blank line: the def
            changes.append({"path": module, "first": first, "last": at + len(fn),
                            "content": "".join(lines)})
            data = "".join(lines).encode()
            stream.append(f"M 100644 inline {module}\ndata {len(data)}\n".encode() + data + b"\n")
        stamp = int((when - datetime(1970, 1, 1)).total_seconds())
        message = f"change {c}".encode()
        who = f"{dev.split('@')[0]} <{dev}> {stamp} +0000"
        header = (f"commit refs/heads/main\nauthor {who}\ncommitter {who}\ndata {len(message)}\n").encode()
        header += message + b"\n"
        proc.stdin.write(header + b"".join(stream) + b"\n")
        out.append({"developer": dev, "when": when, "changes": changes})
    proc.stdin.close()
    assert proc.wait() == 0
    subprocess.run(["git", "-C", str(path), "checkout", "-q", "main"], check=True)
    return out


def write_bench_config(folder: Path) -> Path:
    from daemon.config import render_config

    config = folder / "config.toml"
    config.write_text(render_config(
        {"": {"state_dir": str(folder / "state"), "base_model": str(folder / "tokenizer")},
         "collect": {"max_file_bytes": 4 << 20}},
        sources=[{"kind": "git", "path": str(folder / "repo"), "name": "repo"}],
        teams=[{"name": TEAM, "members": [f"dev{i:02d}@example.com" for i in range(20)], "repos": ["acme/payments"]}]))
    return config


def store_generated_suggestions(store: Any, commits: list[dict[str, Any]], total: int, rng: random.Random) -> int:
    """Suggestions shown to each commit's author before it, with the cursor in the lines it added."""
    from collectors.base import Cursor
    from pipelines.store.db import Rows
    from pipelines.store.schema import SuggestionRow

    def batch(rows: list[dict[str, Any]]) -> Rows:
        out = Rows()
        for r in rows:
            out.add(SuggestionRow(**r))
        return out

    per_commit = total / len(commits)
    rows: list[dict[str, Any]] = []
    done, owed = 0, 0.0
    ingested = datetime(2026, 7, 1)
    for c in commits:
        owed += per_commit
        for _ in range(int(owed)):
            rows.append(suggestion(c, rng, done, ingested))
            done += 1
        owed -= int(owed)
        if len(rows) >= 20_000:
            store.apply_batch("bench", batch(rows), Cursor(stream="bench"))
            rows = []
    store.apply_batch("bench", batch(rows), Cursor(stream="bench"))
    return done


def suggestion(c: dict[str, Any], rng: random.Random, n: int, ingested: datetime) -> dict[str, Any]:
    change = rng.choice(c["changes"])
    lines = change["content"].splitlines(keepends=True)
    j = rng.randint(change["first"], change["last"]) - 1  # 0-based cursor line, inside the added lines
    line = lines[j] if j < len(lines) else "\n"
    cut = rng.randint(len(line) - len(line.lstrip()), max(len(line) - 1, 0))  # cursor within the line
    before, after = "".join(lines[max(0, j - 40): j]) + line[:cut], lines[j + 1: j + 21]
    truth = line[cut:]
    shown = c["when"] - timedelta(hours=rng.uniform(0.05, 20))
    accepted = rng.random() < 0.3
    tabby = rng.random() < 0.1
    fate = rng.random()
    suffix = "".join(after)
    if not accepted:
        completion = rng.choice(lines).lstrip() or "pass\n"
    elif fate < 0.65:  # committed as suggested (sometimes with the next line too)
        completion = truth + ("".join(lines[j + 1: j + 2]) if rng.random() < 0.3 else "")
        if completion != truth:
            suffix = "".join(lines[j + 2: j + 22])
    elif fate < 0.72:  # touched up before the commit (a small edit: still "kept")
        completion = truth.replace("_", "", 1) if "_" in truth else truth.rstrip("\n") + "  # ok\n"
    elif fate < 0.8:  # rewritten before the commit
        completion = rng.choice(lines).lstrip() or "pass\n"
    elif fate < 0.9:  # accepted between two committed lines, then deleted
        before, truth, completion = "".join(lines[max(0, j - 40): j]), "", "    print('debug')\n"
        suffix = "".join(lines[j: j + 20])
    else:  # shown long before any commit of its author: nothing to check it against
        shown = c["when"] - timedelta(days=5)
        completion = truth or "pass\n"
    partial = tabby and accepted and rng.random() < 0.3
    path = change["path"]
    return {
        "id": f"b{n}", "source": "bench", "source_kind": "tabby" if tabby else "continue",
        "event_kind": "completion" if tabby else "autocomplete", "shown_at": shown, "developer": c["developer"],
        "team": TEAM, "repo": "acme/payments",
        "filepath": path if tabby else f"file:///home/{c['developer'].split('@')[0]}/src/payments/{path}",
        "language": "python", "accepted": accepted, "partial": partial, "prefix": before, "prefix_compiled": before,
        "prefix_recovery": "raw", "suffix": suffix or "\n", "completion": completion, "model": "bench",
        "ingested_at": ingested,
    }


def write_tokenizer(folder: Path) -> None:
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.rglob("*.py"))[:1500]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32_000, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


# -- 2. measure ----------------------------------------------------------------------------------------------

def measure(folder: Path, how: str) -> int:
    import logging

    from daemon.config import load_config
    from pipelines.datasets.build import build_datasets
    from pipelines.datasets.cache import cache_dir
    from pipelines.progress import peak_rss_mb
    from pipelines.scope import team
    from pipelines.store.db import Store
    from pipelines.tokens import load_base_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = load_config(folder / "config.toml")
    store = Store.open(cfg.state_dir / "store.duckdb")
    store.con.execute("DELETE FROM suggestion_links")  # link from scratch, as a first build would
    tokenizer = load_base_tokenizer(str(folder / "tokenizer"))
    # A build writes into a new folder (a run directory, or a fresh one under state_dir/exports): replacing the
    # previous run's 2.5 GB of files here cost the write stage ~3 s of unlinking that a real build never pays.
    shutil.rmtree(folder / "data", ignore_errors=True)
    cache = None if how == "plain" else cache_dir(cfg.state_dir)
    if how == "cold" and cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    started = time.monotonic()
    report = build_datasets(store, team(TEAM), cfg.datasets, tokenizer, folder / "data", cache)
    seconds = time.monotonic() - started
    store.close()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "report": report.as_dict(), "cpus": os.cpu_count(),
                      "manifest": json.loads((folder / "data" / "manifest.json").read_text())}, default=str))
    return 0


def report_build(result: dict[str, Any]) -> None:
    r, m = result["report"], result["manifest"]
    total = result["seconds"]
    print(f"\nbuild_datasets(team:{TEAM}): {total:.1f}s wall, peak RSS {result['peak_rss_mb']:,.0f} MB "
          f"({result['cpus']} CPUs; goal: under 120 s)")
    print(f"  input: {m['suggestions']:,} suggestions (accept rate {m['accept_rate']:.1%}), links {r['links']}")
    for stage, s in r["seconds"].items():
        print(f"  {stage:<9} {s:8.1f}s  {s / total:6.1%}")
    print("  rows: " + ", ".join(f"{name} {sum(c.values()):,}" for name, c in r["files"].items()))
    print(f"  dropped: {r['dropped']}")
    print(f"  token counts: {m['token_counts']}; KTO weights {r['kto']}")


# -- 3. compare near-dup -------------------------------------------------------------------------------------

def compare_near_dup(folder: Path, limit: int) -> None:
    """Ours vs a plain datasketch MinHashLSH pass, on the same FIM and KTO rows the build deduplicated."""
    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from daemon.config import load_config
    from pipelines.datasets.dpo import pair_examples
    from pipelines.datasets.outcomes import outcomes, sides
    from pipelines.datasets.paths import PathIndex
    from pipelines.datasets.quality import EMPTY, band_keys, near_duplicates, near_text, sketch
    from pipelines.datasets.sft import accepted_examples
    from pipelines.scope import team
    from pipelines.store.db import Store

    cfg = load_config(folder / "config.toml")
    store = Store.open(cfg.state_dir / "store.duckdb")
    dropped: Counter[str] = Counter()
    items = list(outcomes(store.scope_suggestions(team(TEAM), cfg.datasets.max_prefix_chars,
                                                  cfg.datasets.max_suffix_chars),
                          PathIndex.build(store.repo_paths()), cfg.datasets, dropped))
    items.sort(key=lambda o: (o.ts, o.id))  # as build_datasets does: the store streams them unsorted
    store.close()
    fim = list(accepted_examples(items, dropped))
    _, unpaired = pair_examples(sides(items), cfg.datasets.max_pairs_per_context, dropped)
    rows = sorted([(e.ts, e.prefix, e.middle, e.suffix) for e in fim]
                  + [(k.ts, k.prefix, k.text, k.suffix) for k in unpaired])[:limit]
    texts = [near_text(p, m, s) for _, p, m, s in rows]
    threshold = cfg.datasets.near_dup_threshold

    t = time.monotonic()
    sig = sketch(texts)
    ours_window = near_duplicates(sig, sig, threshold)  # the window condition alone, as datasketch checks
    ours_window_s = time.monotonic() - t
    t = time.monotonic()
    both = near_duplicates(sig, sketch([m for _, _, m, _ in rows]), threshold)
    ours_s = ours_window_s + time.monotonic() - t

    # datasketch's fast path: MinHash.bulk shares one set of permutations across all rows.
    t = time.monotonic()
    shingled = []
    for text in texts:
        data = text.encode().ljust(8, b"\x00")  # near_text already collapsed whitespace
        shingled.append([data[k:k + 8] for k in range(len(data) - 7)])
    minhashes = MinHash.bulk(shingled, num_perm=64, seed=1)
    lsh = MinHashLSH(threshold=threshold, num_perm=64)
    theirs = np.zeros(len(texts), dtype=bool)
    for i, m in enumerate(minhashes):
        if lsh.query(m):
            theirs[i] = True
        else:
            lsh.insert(str(i), m, check_duplication=False)
    theirs_s = time.monotonic() - t
    n = len(texts)
    agree = (ours_window == theirs).mean()
    print(f"\nnear-dup on {n:,} rows (FIM + KTO, oldest first, threshold {threshold}):")
    print(f"  devtune sketches, window only      {ours_window_s:7.1f}s  {n / ours_window_s:10,.0f} rows/s  "
          f"{ours_window.sum():,} near-duplicates")
    print(f"  devtune sketches, window + middle  {ours_s:7.1f}s  {n / ours_s:10,.0f} rows/s  {both.sum():,}")
    print(f"  datasketch MinHashLSH (64 perms)   {theirs_s:7.1f}s  {n / theirs_s:10,.0f} rows/s  {theirs.sum():,}")
    print(f"  speed-up (window only / with middle): {theirs_s / ours_window_s:.1f}x / {theirs_s / ours_s:.1f}x; "
          f"same verdict on {agree:.2%} of rows (flagged by both {(ours_window & theirs).sum():,}, "
          f"only devtune {(ours_window & ~theirs).sum():,}, only datasketch {(~ours_window & theirs).sum():,}); "
          f"rows too short to sketch {int(((sig == EMPTY).all(axis=1)).sum())}")
    # Who is right where they disagree: the exact Jaccard of a row with the earlier rows either method could
    # have matched it with (sharing one of devtune's bands, or returned by datasketch's query).
    bands = band_keys(sig)
    rng = random.Random(5)
    for label, where in (("only devtune", ours_window & ~theirs), ("only datasketch", ~ours_window & theirs)):
        rows_at = np.flatnonzero(where)
        sample = sorted(rng.sample(list(rows_at), min(200, len(rows_at))))
        right = 0
        for i in sample:
            earlier = set(np.flatnonzero((bands[:i] == bands[i]).any(axis=1)).tolist())
            earlier |= {int(k) for k in lsh.query(minhashes[i]) if int(k) < i}
            mine = set(shingled[i])
            best = max((len(mine & set(shingled[j])) / len(mine | set(shingled[j])) for j in earlier), default=0.0)
            right += best >= threshold
        if sample:
            print(f"  {label}: {len(rows_at):,} rows; in a sample of {len(sample)}, {right / len(sample):.0%} have an "
                  f"earlier row at exact Jaccard >= {threshold}")


if __name__ == "__main__":
    sys.exit(main())

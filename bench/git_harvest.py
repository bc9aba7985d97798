"""Git harvest (commits, per-file zero-context diffs and file contents, scrubbed, into DuckDB) against a bare
`git log -p` over the same history, both in one run.

    python bench/git_harvest.py --repo /path/to/a/real/repository
    python bench/git_harvest.py                      # builds a history from real source files (see below)
    python bench/git_harvest.py --against /tmp/devtune-main --reps 4   # before/after in one run

--against runs the harvest with another devtune checkout's code (`git archive main | tar -x -C DIR`) and
this one's, alternating, each in a fresh process, and prints the ratios of both: on a shared machine only
numbers taken side by side compare. It also prints CPU seconds (the harvest's process and its git children
against `git log -p`'s), which the other load on the machine moves less than wall time.

Each measurement also times the git collector alone (`GitCollector.collect`: `git log`, `git cat-file` and
parsing, nothing scrubbed or stored), the part of the harvest that collectors/gitlog.py owns.

With no --repo the script builds one: a repository whose commits replay real Python files (the
installed packages' sources) in a realistic pattern: each commit adds or rewrites 1-4 files, most by
changing a span of lines, some by adding a whole file, by a handful of authors over two years.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

# --against measures another checkout's code with this script: its worker imports devtune from that tree.
sys.path.insert(0, os.environ.get("DEVTUNE_BENCH_TREE") or str(Path(__file__).resolve().parent.parent))

from collectors.base import Limits
from collectors.gitlog import GitCollector
from daemon import jobs
from daemon.config import load_config, render_config
from pipelines.store.db import Store

AUTHORS = [("Alice", "alice@example.com"), ("Bob", "bob@example.com"), ("Chen", "chen@example.com"),
           ("Dana", "dana@example.com"), ("Eve", "eve@example.com")]


def build_repo(path: Path, n_commits: int) -> None:
    rng = random.Random(5)
    site = Path(sysconfig.get_paths()["purelib"])
    sources = [p for p in sorted(site.rglob("*.py")) if 2_000 < p.stat().st_size < 60_000][:4000]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sources]
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    # git fast-import writes the whole history in one process (a `git commit` per commit would take minutes).
    stream = []
    files: dict[str, list[str]] = {}
    t0 = 1_700_000_000
    for i in range(n_commits):
        name, email = rng.choice(AUTHORS)
        when = t0 + i * 1800 + rng.randint(0, 900)
        changes = []
        for _ in range(rng.randint(1, 4)):
            if not files or rng.random() < 0.15:
                k = rng.randrange(len(texts))
                rel = f"pkg{k % 40}/{sources[k].name}"
                files[rel] = texts[k].splitlines(keepends=True)
            else:
                rel = rng.choice(sorted(files))
                lines = files[rel]
                donor = rng.choice(texts).splitlines(keepends=True)
                at = rng.randrange(max(1, len(lines)))
                span = rng.randint(1, 12)
                start = rng.randrange(max(1, len(donor) - span))
                lines[at:at + rng.randint(0, 6)] = donor[start:start + span]
            changes.append(rel)
        msg = f"change {i}: {', '.join(sorted(set(changes)))}\n".encode()
        stream.append(f"commit refs/heads/main\nauthor {name} <{email}> {when} +0000\n"
                      f"committer {name} <{email}> {when} +0000\ndata {len(msg)}\n".encode() + msg)
        for rel in sorted(set(changes)):
            data = "".join(files[rel]).encode()
            stream.append(f"M 100644 inline {rel}\ndata {len(data)}\n".encode() + data + b"\n")
    subprocess.run(["git", "fast-import", "--quiet"], input=b"".join(stream), cwd=path, check=True)
    subprocess.run(["git", "checkout", "-q", "main"], cwd=path, check=True)


def bare_git_log(repo: Path, skip: tuple[str, ...] = ()) -> float:
    """Seconds `git log -p` takes over the history, leaving out the paths in `skip` (files whose blobs a snapshot
    lacks: `git log -p` stops at the first one, where the harvest lists them without a patch)."""
    started = time.monotonic()
    with open(os.devnull, "wb") as null:
        subprocess.run(["git", "log", "-p", "HEAD", "--", ".", *(f":(exclude){p}" for p in skip)], cwd=repo,
                       stdout=null, check=True)
    return time.monotonic() - started


def harvest(repo: Path, site: Path) -> tuple[float, dict[str, object]]:
    site.mkdir(parents=True)
    config = site / "config.toml"
    config.write_text(render_config({"": {"state_dir": "state"}},
                                    sources=[{"kind": "git", "path": str(repo), "name": "bench"}]))
    cfg = load_config(config)
    started = time.monotonic()
    store = Store.open(cfg.state_dir / "store.duckdb")
    result = jobs.collect(store, cfg)
    report = jobs.status(store, cfg)
    store.close()
    assert result["error"] is None, result["error"]
    return time.monotonic() - started, report


def collector_alone(repo: Path) -> tuple[float, int]:
    """Seconds the git collector takes to read the whole history with nothing stored, and what it read."""
    started = time.monotonic()
    n = sum(len(b.events) + len(b.rejects) for b in GitCollector().collect(repo, "HEAD", None, Limits()))
    return time.monotonic() - started, n


def measure(repo: Path, site: Path, skip: tuple[str, ...]) -> dict[str, object]:
    """One side by side measurement: `git log -p`, the collector alone, then the harvest into a fresh store,
    wall and CPU seconds."""
    def cpu(who: int) -> float:
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime

    shutil.rmtree(site, ignore_errors=True)
    children = cpu(resource.RUSAGE_CHILDREN)
    base_s = bare_git_log(repo, skip)
    base_cpu = cpu(resource.RUSAGE_CHILDREN) - children
    before = cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN)
    ours_s, report = harvest(repo, site)
    ours_cpu = cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN) - before
    collector_s, _ = collector_alone(repo)
    return {"base_s": base_s, "harvest_s": ours_s, "base_cpu_s": base_cpu, "harvest_cpu_s": ours_cpu,
            "collector_s": collector_s, "commits": report["commits"]["total"],  # type: ignore[index]
            "quarantined": report["quarantined"]["total"], "scrubbed": report["scrubbed"]}  # type: ignore[index]


def against(repo: Path, other: Path, reps: int, workdir: Path, skip: tuple[str, ...]) -> None:
    trees = {"before": other.resolve(), "now": Path(__file__).resolve().parent.parent}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for rep in range(reps):
        for name in (list(trees) if rep % 2 == 0 else list(reversed(trees))):
            site = workdir / f"site-{name}"
            out = subprocess.run([sys.executable, __file__, "--repo", str(repo), "--worker", str(site),
                                  *(f"--skip={p}" for p in skip)],
                                 capture_output=True, text=True, cwd=trees[name],
                                 env={**os.environ, "DEVTUNE_BENCH_TREE": str(trees[name])})
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(r)
            print(f"  rep {rep + 1}/{reps} {name:>6}: git log -p {r['base_s']:.2f}s, harvest {r['harvest_s']:.2f}s "
                  f"= {r['harvest_s'] / r['base_s']:.2f}x; CPU {r['base_cpu_s']:.2f}s vs {r['harvest_cpu_s']:.2f}s "
                  f"= {r['harvest_cpu_s'] / r['base_cpu_s']:.2f}x; collector alone {r['collector_s']:.2f}s "
                  f"= {r['collector_s'] / r['base_s']:.2f}x", flush=True)
    def median(rs: list[dict[str, Any]], key: Any) -> float:
        return statistics.median(key(r) for r in rs)

    for name, rs in results.items():
        print(f"{name:>6}: median harvest {median(rs, lambda r: r['harvest_s']):.2f}s, git log -p "
              f"{median(rs, lambda r: r['base_s']):.2f}s, ratio "
              f"{median(rs, lambda r: r['harvest_s'] / r['base_s']):.2f}x, CPU ratio "
              f"{median(rs, lambda r: r['harvest_cpu_s'] / r['base_cpu_s']):.2f}x; collector alone "
              f"{median(rs, lambda r: r['collector_s']):.2f}s = "
              f"{median(rs, lambda r: r['collector_s'] / r['base_s']):.2f}x; {rs[0]['commits']:,} commits stored, "
              f"{rs[0]['quarantined']:,} quarantined; scrubbed {rs[0]['scrubbed']}")
    print("now / before, harvest time per repetition: "
          + ", ".join(f"{n['harvest_s'] / b['harvest_s']:.2f}" for b, n in zip(results["before"], results["now"],
                                                                              strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repo", type=Path, help="a repository to harvest (default: build one)")
    parser.add_argument("--commits", type=int, default=5000, help="commits of the built repository")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/devtune-bench-git"))
    parser.add_argument("--against", type=Path, help="another devtune checkout to measure side by side")
    parser.add_argument("--reps", type=int, default=4, help="repetitions with --against")
    parser.add_argument("--skip", action="append", default=[], metavar="PATHSPEC",
                        help="paths `git log -p` leaves out (blobs missing from a snapshot); repeatable")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one measurement, as JSON, into this site
    args = parser.parse_args()
    if args.worker is not None:
        logging.disable(logging.INFO)
        print(json.dumps(measure(args.repo, args.worker, tuple(args.skip))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    repo = args.repo
    if repo is None:
        repo = args.workdir / f"repo-{args.commits}"
        if not repo.exists():
            print(f"building a {args.commits:,}-commit repository from real source files in {repo}", flush=True)
            build_repo(repo, args.commits)
    n = int(subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=repo, capture_output=True, text=True,
                           check=True).stdout)
    bare_git_log(repo, tuple(args.skip))  # warm the page cache and git's pack index once
    if args.against is not None:
        print(f"{n:,} commits; before = {args.against}, now = this checkout", flush=True)
        against(repo, args.against, args.reps, args.workdir, tuple(args.skip))
        return
    shutil.rmtree(args.workdir / "site", ignore_errors=True)
    base_s = bare_git_log(repo, tuple(args.skip))
    print(f"git log -p:       {n:,} commits in {base_s:.2f}s", flush=True)
    ours_s, report = harvest(repo, args.workdir / "site")
    print(f"devtune harvest:  {report['commits']['total']:,} commits in {ours_s:.2f}s "  # type: ignore[index]
          f"(files, diffs and contents stored, scrubbed {report['scrubbed']}; "
          f"{report['quarantined']['total']:,} quarantined)", flush=True)  # type: ignore[index]
    collector_s, n = collector_alone(repo)
    print(f"collector alone:  {n:,} commits in {collector_s:.2f}s (read and parsed, nothing stored)", flush=True)
    print(f"ratio (devtune / git log -p time): {ours_s / base_s:.2f}x  (goal <= 3x); collector alone "
          f"{collector_s / base_s:.2f}x")


if __name__ == "__main__":
    main()

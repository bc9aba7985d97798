"""`devtune run` at rest: resident memory and CPU while every collector watches and nothing happens.

    python bench/idle_service.py --seconds 60 --worker-idle 20

Starts the real service on a config with a Continue folder (1,000 events), a Tabby root, a git repository
(the demo's sample) and the HTTP destination enabled; waits for READY and the first collect; then reads
/proc (RSS of the service and of its children; CPU: utime + stime, children included) twice: over a window
right after the collect, while the store worker is up, and over a window at rest, once the worker has been
idle for [api] worker_idle_s (--worker-idle; 300 s by default in a real config) and stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.config import render_config
from daemon.sample import make_sample

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # utime, stime, cutime, cstime are fields 14-17 (1-based) of /proc/pid/stat
    return sum(int(f) for f in fields[11:15]) / ticks


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident MB; field "RssAnon" is the process's own memory, "RssFile" the shared libraries' pages it has
    touched (DuckDB's library alone is ~40 MB of those: shared and reclaimable, but counted in RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry))
    return found


def tree_rss_mb(pid: int) -> float:
    total = 0.0
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_mb(p)
    return total


def window(pid: int, seconds: float, label: str) -> None:
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    peak = tree_rss_mb(pid)
    while time.monotonic() - t0 < seconds:
        time.sleep(1)
        peak = max(peak, tree_rss_mb(pid))
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    threads = len(os.listdir(f"/proc/{pid}/task"))
    kids = children(pid)
    print(f"{label} over {t1 - t0:.0f}s: RSS {tree_rss_mb(pid):.0f} MB with {len(kids)} child process(es) "
          f"(peak {peak:.0f} MB); the service itself {rss_mb(pid):.0f} MB (anonymous {rss_mb(pid, 'RssAnon'):.0f}, "
          f"shared library pages {rss_mb(pid, 'RssFile'):.0f}), {threads} threads; "
          f"CPU {100 * (cpu1 - cpu0) / (t1 - t0):.2f}% of one core ({cpu1 - cpu0:.2f} CPU-s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--worker-idle", type=float, default=20.0, help="[api] worker_idle_s for this run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/devtune-bench-idle"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    sample = make_sample(args.workdir / "sample", n_commits=72, n_events=1000)
    (args.workdir / "tabby" / "events").mkdir(parents=True)
    sources = [{"kind": "git", "path": str(sample.repo), "name": "repo"},
               {"kind": "tabby", "path": str(args.workdir / "tabby"), "name": "tabby"}]
    sources += [{"kind": "continue", "path": str(p), "name": f"continue-{e}", "developer": e}
                for e, p in sample.continue_dirs.items()]
    config = args.workdir / "config.toml"
    config.write_text(render_config({"": {"state_dir": "state"},
                                     "api": {"port": 0, "worker_idle_s": args.worker_idle},
                                     "continue_http": {"enabled": True}}, sources=sources))
    sock_dir = tempfile.mkdtemp(prefix="dt-", dir="/tmp")
    sock_path = os.path.join(sock_dir, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(120)
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config), "run"], cwd=ROOT,
                            env={**os.environ, "NOTIFY_SOCKET": sock_path}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        info = json.loads((args.workdir / "state" / "service.json").read_text())
        token = (args.workdir / "state" / "api.token").read_text().strip()
        req = urllib.request.Request(info["url"] + "/api/status", headers={"Authorization": f"Bearer {token}"})
        while True:  # the first collect runs at start: wait until it is done
            with urllib.request.urlopen(req, timeout=30) as resp:
                if json.loads(resp.read())["suggestions"]["total"] >= 1000:
                    break
            time.sleep(0.5)
        time.sleep(5)  # let the debounced collects the first one caused settle
        window(proc.pid, min(args.seconds, args.worker_idle * 0.75), "store worker up")
        deadline = time.monotonic() + args.worker_idle + 60
        while children(proc.pid) and time.monotonic() < deadline:
            time.sleep(1)
        window(proc.pid, args.seconds, "at rest")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        notify.close()
        os.unlink(sock_path)
        os.rmdir(sock_dir)


if __name__ == "__main__":
    main()

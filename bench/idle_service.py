"""`devtune run` at rest: resident memory and CPU while every collector watches and nothing happens.

    python bench/idle_service.py --seconds 60

Starts the real service on a config with a Continue folder (1,000 events), a Tabby root, a git repository
(the demo's sample) and the HTTP destination enabled; waits for READY and the first collect; then reads
/proc/<pid> (RSS; utime + stime, children included) over the idle window.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=60.0)
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
    config.write_text(render_config({"": {"state_dir": "state"}, "api": {"port": 0},
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
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        peak = rss_mb(proc.pid)
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1)
            peak = max(peak, rss_mb(proc.pid))
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        threads = len(os.listdir(f"/proc/{proc.pid}/task"))
        print(f"idle service over {t1 - t0:.0f}s: RSS {rss_mb(proc.pid):.0f} MB (peak {peak:.0f} MB), "
              f"CPU {100 * (cpu1 - cpu0) / (t1 - t0):.2f}% of one core ({cpu1 - cpu0:.2f} CPU-s), {threads} threads; "
              f"of the RSS, anonymous {rss_mb(proc.pid, 'RssAnon'):.0f} MB, "
              f"shared library pages {rss_mb(proc.pid, 'RssFile'):.0f} MB")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        notify.close()
        os.unlink(sock_path)
        os.rmdir(sock_dir)


if __name__ == "__main__":
    main()

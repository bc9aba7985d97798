"""Serving gateway: its added latency over the builtin backend, and completions/s with concurrent developers.

    python bench/gateway.py [--requests 200] [--seconds 20] [--max-tokens 16] [--concurrency 1,4,16]

The base is the benchmarks' 5M Llama (random weights: it never emits its end token, so every completion runs
to max_tokens and each costs the same); a team adapter and four personal ones (rank 8, random) are
promoted in a fresh registry; sixteen developers hold tokens, four of them with their own adapter. Prompts
are the benchmarks' FIM rows with the prefix cut at a random point (bench/common.py "spread": 40-500 tokens).

1. Added latency: the same prompt, alternately straight to the backend object the gateway uses (the worker
   child's client, in this process) and through the gateway over HTTP on 127.0.0.1 (a kept-alive connection,
   token check, routing, the request log line appended and fsynced, JSON both ways). p50/p99 of each, and of
   the per-pair difference, at max_tokens 1 (the overhead alone) and --max-tokens.
2. Throughput: N concurrent developers, each sending its next request when the last is answered, for
   --seconds; completions/s and latency p50/p99 through the gateway.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import WORK, bench_model, bench_rows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def setup(max_tokens: int) -> tuple[Any, dict[str, str], list[str]]:
    from daemon import auth
    from daemon.config import load_config, render_config
    from daemon.gateway import start_gateway
    from pipelines.publish import registry
    from runs import random_adapter

    base = bench_model()
    site = WORK / "gateway"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    developers = [f"dev{i}@example.com" for i in range(16)]
    (site / "config.toml").write_text(render_config(
        {"": {"state_dir": "state", "base_model": str(base)},
         "serve": {"enabled": True, "port": 0, "max_tokens_limit": max(512, max_tokens)}},
        teams=[{"name": "payments", "members": developers}]))
    cfg = load_config(site / "config.toml")
    for seed, scope in enumerate(["team:payments"] + [f"dev:{d}" for d in developers[:4]]):
        adapter = random_adapter(base, site / f"adapter{seed}", seed, scale=0.05)
        registry.promote(cfg.state_dir, scope, registry.register(cfg.state_dir, scope, adapter,
                                                                 {"base_model": str(base)}))
    tokens = {d: auth.issue(cfg.state_dir, d)[0] for d in developers}
    gateway = start_gateway(cfg, port=0)
    while not gateway.backend.ready():
        time.sleep(0.1)
    prompts = [r["prompt"] for r in bench_rows("spread")]
    return gateway, tokens, prompts


class Client:
    """One editor's kept-alive connection to the gateway."""

    def __init__(self, gateway: Any, token: str):
        host, port = gateway.httpd.server_address[:2]
        self.conn = http.client.HTTPConnection(str(host), port, timeout=300)
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    def complete(self, prompt: str, max_tokens: int) -> tuple[str, str]:
        body = json.dumps({"model": "devtune", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        self.conn.request("POST", "/v1/completions", body=body, headers=self.headers)
        resp = self.conn.getresponse()
        data = json.loads(resp.read())
        assert resp.status == 200, data
        return data["choices"][0]["text"], resp.headers["X-Devtune-Adapter"]


def added_latency(gateway: Any, tokens: dict[str, str], prompts: list[str], n: int, max_tokens: int) -> dict[str, Any]:
    from pipelines.serve.backend import Delta, Job

    developer = "dev10@example.com"  # served the team adapter
    client = Client(gateway, tokens[developer])
    adapter = gateway.router.adapter_for(developer, "payments")
    rng = random.Random(0)
    direct, through = [], []
    for i in range(n):
        prompt = rng.choice(prompts)
        order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
        texts = {}
        for way in order:
            started = time.perf_counter()
            if way == "direct":
                events = gateway.backend.complete(Job(f"b{i}", prompt, adapter, max_tokens, 0.0, 1.0, ()))
                texts[way] = "".join(e.text for e in events if isinstance(e, Delta))
                direct.append((time.perf_counter() - started) * 1000)
            else:
                texts[way], _ = client.complete(prompt, max_tokens)
                through.append((time.perf_counter() - started) * 1000)
        assert texts["direct"] == texts["gateway"], texts  # the same work both ways
    diffs = [g - d for g, d in zip(through, direct, strict=True)]
    return {"max_tokens": max_tokens, "requests": n,
            "direct_p50_ms": percentile(direct, 0.5), "direct_p99_ms": percentile(direct, 0.99),
            "gateway_p50_ms": percentile(through, 0.5), "gateway_p99_ms": percentile(through, 0.99),
            "added_p50_ms": percentile(diffs, 0.5), "added_p99_ms": percentile(diffs, 0.99),
            "added_median_of_medians_ms": statistics.median(through) - statistics.median(direct)}


def throughput(gateway: Any, tokens: dict[str, str], prompts: list[str], concurrency: int, seconds: float,
               max_tokens: int) -> dict[str, Any]:
    developers = sorted(tokens)[:concurrency]
    latencies: list[float] = []
    labels: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def editor(i: int) -> None:
        client, rng = Client(gateway, tokens[developers[i]]), random.Random(i)
        while not stop.is_set():
            started = time.perf_counter()
            _, label = client.complete(rng.choice(prompts), max_tokens)
            with lock:
                latencies.append((time.perf_counter() - started) * 1000)
                labels.add(label)

    threads = [threading.Thread(target=editor, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"developers": concurrency, "completions": len(latencies), "completions_per_s": len(latencies) / elapsed,
            "tokens_per_s": len(latencies) * max_tokens / elapsed, "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99), "adapters": len(labels)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,16")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    gateway, tokens, prompts = setup(args.max_tokens)
    try:
        for d in tokens:  # every adapter loaded before anything is timed
            Client(gateway, tokens[d]).complete(prompts[0], 1)
        results: dict[str, Any] = {"latency": [], "throughput": []}
        for max_tokens in (1, args.max_tokens):
            r = added_latency(gateway, tokens, prompts, args.requests, max_tokens)
            results["latency"].append(r)
            print(f"added latency, max_tokens {max_tokens}, {r['requests']} pairs: direct p50 {r['direct_p50_ms']:.1f} "
                  f"p99 {r['direct_p99_ms']:.1f} ms; gateway p50 {r['gateway_p50_ms']:.1f} p99 "
                  f"{r['gateway_p99_ms']:.1f} ms; added per pair p50 {r['added_p50_ms']:.2f} p99 "
                  f"{r['added_p99_ms']:.2f} ms", flush=True)
        for c in (int(x) for x in args.concurrency.split(",")):
            r = throughput(gateway, tokens, prompts, c, args.seconds, args.max_tokens)
            results["throughput"].append(r)
            print(f"{c:>2} developers: {r['completions_per_s']:.1f} completions/s ({r['tokens_per_s']:.0f} tokens/s), "
                  f"latency p50 {r['p50_ms']:.0f} p99 {r['p99_ms']:.0f} ms, {r['adapters']} adapters in use",
                  flush=True)
        print(json.dumps(results))
    finally:
        gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

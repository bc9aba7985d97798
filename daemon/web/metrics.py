"""`/metrics` for Prometheus: read from the store and the registry at scrape time.

Counters are totals of what the store holds (ingested rows, quarantined lines, scrubbed secrets, runs,
gateway requests): the store is the one durable count, so a restart does not reset them the way in-process
counters would, and the service keeps no second bookkeeping. They can go down in one case: `devtune forget`
removes a person's rows, which Prometheus' rate() reads as a counter reset. Gateway figures arrive with the
collect of the gateway's request log (every [collect] interval_s).

A scrape costs a handful of aggregate queries (~15 ms on the demo's store, ~0.3 s at a million suggestions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from pipelines.config import Config
from pipelines.online.review import online_report
from pipelines.publish import registry
from pipelines.store import series
from pipelines.store.db import Store

# Completion latency buckets (s): an editor's autocomplete feels instant under ~0.3 s and gives up after a
# few seconds, so the resolution sits there.
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


class StoreCollector:
    """A prometheus_client custom collector: every family computed fresh from the store at scrape time."""

    def __init__(self, store: Store, cfg: Config):
        self.store, self.cfg = store, cfg

    def collect(self) -> Iterator[Metric]:
        store = self.store.cursor()  # a DuckDB cursor per scraping thread
        yield _family(CounterMetricFamily, "devtune_events_ingested", "Rows stored, per source and kind of row",
                      ["source", "kind"], series.ingested_by_source(store))
        counts = store.counts()
        yield _family(CounterMetricFamily, "devtune_events_quarantined", "Log lines quarantined, per source",
                      ["source"], {(k,): v for k, v in counts["quarantined"]["by_source"].items()})
        yield _family(CounterMetricFamily, "devtune_secrets_scrubbed", "Secrets replaced before storage, per kind",
                      ["kind"], {(k,): v for k, v in counts["scrubbed"].items()})
        yield _family(GaugeMetricFamily, "devtune_collect_lag_seconds",
                      "Seconds since a source's data last moved forward", ["source"],
                      {(k,): v for k, v in series.collect_lag_s(store).items()})
        yield _family(GaugeMetricFamily, "devtune_source_failures",
                      "Failed collects of a source since its last success", ["source"],
                      {(k,): h["failures"] for k, h in store.source_health().items()})
        yield _family(CounterMetricFamily, "devtune_runs", "Cycle runs, per kind of scope and status",
                      ["scope_kind", "status"], series.runs_by_outcome(store))
        yield from self._runs(store)
        yield from self._served()
        yield from self._online(store)
        yield from self._gateway(store)

    def _runs(self, store: Store) -> Iterator[Metric]:
        """Training throughput of each scope's latest trained run, and gate decisions of all runs."""
        speed: dict[tuple[str, ...], float] = {}
        for run in store.latest_runs_by_scope():
            stages = ((run["summary"].get("train") or {}).get("stages") or [])
            tokens = sum(s.get("tokens", 0) for s in stages)
            seconds = sum(s.get("seconds", 0.0) for s in stages)
            if seconds > 0:
                speed[(run["scope"],)] = tokens / seconds
        yield _family(GaugeMetricFamily, "devtune_training_tokens_per_second",
                      "Training tokens/s of each scope's latest run", ["scope"], speed)
        gates = Counter[tuple[str, ...]]()
        for run in store.runs(limit=100_000):
            gate = run["summary"].get("gate")
            if isinstance(gate, dict):
                gates[(run["scope"].split(":")[0], "promote" if gate.get("promote") else "keep")] += 1
        yield _family(CounterMetricFamily, "devtune_gate_decisions", "Gate decisions, per kind of scope",
                      ["scope_kind", "decision"], gates)

    def _served(self) -> Iterator[Metric]:
        served = registry.served(self.cfg.state_dir)
        yield _family(GaugeMetricFamily, "devtune_served_version", "1 for the version each scope serves",
                      ["scope", "version"], {(scope, s.version): 1 for scope, s in served.items()})
        field = Counter[tuple[str, ...]]()
        canaries = {}
        root = self.cfg.state_dir / "registry"
        for scope in sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
            for entry in registry.history(self.cfg.state_dir, scope):
                if entry.get("action") in ("canary_end", "field_verdict"):
                    field[(entry["action"], str(entry.get("outcome")))] += 1
            running = registry.canary(self.cfg.state_dir, scope)
            if running is not None:
                canaries[(scope, running.version)] = running.share
        yield _family(CounterMetricFamily, "devtune_field_decisions",
                      "Canary ends and personal-version verdicts, per outcome", ["decision", "outcome"], field)
        yield _family(GaugeMetricFamily, "devtune_canary_share", "The share of developers a running canary serves",
                      ["scope", "version"], canaries)

    def _online(self, store: Store) -> Iterator[Metric]:
        report: dict[str, Any] = online_report(store, self.cfg)
        shown, accepted, acceptance = {}, {}, {}
        for scope, versions in report.items():
            for version, m in versions.items():
                shown[(scope, version)] = m.get("shown", 0)
                accepted[(scope, version)] = m.get("accepted", 0)
                if m.get("acceptance") is not None:
                    acceptance[(scope, version)] = m["acceptance"]
        labels = ["scope", "version"]
        yield _family(CounterMetricFamily, "devtune_online_shown", "Suggestions shown, per serving version",
                      labels, shown)
        yield _family(CounterMetricFamily, "devtune_online_accepted", "Suggestions accepted, per serving version",
                      labels, accepted)
        yield _family(GaugeMetricFamily, "devtune_online_acceptance", "Acceptance rate, per serving version",
                      labels, acceptance)

    def _gateway(self, store: Store) -> Iterator[Metric]:
        stats = series.gateway_latencies(store, tuple(b * 1000 for b in LATENCY_BUCKETS_S))
        yield _family(CounterMetricFamily, "devtune_gateway_requests",
                      "Completion requests the gateway answered, per adapter and HTTP status", ["adapter", "status"],
                      {(a, str(s)): n for (a, s), n in stats["requests"].items()})
        histogram = HistogramMetricFamily("devtune_gateway_latency_seconds", "Gateway completion latency")
        buckets = [(f"{b:g}", n) for b, n in zip(LATENCY_BUCKETS_S, stats["buckets"], strict=True)]
        histogram.add_metric([], [*buckets, ("+Inf", stats["count"])], sum_value=stats["sum_ms"] / 1000)
        yield histogram


def _family(kind: Any, name: str, documentation: str, labels: list[str], values: Mapping[Any, float]) -> Metric:
    family = kind(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), float(value))
    return family


def render(store: Store, cfg: Config) -> bytes:
    """The Prometheus text exposition: devtune's families and the service process's own (RSS, CPU, fds)."""
    metrics = CollectorRegistry(auto_describe=False)
    metrics.register(StoreCollector(store, cfg))
    ProcessCollector(registry=metrics)
    return generate_latest(metrics)

"""What `devtune status` shows: store counts, what is served, recent runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines import registry
from pipelines.store import Store


def status(store: Store, state_dir: Path) -> dict[str, Any]:
    """One JSON-ready object; the keys `suggestions`, `commits`, `quarantined` and `served` are a contract
    that outside checks rely on (see README)."""
    report = store.counts()
    served = {}
    for scope, s in registry.served(state_dir).items():
        scores = s.lineage.get("eval", {})
        served[scope] = {
            "version": s.version,
            "path": str(s.path),
            "heldout_loss": scores.get("candidate", {}).get("heldout_loss"),
            "base_heldout_loss": scores.get("base", {}).get("heldout_loss"),
            "run_id": s.lineage.get("run_id"),
            "registered_at": s.lineage.get("registered_at"),
        }
    report["served"] = served
    report["runs"] = store.runs(limit=10)
    report["state_dir"] = str(state_dir)
    return report

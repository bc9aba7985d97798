"""What a team's cycle takes from its continued pretraining: the base its adapters train on, and where the
team adapter starts.

- `[pretrain] output = "adapter"`: the served cpt:<team> adapter is the team adapter's first stage. The next
  team cycle after a CPT is promoted starts from it (on every row, not warm from yesterday's adapter), and every
  later night continues warm from the team adapter, which descends from it; the base model stays the stock one.
- `[pretrain] output = "base"`: the served base:<team> model is the base of every adapter of the team (the
  team's and its developers'): adapters trained on the stock base are then neither a starting point nor a
  champion (`pipelines.cycle.same_base`), so the next cycle trains a fresh adapter and gates it against the
  team's base.
A version marked for retraining by `devtune forget` is never used: it read the forgotten developer's files.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from pipelines.config import Config
from pipelines.files import read_json
from pipelines.publish import registry


def team_base(cfg: Config, team: str, marked: Collection[tuple[str, str]] = ()) -> str:
    """The base model `team`'s adapters train on: its served base:<team> (made from the configured
    base_model), else base_model."""
    if cfg.pretrain.output != "base":
        return cfg.base_model
    served = registry.served(cfg.state_dir).get(f"base:{team}")
    if served is None or served.lineage.get("base_model") != cfg.base_model or \
            (served.scope, served.version) in marked:
        return cfg.base_model
    return str(served.path)


def pretrained_adapter(cfg: Config, team: str, marked: Collection[tuple[str, str]] = ()) -> registry.Served | None:
    """The team's served continued-pretraining adapter when `[pretrain] output = "adapter"`, else None."""
    if cfg.pretrain.output != "adapter":
        return None
    served = registry.served(cfg.state_dir).get(f"cpt:{team}")
    if served is None or served.lineage.get("base_model") != cfg.base_model or \
            (served.scope, served.version) in marked:
        return None
    return served


def descends_from(state_dir: Path, adapter: registry.Served, ancestor: registry.Served) -> bool:
    """Whether `adapter` was trained, through its chain of warm starts (lineage "init"), from `ancestor`."""
    init = adapter.lineage.get("init") or {}
    seen: set[tuple[str, str]] = set()
    while init.get("scope") and init.get("version"):
        at = (init["scope"], init["version"])
        if at == (ancestor.scope, ancestor.version):
            return True
        if at in seen:
            return False
        seen.add(at)
        init = (read_json(state_dir / "registry" / at[0] / at[1] / "lineage.json") or {}).get("init") or {}
    return False

"""`devtune demo` prepares everything offline; its config drives the real CLI (training is covered in test_cli)."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.config import load_config
from daemon.demo import DEMO_TEAM, prepare_demo
from support import devtune_json


def test_demo_builds_sample_data_a_tiny_model_and_a_config_the_cli_uses(tmp_path: Path) -> None:
    config = prepare_demo(tmp_path / "state", pretrain_steps=5)
    cfg = load_config(config)
    assert cfg.state_dir == tmp_path / "state"
    assert Path(cfg.base_model, "model.safetensors").is_file()
    assert [s.kind for s in cfg.sources] == ["git", "continue", "continue"]
    assert DEMO_TEAM in cfg.team_names()
    devtune_json("--config", str(config), "collect", "--json")
    status = devtune_json("--config", str(config), "status", "--json")
    meta = json.loads((tmp_path / "state" / "sample" / "sample.json").read_text())
    assert status["commits"]["total"] == meta["commits"] == 72
    assert status["suggestions"]["total"] + status["quarantined"]["total"] == meta["events"]
    assert status["quarantined"]["total"] == meta["malformed_lines"] == 2
    # a second prepare reuses everything and rewrites the same config
    assert prepare_demo(tmp_path / "state", pretrain_steps=5).read_text() == config.read_text()

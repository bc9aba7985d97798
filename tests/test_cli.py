"""The CLI end to end on sample data and the tiny model: collect, status contract, cycle, gate both ways."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipelines.sample import DEVELOPERS, make_sample
from support import Setup, devtune_json, run_devtune, write_config


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Setup:
    tmp = tmp_path_factory.mktemp("site")
    sample = make_sample(tmp / "sample", n_commits=30, n_events=160)
    sources: list[dict[str, Any]] = [{"kind": "git", "path": str(sample.repo), "name": "repo"}]
    sources += [{"kind": "continue", "path": str(folder), "name": f"continue-{email.split('@')[0]}",
                 "developer": email} for email, folder in sorted(sample.continue_dirs.items())]
    return write_config(tmp, sources, teams=[{"name": "payments", "members": [e for _, e in DEVELOPERS]}], overrides={
        "": {"base_model": str(tiny_model)},
        "datasets": {"max_row_tokens": 384, "max_prefix_chars": 800, "max_suffix_chars": 200,
                     "heldout_fraction": 0.15, "min_train_rows": 16, "min_heldout_rows": 4},
        "train": {"max_steps": 12, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 4},
        "evaluate": {"max_rows": 40, "batch_size": 8},
    })


def status(site: Setup) -> dict[str, Any]:
    result: dict[str, Any] = devtune_json("--config", str(site.config), "status", "--json")
    return result


def test_collect_is_idempotent_and_status_keeps_its_contract(site: Setup) -> None:
    first = run_devtune("--config", str(site.config), "collect")
    assert first.returncode == 0, first.stderr
    report = status(site)
    sug = report["suggestions"]
    assert sug["total"] == 160 and sug["accepted"] + sug["rejected"] == 160 and sug["accepted"] > 0
    assert report["commits"]["total"] == 30 and report["quarantined"]["total"] == 2
    assert report["served"] == {}
    for key in ("total", "accepted", "rejected"):
        assert isinstance(sug[key], int)
    second = run_devtune("--config", str(site.config), "collect")
    assert "nothing new" in second.stdout
    again = status(site)
    assert {k: again[k] for k in ("suggestions", "commits", "quarantined")} == \
           {k: report[k] for k in ("suggestions", "commits", "quarantined")}


def test_cycle_promotes_then_the_gate_keeps_the_champion(site: Setup) -> None:
    first = run_devtune("--config", str(site.config), "cycle", "--team", "payments")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "team:payments run" in first.stdout and ": promoted v0001;" in first.stdout
    served = status(site)["served"]["team:payments"]
    assert served["version"] == "v0001" and Path(served["path"]).is_dir()
    assert served["heldout_loss"] < served["base_heldout_loss"]
    assert (Path(served["path"]) / "adapter_model.safetensors").is_file()

    # Same data, same seed: the new candidate is the champion again, so the gate must keep v0001.
    second = run_devtune("--config", str(site.config), "cycle", "--team", "payments")
    assert second.returncode == 0, second.stdout + second.stderr
    assert ": kept;" in second.stdout and "against the served's" in second.stdout
    after = status(site)
    assert after["served"]["team:payments"]["version"] == "v0001"
    assert [r["status"] for r in after["runs"][:2]] == ["succeeded", "succeeded"]


def test_a_team_with_no_data_is_skipped_with_its_reason(site: Setup) -> None:
    result = run_devtune("--config", str(site.config), "cycle", "--team", "default")
    assert result.returncode == 0, result.stderr
    assert "team:default run" in result.stdout and "skipped: 0 training rows" in result.stdout


def test_unknown_team_is_a_clear_error(site: Setup) -> None:
    result = run_devtune("--config", str(site.config), "cycle", "--team", "nosuch")
    assert result.returncode == 2 and "no team 'nosuch'; teams are payments, default" in result.stderr


def test_human_status_names_what_is_served(site: Setup) -> None:
    result = run_devtune("--config", str(site.config), "status")
    assert result.returncode == 0 and "suggestions  160" in result.stdout


def test_missing_config_says_how_to_create_one(tmp_path: Path) -> None:
    result = run_devtune("--config", str(tmp_path / "nope.toml"), "status")
    assert result.returncode == 2 and "devtune init DIR" in result.stderr

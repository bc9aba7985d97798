"""The CLI end to end on sample data and the tiny model: collect, status contract, cycles with per-developer
adapters, warm start, a full retrain the gate refuses, and what `status` shows."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from daemon.sample import DEVELOPERS, make_sample
from support import Setup, autocomplete_event, continue_log, days, devtune_json, run_devtune, utc_now, write_config


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Setup:
    tmp = tmp_path_factory.mktemp("site")
    sample = make_sample(tmp / "sample", n_commits=30, n_events=160)
    sources = sample.sources()
    # A fourth developer with three accepted suggestions: too little for a personal adapter, ever.
    continue_log(tmp / "dana", [autocomplete_event(timestamp=(utc_now() - days(2 + i)).isoformat() + "Z",
                                                   prefix=f"def fee_{i}(amount):\n", completion="    return 1\n")
                                for i in range(3)])
    sources.append({"kind": "continue", "path": str(tmp / "dana"), "name": "continue-dana",
                    "developer": "dana@example.com"})
    members = [e for _, e in DEVELOPERS] + ["dana@example.com"]
    return write_config(tmp, sources, teams=[{"name": "payments", "members": members}], overrides={
        "": {"base_model": str(tiny_model)},
        "datasets": {"max_row_tokens": 384, "max_prefix_chars": 800, "max_suffix_chars": 200,
                     "heldout_fraction": 0.15, "min_train_rows": 24, "min_heldout_rows": 4,
                     "min_dev_examples": 20},
        "train": {"max_steps": 40, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 10},
        "evaluate": {"max_rows": 40, "batch_size": 8, "generate_rows": 8, "max_new_tokens": 24},
        # Held-out loss decides here: 12 steps move it reliably on the tiny model; edit similarity (the
        # default) is exercised on rows the tiny model can learn in tests/test_gate_models.py.
        "gate": {"primary_metric": "heldout_loss"},
    })


def status(site: Setup) -> dict[str, Any]:
    result: dict[str, Any] = devtune_json("--config", str(site.config), "status", "--json")
    return result


def test_collect_is_idempotent_and_status_keeps_its_contract(site: Setup) -> None:
    first = run_devtune("--config", str(site.config), "collect")
    assert first.returncode == 0, first.stderr
    report = status(site)
    sug = report["suggestions"]
    assert sug["total"] == 163 and sug["accepted"] + sug["rejected"] == 163 and sug["accepted"] > 0
    assert report["commits"]["total"] == 30 and report["quarantined"]["total"] == 2
    assert report["served"] == {}
    for key in ("total", "accepted", "rejected"):
        assert isinstance(sug[key], int)
    second = run_devtune("--config", str(site.config), "collect")
    assert "nothing new" in second.stdout
    again = status(site)
    assert {k: again[k] for k in ("suggestions", "commits", "quarantined")} == \
           {k: report[k] for k in ("suggestions", "commits", "quarantined")}


def test_cycle_promotes_the_team_then_each_developer_starts_from_it(site: Setup) -> None:
    first = run_devtune("--config", str(site.config), "cycle", "--team", "payments")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "team:payments run" in first.stdout and ": promoted v0001;" in first.stdout
    report = status(site)
    served = report["served"]["team:payments"]
    assert served["version"] == "v0001" and Path(served["path"]).is_dir()
    assert served["heldout_loss"] < served["base_heldout_loss"]
    assert (Path(served["path"]) / "adapter_model.safetensors").is_file()
    # Promoted with its exports, written before the version appeared (tests/test_publish.py has the details).
    assert served["exports"] == {"ok": True, "served_name": "devtune-team-payments-v0001"}
    assert (Path(served["path"]) / "exports" / "adapter.gguf").is_file()
    assert all(s["exports"]["ok"] for s in report["served"].values())
    assert report["gate"]["team:payments"]["promote"] is True

    runs = {r["scope"]: r for r in report["runs"]}
    trained = [s for s, r in runs.items() if s.startswith("dev:") and r["stage"] == "done"]
    skipped = [s for s, r in runs.items() if s.startswith("dev:") and r["status"] == "skipped"]
    assert trained and "dev:dana@example.com" in skipped  # enough rows for an own adapter, or not
    team_path = str(site.state_dir / "registry" / "team:payments" / "v0001")
    team_first_loss = runs["team:payments"]["summary"]["train"]["stages"][0]["first_loss"]  # a fresh LoRA
    for scope in trained:
        run = runs[scope]
        config = json.loads((Path(run["summary"]["run_dir"]) / "config.json").read_text())
        assert config["init_adapter"] == team_path  # warm-started from the team's current adapter
        assert run["summary"]["start"]["init"]["version"] == "v0001"
        # Its first step already sees the team adapter's loss, not the base model's.
        assert run["summary"]["train"]["stages"][0]["first_loss"] < team_first_loss - 0.5
        weights = load_file(str(Path(run["summary"]["run_dir"]) / "adapter" / "adapter_model.safetensors"))
        assert set(weights) == set(load_file(str(Path(team_path) / "adapter_model.safetensors")))
    for developer, use in report["developers"].items():
        own = report["served"].get(f"dev:{developer}")
        assert use["adapter"] == (f"dev:{developer}" if own else "team:payments")  # the fallback
    # Each stage's training child was started before the collect and the build, and ran the stage once they
    # were done; a skipped run's was discarded: no log, and no child left importing after the command.
    for scope in ["team:payments", *trained]:
        log = (Path(runs[scope]["summary"]["run_dir"]) / "train.log").read_text()
        assert log.count("primed pipelines.train: pipelines.train.train imported in") == 1, log[:2000]
    dana = Path(runs["dev:dana@example.com"]["summary"]["run_dir"])
    assert not {"train.log", "eval.log"} & {p.name for p in dana.iterdir()}
    assert [c for c in primed_children() if str(site.state_dir) in c] == []
    for scope in skipped:  # each skip names the threshold it missed
        assert re.search(r"fewer than \[datasets\] min_(dev_examples|train_rows|heldout_rows) = \d+",
                         runs[scope]["error"]), runs[scope]["error"]
    assert "fewer than [datasets] min_dev_examples = 20" in runs["dev:dana@example.com"]["error"]


def primed_children() -> list[str]:
    """The command lines of primed stage children (pipelines/primed.py) running on this machine."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # it exited while we looked
            continue
        if b"pipelines.primed" in args:
            found.append(" ".join(a.decode(errors="replace") for a in args))
    return found


def test_a_developer_run_directory_holds_only_that_developers_rows(site: Setup) -> None:
    runs = [r for r in status(site)["runs"] if r["scope"].startswith("dev:") and r["stage"] == "done"]
    assert runs
    for run in runs:
        developer = run["scope"].removeprefix("dev:")
        data = Path(run["summary"]["run_dir"]) / "data"
        files = [p for p in data.iterdir() if p.suffix == ".jsonl"]
        rows = [json.loads(x) for p in files for x in p.read_text().splitlines() if x.strip()]
        assert rows and {r["developer"] for r in rows} == {developer}
        others = {e for _, e in DEVELOPERS} - {developer}
        text = "".join(p.read_text() for p in data.iterdir())
        assert not any(other in text for other in others)


def test_warm_start_skips_when_nothing_is_new_and_a_full_retrain_is_gated(site: Setup) -> None:
    again = run_devtune("--config", str(site.config), "cycle", "--team", "payments")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "team:payments run" in again.stdout and ": skipped: no rows newer than v0001's" in again.stdout
    assert "nothing new to learn" in again.stdout and ": kept;" not in again.stdout
    assert [c for c in primed_children() if str(site.state_dir) in c] == []  # its training child was discarded
    skipped = next(r for r in status(site)["runs"] if r["scope"] == "team:payments" and r["status"] == "skipped")
    assert (Path(skipped["summary"]["run_dir"]) / "data").is_dir()
    assert not {"train.log", "eval.log"} & {p.name for p in Path(skipped["summary"]["run_dir"]).iterdir()}
    for line in again.stdout.splitlines()[1:]:  # developers: the team adapter and their rows are unchanged
        reason_known = "nothing changed since run" in line or "fewer than [datasets] min_" in line
        assert ": skipped: " in line and reason_known, line

    # A full retrain on the same rows with the same seed gives the champion again: the gate keeps v0001.
    retrain = site.config.with_name("retrain.toml")
    retrain.write_text(site.config.read_text().replace("warm_start = true", "warm_start = false"))
    full = run_devtune("--config", str(retrain), "cycle", "--team", "payments")
    assert full.returncode == 0, full.stdout + full.stderr
    assert ": kept;" in full.stdout and "against the served's" in full.stdout
    after = status(site)
    assert after["served"]["team:payments"]["version"] == "v0001"
    gate = after["gate"]["team:payments"]
    assert gate["promote"] is False and gate["failed"] == ["primary"] and gate["primary_metric"] == "heldout_loss"
    human = run_devtune("--config", str(site.config), "status")
    assert "gate         team:payments run" in human.stdout and "kept the champion on heldout_loss" in human.stdout


def test_a_team_with_no_data_is_skipped_with_its_reason(site: Setup) -> None:
    result = run_devtune("--config", str(site.config), "cycle", "--team", "default")
    assert result.returncode == 0, result.stderr
    assert "team:default run" in result.stdout and "skipped: 0 training rows" in result.stdout


def test_unknown_team_is_a_clear_error(site: Setup) -> None:
    result = run_devtune("--config", str(site.config), "cycle", "--team", "nosuch")
    assert result.returncode == 2 and "no team 'nosuch'; teams are payments, default" in result.stderr


def test_human_status_names_what_is_served(site: Setup) -> None:
    result = run_devtune("--config", str(site.config), "status")
    assert result.returncode == 0 and "suggestions  163" in result.stdout
    assert re.search(r"^  continue/autocomplete 16\d \(accepted \d+\)$", result.stdout, re.M), result.stdout


def test_missing_config_says_how_to_create_one(tmp_path: Path) -> None:
    result = run_devtune("--config", str(tmp_path / "nope.toml"), "status")
    assert result.returncode == 2 and "devtune init DIR" in result.stderr

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from pipelines.publish import registry
from support import run_devtune, write_config


def adapter(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"name": name}))
    (d / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    return d


def test_versions_are_immutable_and_numbered(tmp_path: Path) -> None:
    state = tmp_path / "state"
    v1 = registry.register(state, "team:pay", adapter(tmp_path, "a"), {"run_id": "r1", "base_model": "m"})
    v2 = registry.register(state, "team:pay", adapter(tmp_path, "b"), {"run_id": "r2", "base_model": "m"})
    assert (v1, v2) == ("v0001", "v0002")
    path = state / "registry" / "team:pay" / v1
    lineage = json.loads((path / "lineage.json").read_text())
    assert lineage["run_id"] == "r1" and lineage["version"] == "v0001" and lineage["scope"] == "team:pay"
    if os.geteuid() != 0:  # root ignores permission bits
        with pytest.raises(PermissionError):
            (path / "adapter_model.safetensors").write_bytes(b"x")
    assert oct((path / "adapter_model.safetensors").stat().st_mode & 0o777) == "0o444"
    assert not [p for p in (state / "registry" / "team:pay").iterdir() if p.name.startswith(".incoming")]


def test_an_unfinished_adapter_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(registry.RegistryError, match="did not finish"):
        registry.register(tmp_path / "state", "team:pay", empty, {})


def test_promotion_swaps_atomically_under_a_reader(tmp_path: Path) -> None:
    state = tmp_path / "state"
    versions = [registry.register(state, "team:pay", adapter(tmp_path, f"a{i}"), {"base_model": "m"}) for i in range(3)]
    registry.promote(state, "team:pay", versions[0])
    link = state / "served" / "team:pay"
    stop = threading.Event()
    seen: list[str] = []
    broken: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads((link / "adapter_config.json").read_text())["name"])
            except (FileNotFoundError, json.JSONDecodeError) as e:
                broken.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        registry.promote(state, "team:pay", versions[i % 3])
    stop.set()
    t.join()
    assert not broken, broken[:3]
    assert set(seen) <= {"a0", "a1", "a2"} and len(seen) > 10
    assert registry.served_version(state, "team:pay") == versions[299 % 3]
    history = (state / "registry" / "team:pay" / "history.jsonl").read_text().splitlines()
    assert len(history) == 301


def test_promote_unknown_version_says_what_exists(tmp_path: Path) -> None:
    state = tmp_path / "state"
    registry.register(state, "team:pay", adapter(tmp_path, "a"), {})
    with pytest.raises(registry.RegistryError, match="known versions are v0001"):
        registry.promote(state, "team:pay", "v0009")


def test_bad_scope_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(registry.RegistryError):
        registry.register(tmp_path, "team:../../etc", adapter(tmp_path, "a"), {})


def test_rollback_walks_back_the_promotions_then_unserves(tmp_path: Path) -> None:
    state = tmp_path / "state"
    v1, v2, v3 = (registry.register(state, "team:pay", adapter(tmp_path, f"r{i}"), {}) for i in range(3))
    for v in (v1, v2, v3):
        registry.promote(state, "team:pay", v)
    assert registry.rollback(state, "team:pay") == v2
    assert registry.rollback(state, "team:pay") == v1  # v2's own promotion had replaced v1
    assert registry.rollback(state, "team:pay") is None  # nothing was served before v1: the link goes
    assert registry.served_version(state, "team:pay") is None and "team:pay" not in registry.served(state)
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        registry.rollback(state, "team:pay")
    actions = [(h["action"], h["version"]) for h in registry.history(state, "team:pay")]
    assert actions[-3:] == [("rollback", v2), ("rollback", v1), ("rollback", None)]


def test_a_developer_falls_back_to_the_team_adapter(tmp_path: Path) -> None:
    state = tmp_path / "state"
    registry.promote(state, "team:pay", registry.register(state, "team:pay", adapter(tmp_path, "t"), {}))
    assert registry.adapter_for(state, "alice@x.com", "pay").scope == "team:pay"  # type: ignore[union-attr]
    registry.promote(state, "dev:alice@x.com", registry.register(state, "dev:alice@x.com", adapter(tmp_path, "a"), {}))
    assert registry.adapter_for(state, "alice@x.com", "pay").scope == "dev:alice@x.com"  # type: ignore[union-attr]
    assert registry.adapter_for(state, "bob@x.com", "pay").scope == "team:pay"  # type: ignore[union-attr]
    registry.rollback(state, "dev:alice@x.com")
    assert registry.adapter_for(state, "alice@x.com", "pay").scope == "team:pay"  # type: ignore[union-attr]
    assert registry.adapter_for(state, "carol@x.com", "other") is None


def test_promote_and_rollback_by_hand_from_the_cli(tmp_path: Path) -> None:
    setup = write_config(tmp_path / "site", [])
    state = setup.state_dir
    v1, v2 = (registry.register(state, "team:pay", adapter(tmp_path, f"c{i}"), {}) for i in range(2))
    registry.promote(state, "team:pay", v2)
    done = run_devtune("--config", str(setup.config), "promote", v1, "--scope", "team:pay")
    assert done.returncode == 0 and f"team:pay now serves {v1} (was {v2})" in done.stdout, done.stderr
    back = run_devtune("--config", str(setup.config), "rollback", "team:pay")
    assert back.returncode == 0 and f"team:pay now serves {v2} (was {v1})" in back.stdout, back.stderr
    missing = run_devtune("--config", str(setup.config), "promote", "v0042", "--scope", "team:pay")
    assert missing.returncode == 3 and "known versions are v0001, v0002" in missing.stderr

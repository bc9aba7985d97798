from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from pipelines import registry


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

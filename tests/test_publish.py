"""Exports at promotion and by hand, what a kill leaves, and the Continue config a developer is handed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon import auth
from pipelines.publish import registry
from pipelines.publish.names import served_name
from pipelines.publish.publish import register_with_exports
from pipelines.tokens import load_base_tokenizer
from runs import random_adapter
from support import QWEN, ROOT, STARCODER, family_tokenizer, run_devtune, write_config


@pytest.fixture(scope="module")
def adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_adapter(tiny_model, tmp_path_factory.mktemp("adapter") / "adapter", seed=5)


def test_a_registered_version_appears_with_its_exports_inside(adapter: Path, tiny_model: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    version, outcome = register_with_exports(state, "team:payments", adapter, {"base_model": str(tiny_model)},
                                             str(tiny_model), 300, tmp_path / "export.log")
    assert version == "v0001" and outcome["ok"] is True, outcome
    folder = state / "registry" / "team:payments" / "v0001"
    manifest = json.loads((folder / "exports" / "exports.json").read_text())
    assert manifest["served_name"] == outcome["served_name"] == served_name("team:payments", "v0001")
    assert (folder / "exports" / "adapter.gguf").is_file() and (folder / "exports" / "peft").is_dir()
    assert json.loads((folder / "lineage.json").read_text())["exports"]["ok"] is True
    assert oct(folder.stat().st_mode & 0o777) == "0o555" and oct((folder / "exports").stat().st_mode & 0o777) == "0o555"
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".incoming")] == []


def test_a_failed_export_is_recorded_and_does_not_block_the_version(adapter: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    version, outcome = register_with_exports(state, "team:payments", adapter, {"base_model": "x"},
                                             str(tmp_path / "no-such-model"), 300, tmp_path / "export.log")
    assert version == "v0001" and outcome["ok"] is False and "exited with status" in outcome["error"]
    folder = state / "registry" / "team:payments" / "v0001"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "exports").exists()
    assert json.loads((folder / "lineage.json").read_text())["exports"]["ok"] is False
    registry.promote(state, "team:payments", version)  # the PEFT adapter is served all the same


KILLED_MID_EXPORT = """
import os, sys
from pathlib import Path
from pipelines.publish import registry

def prepare(staging, version):
    (staging / "exports" / "peft").mkdir(parents=True)
    (staging / "exports" / "adapter.gguf").write_bytes(b"GGUF half")
    os._exit(9)  # killed in the middle of writing the exports

registry.register(Path(sys.argv[1]), "team:payments", Path(sys.argv[2]), {}, prepare=prepare)
"""


def test_a_kill_during_the_export_leaves_no_version_and_the_next_one_cleans_up(adapter: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_EXPORT, str(state), str(adapter)], cwd=ROOT)
    assert killed.returncode == 9
    scope_dir = state / "registry" / "team:payments"
    assert registry.versions(state, "team:payments") == []  # nothing has a version's name
    assert [p.name.split("-")[0] for p in scope_dir.iterdir()] == [".incoming"]  # hidden, never served
    assert not (state / "served").exists()
    assert registry.register(state, "team:payments", adapter, {}) == "v0001"
    assert sorted(p.name for p in scope_dir.iterdir()) == ["v0001"]  # the dead process's folder is gone


def test_devtune_publish_exports_an_older_version_and_keeps_it_read_only(adapter: Path, tiny_model: Path,
                                                                          tmp_path: Path) -> None:
    setup = write_config(tmp_path, [], overrides={"": {"base_model": str(tiny_model)}})
    version = registry.register(setup.state_dir, "dev:alice@example.com", adapter, {"base_model": str(tiny_model)})
    folder = setup.state_dir / "registry" / "dev:alice@example.com" / version
    result = run_devtune("--config", str(setup.config), "publish", version, "--scope", "dev:alice@example.com")
    assert result.returncode == 0, result.stderr
    name = served_name("dev:alice@example.com", version)
    assert f"exported as {name}" in result.stdout
    assert json.loads((folder / "exports" / "exports.json").read_text())["served_name"] == name
    assert oct(folder.stat().st_mode & 0o777) == "0o555" and oct((folder / "exports").stat().st_mode & 0o777) == "0o555"
    if os.geteuid() != 0:  # root ignores permission bits
        with pytest.raises(PermissionError):
            (folder / "new-file").write_text("x")
    again = run_devtune("--config", str(setup.config), "publish", version, "--scope", "dev:alice@example.com")
    assert again.returncode == 0 and "was already exported" in again.stdout
    missing = run_devtune("--config", str(setup.config), "publish", "v0009", "--scope", "dev:alice@example.com")
    assert missing.returncode == 3 and "known versions are v0001" in missing.stderr


@pytest.mark.parametrize(("family", "template"), [
    (QWEN, "<|fim_prefix|>{{{prefix}}}<|fim_suffix|>{{{suffix}}}<|fim_middle|>"),
    (STARCODER, "<fim_prefix>{{{prefix}}}<fim_suffix>{{{suffix}}}<fim_middle>"),
])
def test_continue_config_is_yaml_with_the_gateway_the_token_and_the_familys_template(
        tmp_path: Path, family: tuple[list[str], str], template: str) -> None:
    base = family_tokenizer(tmp_path / "base", *family)
    setup = write_config(tmp_path / "site", [], teams=[{"name": "payments", "members": ["alice@example.com"]}],
                         developers=[{"id": "alice@example.com", "aliases": ["alice@users.noreply.github.com"]}],
                         overrides={"": {"base_model": str(base)}, "serve": {"enabled": True, "port": 9123},
                                    "continue_http": {"enabled": True}, "api": {"port": 9122}})
    auth.issue(setup.state_dir, "alice@example.com")
    result = run_devtune("--config", str(setup.config), "continue-config", "alice@users.noreply.github.com")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert (config["name"], config["schema"]) == ("devtune", "v1")
    (model,) = config["models"]
    assert model["provider"] == "openai" and model["model"] == "devtune" and model["roles"] == ["autocomplete"]
    assert model["apiBase"] == "http://127.0.0.1:9123/v1/"  # Continue joins "completions" onto it
    assert model["apiKey"] == "${{ secrets.DEVTUNE_TOKEN }}"
    assert model["promptTemplates"]["autocomplete"] == template
    (data,) = config["data"]
    assert data["destination"] == "http://127.0.0.1:9122/continue/devdata" and data["schema"] == "0.2.0"
    assert data["apiKey"] == "${{ secrets.DEVTUNE_TOKEN }}" and "autocomplete" in data["events"]
    assert "Continue config for alice@example.com" in result.stdout  # the alias resolved to the developer
    # Continue renders the template with Handlebars ({{{x}}}: unescaped): the prompt the adapters were trained on.
    fim = load_base_tokenizer(str(base)).fim
    rendered = template.replace("{{{prefix}}}", "def f(x):\n    ").replace("{{{suffix}}}", "\n")
    assert rendered == fim.psm("def f(x):\n    ", "\n")
    other = run_devtune("--config", str(setup.config), "continue-config", "alice@example.com",
                        "--gateway-url", "https://gpu.example.com:8443/")
    assert yaml.safe_load(other.stdout)["models"][0]["apiBase"] == "https://gpu.example.com:8443/v1/"

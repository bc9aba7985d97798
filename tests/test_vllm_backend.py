"""The vllm backend through the real gateway, against a stand-in vLLM server on 127.0.0.1 (tests/fake_vllm.py)
that answers as vLLM's source does: each version loaded once under its served name before its first request,
loaded again after a vLLM restart, never reloaded otherwise, unloaded once nobody is served it."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon import auth
from daemon.config import gateway_dir, load_config
from daemon.gateway import Gateway, start_gateway
from fake_vllm import FakeVllm
from pipelines.config import Config
from pipelines.publish import registry
from pipelines.publish.names import served_name
from pipelines.serve.vllm import VllmBackend
from support import QWEN, family_tokenizer, read_jsonl, write_config

BASE_NAME = "Qwen/Qwen2.5-Coder-1.5B"  # what vLLM serves the base model as ([serve] vllm_model)


@dataclass
class Site:
    cfg: Config
    vllm: FakeVllm
    gateway: Gateway
    tokens: dict[str, str]
    tmp: Path

    @property
    def backend(self) -> VllmBackend:
        assert isinstance(self.gateway.backend, VllmBackend)
        return self.gateway.backend

    def complete(self, developer: str, stream: bool = False) -> tuple[int, str, str]:
        """(status, X-Devtune-Adapter, the completion's text)."""
        body = json.dumps({"model": "devtune", "prompt": "<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>",
                           "max_tokens": 8, "stream": stream}).encode()
        req = urllib.request.Request(self.gateway.url + "/v1/completions", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.tokens[developer]}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read().decode()
                label = resp.headers["X-Devtune-Adapter"]
        except urllib.error.HTTPError as e:
            return e.code, "", e.read().decode()
        if not stream:
            return 200, label, json.loads(raw)["choices"][0]["text"]
        chunks = [json.loads(b[6:]) for b in raw.split("\n\n") if b.startswith("data: {")]
        return 200, label, "".join(c["choices"][0]["text"] for c in chunks if c["choices"])

    def register(self, scope: str, exported: bool = True) -> str:
        """A version as the cycle registers it, with an exports/ folder shaped as the exporter writes it."""
        adapter = self.tmp / f"adapter-{scope}-{time.monotonic_ns()}"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))

        def exports(staging: Path, version: str) -> dict[str, Any]:
            (staging / "exports" / "peft").mkdir(parents=True)
            (staging / "exports" / "peft" / "adapter_config.json").write_text("{}")
            (staging / "exports" / "exports.json").write_text(json.dumps(
                {"served_name": served_name(scope, version), "peft_dir": "peft", "files": {}}))
            return {"ok": True}

        return registry.register(self.cfg.state_dir, scope, adapter, {"base_model": self.cfg.base_model},
                                 prepare=exports if exported else None)

    def promote(self, scope: str, exported: bool = True) -> str:
        version = self.register(scope, exported)
        registry.promote(self.cfg.state_dir, scope, version)
        return version


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    base = family_tokenizer(tmp_path / "base", *QWEN)
    vllm = FakeVllm(BASE_NAME)
    setup = write_config(tmp_path / "site", [], teams=[{"name": "payments",
                                                        "members": ["alice@example.com", "bob@example.com"]}],
                         overrides={"": {"base_model": str(base)},
                                    "serve": {"enabled": True, "port": 0, "backend": "vllm", "vllm_url": vllm.url,
                                              "vllm_model": BASE_NAME, "unload_grace_s": 0.3}})
    cfg = load_config(setup.config)
    tokens = {d: auth.issue(cfg.state_dir, d)[0] for d in ("alice@example.com", "bob@example.com", "carol@example.com")}
    gateway = start_gateway(cfg, port=0)
    try:
        yield Site(cfg, vllm, gateway, tokens, tmp_path)
    finally:
        gateway.stop()
        vllm.stop()


def test_each_version_is_loaded_once_under_its_served_name_before_its_first_request(site: Site) -> None:
    site.promote("team:payments")
    site.promote("dev:alice@example.com", exported=False)
    team = served_name("team:payments", "v0001")
    alice = served_name("dev:alice@example.com", "v0001")

    assert site.complete("bob@example.com") == (200, "team:payments/v0001", f"<{team}>")
    assert site.complete("bob@example.com", stream=True) == (200, "team:payments/v0001", f"<{team}>")
    assert site.complete("alice@example.com") == (200, "dev:alice@example.com/v0001", f"<{alice}>")
    assert site.complete("carol@example.com") == (200, "base", f"<{BASE_NAME}>")  # no team adapter: the base

    loads = site.vllm.requests("/v1/load_lora_adapter")
    registry_dir = site.cfg.state_dir / "registry"
    assert loads == [  # exactly the shape vLLM's LoadLoRAAdapterRequest takes
        {"lora_name": team, "lora_path": str(registry_dir / "team:payments" / "v0001" / "exports" / "peft")},
        # a version without exports is loaded from its own folder
        {"lora_name": alice, "lora_path": str(registry_dir / "dev:alice@example.com" / "v0001")},
    ]
    models = [b["model"] for b in site.vllm.requests("/v1/completions")]
    assert models == [team, team, alice, BASE_NAME]
    assert all(b["stream"] is True and b["stream_options"] == {"include_usage": True}
               for b in site.vllm.requests("/v1/completions"))


def test_after_a_vllm_restart_a_version_is_loaded_again_and_no_request_fails(site: Site) -> None:
    site.promote("team:payments")
    name = served_name("team:payments", "v0001")
    assert site.complete("bob@example.com")[0] == 200
    site.vllm.restart()
    assert site.complete("bob@example.com") == (200, "team:payments/v0001", f"<{name}>")
    assert [b["lora_name"] for b in site.vllm.requests("/v1/load_lora_adapter")] == [name, name]
    assert site.complete("bob@example.com")[0] == 200
    assert len(site.vllm.requests("/v1/load_lora_adapter")) == 2  # loaded again once, not at every request


def test_a_gateway_restart_adopts_what_vllm_holds_and_never_reloads_a_name(site: Site) -> None:
    site.promote("team:payments")
    name = served_name("team:payments", "v0001")
    assert site.complete("bob@example.com")[0] == 200
    fresh = VllmBackend(site.vllm.url, BASE_NAME, lambda: set(), unload_grace_s=0.0, request_timeout_s=10)
    try:
        # A second gateway (or this one restarted) asks to load a name vLLM already has: vLLM says 400 "already
        # been loaded", which means these weights (names are never reused), so it is used as it is.
        from pipelines.serve.backend import Job

        adapter = site.gateway.router.adapter_of("team:payments")
        assert adapter is not None
        events = list(fresh.complete(Job("j1", "x", adapter, 4, 0.0, 1.0, ())))
        assert "".join(getattr(e, "text", "") for e in events) == f"<{name}>"
        assert fresh.loaded() == {name}
        assert [b["lora_name"] for b in site.vllm.requests("/v1/load_lora_adapter")] == [name, name]
        assert site.vllm.loaded == {name: str(adapter.vllm_path)}
    finally:
        fresh.close()


def test_a_version_nobody_is_served_is_unloaded_after_the_grace_period(site: Site) -> None:
    site.promote("team:payments")
    site.promote("dev:alice@example.com")
    old, alice = served_name("team:payments", "v0001"), served_name("dev:alice@example.com", "v0001")
    assert site.complete("bob@example.com")[0] == 200 and site.complete("alice@example.com")[0] == 200
    site.promote("team:payments")  # v0002 replaces v0001 for bob
    new = served_name("team:payments", "v0002")
    assert site.complete("bob@example.com") == (200, "team:payments/v0002", f"<{new}>")
    deadline = time.monotonic() + 10
    while old in site.vllm.loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert site.vllm.requests("/v1/unload_lora_adapter") == [{"lora_name": old}]
    assert set(site.vllm.loaded) == {alice, new}
    assert site.backend.loaded() == {alice, new}
    # Rolled back to v0001: loaded again under its own name (an unloaded name may be loaded again; a loaded
    # one is never loaded twice), and v0002 goes in its turn.
    registry.rollback(site.cfg.state_dir, "team:payments")
    assert site.complete("bob@example.com") == (200, "team:payments/v0001", f"<{old}>")
    deadline = time.monotonic() + 10
    while new in site.vllm.loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(site.vllm.loaded) == {alice, old}


def test_a_version_vllm_refuses_is_answered_by_the_base_and_logged(site: Site) -> None:
    site.promote("team:payments")
    adapter = site.gateway.router.adapter_of("team:payments")
    assert adapter is not None
    site.vllm.refuse_paths.add(str(adapter.vllm_path))
    assert site.complete("bob@example.com") == (200, "base", f"<{BASE_NAME}>")
    line = logged(site)[-1]
    assert line["scope"] is None and line["status"] == 200 and "could not be loaded on vLLM" in line["error"]
    assert "No adapter found" in line["error"] or "500" in line["error"]


def test_vllm_unreachable_is_a_503_not_a_hang(site: Site) -> None:
    site.vllm.stop()
    status, _, body = site.complete("carol@example.com")
    assert status == 503 and "cannot reach vLLM" in body


def logged(site: Site) -> list[dict[str, Any]]:
    """The request log, once the last answer's line is in (it is appended right after the answer is sent)."""
    assert site.gateway.wait_idle(30)
    return [x for p in gateway_dir(site.cfg.state_dir).glob("requests-*.jsonl") for x in read_jsonl(p)]

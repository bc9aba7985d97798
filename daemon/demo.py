"""Everything `devtune demo` needs, built locally with no network: sample data, a tiny base model, a config.

The demo then runs the main job exactly as a real installation does (collect, then one cycle) on the
config written here, so `devtune --config <state_dir>/config.toml status` works on the result. Last it
shows the editor's path (`editor_path`): the serving gateway on a free loopback port, one completion
requested as two developers with the same prompt, and which adapter answered each.
"""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon import auth
from daemon.config import render_config
from daemon.gateway import start_gateway
from daemon.sample import DEVELOPERS, make_sample, module_header
from pipelines.child import run_child, tail
from pipelines.config import Config
from pipelines.pretrain.scratch import STDLIB_EXCLUDE, STDLIB_INCLUDE, stdlib_folder
from pipelines.publish import registry
from pipelines.serve.backend import Router

log = logging.getLogger("devtune.demo")

DEMO_TEAM = "payments"

# Sized for 2 CPU cores and the ~0.6M-parameter tiny model: about 15 s of training per adapter, and enough
# steps for the team adapter to beat the base model on the held-out week (measured: held-out loss 5.08 ->
# 1.55 nats/token, edit similarity 0.10 -> 0.25). Each developer's adapter then trains the same 80 steps
# from it; the whole demo took about 2 minutes on 2 cores.
DEMO_OVERRIDES: dict[str, dict[str, Any]] = {
    "collect": {"interval_s": 60.0},
    "datasets": {"max_prefix_chars": 1200, "max_suffix_chars": 400, "max_row_tokens": 512,
                 "heldout_fraction": 0.15, "min_train_rows": 32, "min_heldout_rows": 8},
    "train": {"learning_rate": 5e-3, "max_steps": 80, "batch_size": 8, "logging_steps": 10,
              "warmup_ratio": 0.05, "train_timeout_s": 900.0},
    "evaluate": {"batch_size": 16, "max_rows": 200, "eval_timeout_s": 600.0},
    # The demo starts the gateway itself, on a free port; enabled = the service collects its request log.
    "serve": {"enabled": True},
}
# What the two developers' editors send: the text before the cursor in one of the team's modules, at the
# start of a guard clause's body (the house style: raise LedgerError naming the noun and the account).
EDITOR_PREFIX = (module_header("deposit") + "\n\ndef refund_deposit(account: Account, amount: Decimal) -> Receipt:\n"
                 '    """Refund a deposit on `account`."""\n    if amount <= Decimal("0"):\n')
# The base model: `devtune pretrain --from-scratch` on Python's standard library with a small budget.
BASE_PARAMS = "600k"
PRETRAIN_TOKENS = 800_000
BASE_OPTIONS = ["--params", BASE_PARAMS, "--seq-len", "256", "--learning-rate", "3e-3", "--max-corpus-bytes", "2M",
                *(a for g in STDLIB_INCLUDE for a in ("--include", g)),
                *(a for g in STDLIB_EXCLUDE for a in ("--exclude", g))]


def prepare_demo(state_dir: Path, pretrain_tokens: int = PRETRAIN_TOKENS) -> Path:
    """Sample data, tiny model and config under `state_dir` (reused when present); returns the config path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    sample = make_sample(state_dir / "sample")
    (state_dir / "gateway").mkdir(exist_ok=True)  # the request log's folder: collected from the first collect on
    model_dir = state_dir / "tiny-model"
    if not (model_dir / "model.safetensors").is_file():
        log_path = state_dir / "tiny-model.log"
        shown: list[str] = []

        def progress() -> None:  # a line when the child wrote a new one (not the same line every 10 s)
            line = tail(log_path, 1)
            if line and line not in shown:
                shown.append(line)
                log.info("%s", line)

        log.info("building the tiny base model from scratch: a BPE tokenizer with Qwen2.5-Coder's FIM tokens and a "
                 "%s-parameter model trained on %s tokens of Python's standard library (log in %s)", BASE_PARAMS,
                 f"{pretrain_tokens:,}", log_path)
        run_child("pipelines.pretrain.scratch", [str(model_dir), str(stdlib_folder()), "--tokens",
                                                 str(pretrain_tokens), *BASE_OPTIONS],
                  log_path, timeout_s=1800, tick_s=10, on_tick=progress)
    sources = sample.sources("payments-repo", relative_to=state_dir)
    teams = [{"name": DEMO_TEAM, "members": [email for _, email in DEVELOPERS], "repos": ["acme/payments"]}]
    overrides = {"": {"state_dir": ".", "base_model": str(model_dir.resolve())}, **DEMO_OVERRIDES}
    config = state_dir / "config.toml"
    config.write_text(render_config(overrides, sources=sources, teams=teams))
    return config


def editor_path(cfg: Config, developers: list[str], max_tokens: int = 32) -> list[dict[str, Any]]:
    """Start the gateway on a free loopback port, request one completion as each developer (a token issued for
    the occasion, revoked after) with the same prompt, and stop it; returns who got which adapter and what."""
    gateway = start_gateway(cfg, port=0)
    answers = []
    try:
        deadline = time.monotonic() + cfg.serve.start_timeout_s
        while not gateway.backend.ready() and time.monotonic() < deadline:  # the worker loads the base model
            time.sleep(0.1)
        for developer in developers:
            token, record = auth.issue(cfg.state_dir, developer)
            body = json.dumps({"model": cfg.serve.model_name, "prompt": EDITOR_PREFIX, "suffix": "\n",
                               "max_tokens": max_tokens, "temperature": 0, "stop": ["\n"]}).encode()
            req = urllib.request.Request(f"{gateway.url}/v1/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {token}"})
            started = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=cfg.serve.start_timeout_s) as resp:
                    answer = json.loads(resp.read())
                    adapter = resp.headers["X-Devtune-Adapter"]
            finally:
                auth.revoke(cfg.state_dir, record.id)
            answers.append({"developer": developer, "adapter": adapter, "text": answer["choices"][0]["text"],
                            "ms": (time.monotonic() - started) * 1000, "url": f"{gateway.url}/v1"})
    finally:
        gateway.stop()
    return answers


OUTSIDER = "dana@example.com"  # in no team: the default team, which serves nothing, so the base model answers


def demo_developers(cfg: Config, team: str) -> list[str]:
    """Two developers served differently: one with an adapter of their own and one with their team's; when the
    gate promoted no personal adapter, a team member and someone in no team (answered by the base model)."""
    router = Router(cfg.state_dir, cfg.base_model)
    emails = [email for _, email in DEVELOPERS]
    own = [e for e in emails if router.adapter_of(f"dev:{e}") is not None]
    others = [e for e in emails if e not in own]
    return [own[0], others[0]] if own and others else [emails[0], OUTSIDER]


def simulate_editors(cfg: Config, events_per_developer: int = 150, seed: int = 11) -> int:
    """A simulated stretch of editing since the promotions, written as Continue writes it: each sample
    developer's autocomplete log gets `events_per_developer` decided suggestions from the stable model name,
    accepted at the rate their own logs show (about a third), so the next collect can attribute them to the
    versions that served them and `status` shows the field table. Returns the events written."""
    rng = random.Random(seed)
    written = 0
    stop = datetime.now(UTC).replace(tzinfo=None)
    # Spread over the time since the last promotion: every event then falls where today's versions served.
    promoted = [datetime.fromisoformat(e["at"]) for scope in ("team", "dev") for d in cfg.state_dir.glob(
        f"registry/{scope}:*") for e in registry.history(cfg.state_dir, d.name)]
    since = max(promoted, default=stop - timedelta(hours=1)) + timedelta(milliseconds=2)  # logged to the ms
    stop = max(stop, since + timedelta(milliseconds=2 * events_per_developer))  # a promotion a moment ago
    step = (stop - since) / (events_per_developer + 1)
    for source in cfg.sources:
        if source.kind != "continue" or not source.developer:
            continue
        log_path = source.path / "dev_data" / "0.2.0" / "autocomplete.jsonl"
        logged = [e for e in map(_event, log_path.read_text().splitlines()) if e is not None]
        rate = sum(bool(e.get("accepted")) for e in logged) / max(1, len(logged))
        lines = []
        for i in range(events_per_developer):
            event = dict(rng.choice(logged))
            when = since + step * (i + 1)
            event.update(completionId=str(uuid.UUID(int=rng.getrandbits(128))), modelName=cfg.serve.model_name,
                         modelProvider="openai", accepted=rng.random() < rate,
                         timestamp=when.isoformat(timespec="milliseconds") + "Z")
            lines.append(json.dumps(event))
        with log_path.open("a") as f:
            f.write("\n".join(lines) + "\n")
        written += len(lines)
    return written


def _event(line: str) -> dict[str, Any] | None:
    """A logged event to vary, or None for the sample's deliberately malformed lines."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "completion" in event else None


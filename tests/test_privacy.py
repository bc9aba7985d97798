"""Secrets planted in IDE logs and git history never reach the store."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from collectors.continue_http import append_to_inbox
from daemon.config import load_config
from pipelines.scrub import is_excluded, scrub
from support import (
    T0,
    CommitSpec,
    all_text,
    autocomplete_event,
    collect_site,
    continue_event,
    continue_log,
    day_ms,
    make_repo,
    tabby_action,
    tabby_completion,
    write_config,
    write_lines,
)

# One planted value per kind (fake, but in each format's exact shape).
SECRETS = {
    "azure_storage_key": "Zm9vYmFyYmF6cXV4" * 5 + "QUJDREVGR0g=",
    "azure_sas_token": "k8Jd2mQp4LxZ7vN1bR6tY9wC3sF5hG0aE2iU8oP4lK%3D",
    "digitalocean_token": "dop_v1_" + "4f9a0c7e" * 8,
    "alibaba_access_key": "LTAI5tB9xQ2mK7pL1nR4",
    "bitbucket_token": "ATBB" + "k3Jx9Qm2Lp7Vz4Rt8Yw1Nc6Hs5Gd0Fb2",
    "atlassian_token": "ATATT3xFfGF0" + "q7Wm2Kx9Lp4Rz8Tn1Vb6Yc3Hd5",
    "circleci_token": "CCIPAT_" + "Qm7Kx2Lp9Rz4Tn8Vb1Yc6Hd3Gs5Fw0Ej2",
    "npm_token": "npm_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    "pypi_token": "pypi-AgE" + "Iwcy5weS5vcmcCJDk4ZjFkNjE0LWE3ZGItNDFkNS1iYzI5LTM2NmQ",
    "docker_token": "dckr_pat_" + "Xk9m2Qp7Lz4Rt8Vn1Bc6Yh3Gs5F",
    "huggingface_token": "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh",
    "slack_webhook": "https://hooks.slack.com/services/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",
    "discord_webhook": "https://discord.com/api/webhooks/123456789012345678/" + "aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY",
    "teams_webhook": "https://acme.webhook.office.com/webhookb2/" + "1f2e3d4c-5b6a-7980-a1b2-c3d4e5f60718@"
                     "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9/IncomingWebhook/4c7f",
    "telegram_token": "123456789:AA" + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Yh3Gs5Fw0Ej2K",
    "square_token": "sq0atp-" + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Y",
    "paypal_braintree_token": "access_token$production$" + "x9k2m7q4p1z8r5t3$" + "4f9a0c7e" * 4,
    "shopify_token": "shpat_" + "4f9a0c7e" * 4,
    "openai_key": "sk-proj-" + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Yh3Gs5Fw0Ej2Kq7Wm2Kx9Lp4R",
    "anthropic_key": "sk-ant-api03-" + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Yh3Gs5Fw0Ej2Kq7Wm2Kx9Lp4Rz8Tn1Vb6",
    "twilio_key": "SK" + "4f9a0c7e" * 4,
    "sendgrid_key": "SG." + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Y" + "." + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Yh3Gs5Fw0Ej2Kq7Wm2Kx9L",
    "aws_access_key": "AKIAQ3EGZ7VXRTYUPLMN",
    "github_token": "ghp_" + "Zx9" * 12,
    "gitlab_token": "glpat-" + "aB3dE5fG7hJ9kL1mN2pQ",
    "slack_token": "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx",
    "stripe_key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "google_api_key": "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImlhdCI6MTUxNjIzOTAyMn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV",
    "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
                   "-----END OPENSSH PRIVATE KEY-----",
    "url_credentials": "hunter2-Prod-Pw",  # planted inside a URL below
    "secret_assignment": "correct-horse-battery",  # planted as password = "..." below
    "high_entropy": "q8Lw2ZrX9vT4nB6mK1pD7sF3gH5jC0aE",
}


# Kinds planted in a context of their own below, not as NAME = "value".
_IN_CONTEXT = {"private_key", "url_credentials", "secret_assignment", "high_entropy", "azure_storage_key",
               "azure_sas_token"}


def code_with_secrets() -> str:
    s = SECRETS
    plain = "".join(f'V{i} = "{v}"\n' for i, (k, v) in enumerate(sorted(s.items())) if k not in _IN_CONTEXT)
    return (plain + f'KEY = """{s["private_key"]}"""\n'
            f'DB = "postgres://app:{s["url_credentials"]}@db.internal:5432/app"\n'
            f'CONN = "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={s["azure_storage_key"]}"\n'
            f'BLOB = "https://acme.blob.core.windows.net/c/x?sv=2022-11-02&sr=b&sig={s["azure_sas_token"]}"\n'
            f'password = "{s["secret_assignment"]}"\nsigning = "{s["high_entropy"]}"\n')


def test_no_planted_secret_reaches_any_table(tmp_path: Path) -> None:
    code = code_with_secrets()
    continue_log(tmp_path / "alice", [
        autocomplete_event(prefix=code, completion="x = 1\n", accepted=True),
        autocomplete_event(prefix="def f():\n", completion=code, accepted=False),
        autocomplete_event(suffix=code),
        # a compiled prefix: retrieved context (holding secrets) before the raw prefix
        autocomplete_event(prefix=f"\n# Path: cfg/keys.py\n# {code.splitlines()[0]}\n# ledger/math.py\n{code}"),
        '{"broken": "' + SECRETS["github_token"],  # quarantined: the excerpt is scrubbed too
    ])
    v2 = tmp_path / "alice" / "dev_data" / "0.2.0"
    write_lines(v2 / "editOutcome.jsonl", [continue_event("editOutcome", previousCode=code, newCode=code,
                                                          prompt=f"rotate {SECRETS['npm_token']}")])
    write_lines(v2 / "nextEditOutcome.jsonl", [continue_event("nextEditOutcome", originalEditableRange=code,
                                                              completion=code)])
    write_lines(v2 / "toolUsage.jsonl", [continue_event("toolUsage", toolCallArgs=json.dumps({"cmd": code}),
                                                        output=[{"content": code}])])
    write_lines(v2 / "chatInteraction.jsonl", [continue_event("chatInteraction", prompt=code, completion=code)])
    write_lines(tmp_path / "tabby" / "events" / "2026-10-01.json", [
        tabby_completion("cmpl-1", day_ms("2026-10-01", 1), prefix=code, text=code),
        tabby_action("view", "cmpl-1", day_ms("2026-10-01", 2))])
    make_repo(tmp_path / "repo", [CommitSpec({"app/settings.py": code}, when=T0,
                                             message=f"add settings (token {SECRETS['slack_token']})")])
    setup = write_config(tmp_path / "site", [
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice"},
        {"kind": "tabby", "path": str(tmp_path / "tabby"), "name": "tabby"},
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}],
        overrides={"continue_http": {"enabled": True}})
    cfg = load_config(setup.config)
    inbox = cfg.state_dir / "inbox" / "continue"
    inbox.mkdir(parents=True)
    append_to_inbox(inbox, {"name": "autocomplete", "data": autocomplete_event(completion=code), "schema": "0.2.0",
                            "level": "all"}, "", datetime(2026, 10, 2))
    report, db = collect_site(setup.config)
    counts = report["status"]
    assert report["error"] is None and counts["suggestions"]["total"] == 6 and counts["quarantined"]["total"] == 1
    assert counts["edit_outcomes"]["total"] == 2 and counts["interactions"]["total"] == 2
    text = all_text(db)
    for kind, secret in SECRETS.items():
        assert secret not in text, f"{kind} reached the store"
        assert secret.splitlines()[1 if "\n" in secret else 0] not in text
    assert "<SECRET:aws_access_key>" in text and "<SECRET:url_credentials>" in text
    assert set(counts["scrubbed"]) >= set(SECRETS)


@pytest.mark.parametrize("code", [
    "sha = '4b825dc642cb6eb9a060e54bf8d69288fbee4904'\n",  # a git sha
    "password = get_password(user)\n",  # an expression, not a literal
    "TOKEN_TYPE = 'bearer_token_kind'\n",
    "url = 'https://example.com/a/b/c/d/e/f/g'\n",
    "name = 'compute_monthly_revenue_report_v2'\n",
    "x = hashlib.sha256(data).hexdigest()\n",
])
def test_ordinary_code_is_left_alone(code: str) -> None:
    assert scrub(code) == code


def test_exclude_globs_match_uris_and_nested_paths() -> None:
    globs = (".env*", "*.pem", "**/secrets/**", "id_rsa*")
    assert is_excluded("file:///home/a/app/.env.local", globs)
    assert is_excluded("secrets/db.yaml", globs) and is_excluded("deploy/secrets/db.yaml", globs)
    assert is_excluded("home/.ssh/id_rsa.pub", globs)
    assert not is_excluded("app/environment.py", globs)

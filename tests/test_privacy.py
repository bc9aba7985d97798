"""Secrets planted in IDE logs and git history never reach the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import jobs
from daemon.config import load_config
from pipelines.scrub import is_excluded, scrub
from pipelines.store import Store
from support import T0, CommitSpec, all_text, autocomplete_event, continue_log, make_repo, write_config

# One planted value per kind (fake, but in each format's exact shape).
SECRETS = {
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


def code_with_secrets() -> str:
    s = SECRETS
    return (f'AWS = "{s["aws_access_key"]}"\nGH = "{s["github_token"]}"\nGL = "{s["gitlab_token"]}"\n'
            f'SLACK = "{s["slack_token"]}"\nSTRIPE = "{s["stripe_key"]}"\nGOOGLE = "{s["google_api_key"]}"\n'
            f'JWT = "{s["jwt"]}"\nKEY = """{s["private_key"]}"""\n'
            f'DB = "postgres://app:{s["url_credentials"]}@db.internal:5432/app"\n'
            f'password = "{s["secret_assignment"]}"\nsigning = "{s["high_entropy"]}"\n')


def test_no_planted_secret_reaches_any_table(tmp_path: Path) -> None:
    code = code_with_secrets()
    continue_log(tmp_path / "alice", [
        autocomplete_event(prefix=code, completion="x = 1\n", accepted=True),
        autocomplete_event(prefix="def f():\n", completion=code, accepted=False),
        autocomplete_event(suffix=code),
        '{"broken": "' + SECRETS["github_token"],  # quarantined: the excerpt is scrubbed too
    ])
    make_repo(tmp_path / "repo", [CommitSpec({"app/settings.py": code}, when=T0,
                                             message=f"add settings (token {SECRETS['slack_token']})")])
    setup = write_config(tmp_path / "site", [
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice"},
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}])
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        report = jobs.collect(store, cfg)
        counts = jobs.status(store, cfg)
    finally:
        store.close()
    assert report["error"] is None and counts["suggestions"]["total"] == 3 and counts["quarantined"]["total"] == 1
    text = all_text(cfg.state_dir / "store.duckdb")
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

"""Secrets planted in IDE logs and git history never reach the store."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sysconfig
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from collectors.continue_http import append_to_inbox
from daemon.config import load_config
from pipelines.ingest.scrub import (
    _LITERAL,
    CUT_SECRET_CHARS,
    SEAM_CHARS,
    FileScrubber,
    _find,
    _literals,
    _not_code,
    _nothing_at_the_cursor,
    cursor_spans,
    find_secrets,
    is_excluded,
    replace_repeats,
    scrub,
    scrub_diff,
    scrub_fields,
    scrub_json,
)
from support import (
    T0,
    CommitSpec,
    all_text,
    autocomplete_event,
    collect_site,
    commit,
    continue_event,
    continue_log,
    day_ms,
    make_repo,
    tabby_action,
    tabby_completion,
    table_rows,
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
    "openai_key": "sk-proj-" + "Hk9Xm2Qp7Lz4Rt8Vn1Bc" + "T3BlbkFJ" + "6Yh3Gs5Fw0Ej2Kq7Wm2Kx9Lp4R",
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


def _pieces(secret: str, n: int = 10) -> set[str]:
    """Every 10 characters of a secret's own material: a key block's body, else its last 20 characters (the
    random part; a webhook's or URL's start is public and may stay)."""
    core = secret.splitlines()[1] if "\n" in secret else secret[-20:]
    return {core[i:i + n] for i in range(len(core) - n + 1)}


def test_a_cursor_anywhere_leaves_no_part_of_a_secret() -> None:
    """Every place a cursor can be in a file of secrets, with and without a completion: the prefix, the
    completion and the suffix each hold part of a secret (or its name, or its BEGIN line), never all of it."""
    code = code_with_secrets()
    values = list(SECRETS.values())
    for cursor in range(0, len(code), 3):  # every third place: 4 s instead of 13
        for completion in ("", code[cursor:cursor + 9]):
            suffix = code[cursor + len(completion):]
            at_prefix, at_completion, at_suffix = cursor_spans(code[:cursor], [completion], suffix)
            out = "\0".join(t or "" for t in scrub_fields([code[:cursor], completion, suffix], None,
                                                           [at_prefix, at_completion, at_suffix]))
            leaked = [v for v in values if any(piece in out for piece in _pieces(v))]
            assert not leaked, (cursor, completion, leaked)


def test_the_windows_at_a_cursor_are_skipped_only_when_they_hold_nothing() -> None:
    """`cursor_spans` skips its windows when one scan finds no marker or keyword in any of them and no literal
    can cross a seam; wherever it does, scanning each window finds nothing either. Real files with secrets
    planted next to random cursors, and every cursor in a file of secrets."""
    rng = random.Random(13)
    cases = []
    code = code_with_secrets()
    cases += [(code[:c], code[c:c + 9], code[c + 9:]) for c in range(0, len(code), 2)]
    cases += [(code[:c], "x = 1\n", code[c:]) for c in range(1, len(code), 2)]
    for text in _email_sources():
        for _ in range(300):
            at = rng.randrange(len(text))
            planted = text[:at] + rng.choice([*_AT_A_CUT, *SECRETS.values()]) + text[at:]
            cursor = max(0, min(len(planted), at + rng.randrange(-300, 300)))
            n = rng.choice([0, 3, 30])
            cases.append((planted[:cursor], planted[cursor:cursor + n], planted[cursor + n:]))
            cases.append((planted[:cursor], "x = 1\n", planted[cursor:]))  # a middle that parts the two sides
    skipped = 0
    for prefix, completion, suffix in cases:
        before, after = prefix[-SEAM_CHARS:], suffix[:SEAM_CHARS]
        for middles in ([completion], []):
            if _nothing_at_the_cursor(before, middles, after):
                skipped += 1
                for window in {before + after, *(before + m + after for m in middles)}:
                    assert _find(window, None, False) == [], (prefix[-40:], middles, suffix[:40])
    assert 800 < skipped < 2 * len(cases) - 2000, (skipped, len(cases))  # 1,705 of 11,556 when written


def test_a_secret_split_by_the_cursor_is_scrubbed_on_the_way_into_the_store(tmp_path: Path) -> None:
    key = SECRETS["private_key"]
    continue_log(tmp_path / "alice", [
        autocomplete_event(prefix="import os\n\npassword = ", suffix=f'"{_PW}"\n', completion="os.environ[\"PW\"]"),
        autocomplete_event(prefix="cfg = {\n    'api_key': ", completion=f"'{SECRETS['high_entropy']}',",
                           suffix="\n}\n"),
        autocomplete_event(prefix=f'KEY = """{key[:48]}', completion=key[48:70], suffix=f'{key[70:]}"""\n'),
    ])
    write_lines(tmp_path / "tabby" / "events" / "2026-10-01.json", [
        tabby_completion("cmpl-1", day_ms("2026-10-01", 1), prefix=f'GH = "{SECRETS["github_token"][:9]}',
                         text=f'{SECRETS["github_token"][9:]}"'),
        tabby_action("view", "cmpl-1", day_ms("2026-10-01", 2))])
    setup = write_config(tmp_path / "site", [
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice"},
        {"kind": "tabby", "path": str(tmp_path / "tabby"), "name": "tabby"}])
    report, db = collect_site(setup.config)
    assert report["error"] is None and report["status"]["suggestions"]["total"] == 4
    text = all_text(db)
    for secret in (_PW, SECRETS["high_entropy"], key, SECRETS["github_token"]):
        assert not any(piece in text for piece in _pieces(secret)), secret
    assert 'password = ' in text and "<SECRET:private_key>" in text


@pytest.mark.parametrize("code", [
    'password = (\n    "{pw}"\n)\n',  # Python's long-line form
    'DB = {{\n    "password":\n        "{pw}",\n}}\n',
    'db_password = os.environ.get("DB_PASSWORD", "{pw}")\n',
])
def test_a_value_on_a_later_line_or_in_a_call_is_still_an_assignment(code: str) -> None:
    out = scrub(code.format(pw=_PW))
    assert _PW not in out and "<SECRET:secret_assignment>" in out


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


# -- file contents scrubbed piece by piece (FileScrubber) ----------------------------------------------------

_KEY = SECRETS["high_entropy"]
_PW = SECRETS["secret_assignment"]
# Secrets placed where a cut at a blank line could split them from their name, or right at a cut.
_AT_A_CUT = [
    f'password =\n\n"{_PW}"',  # the name before the cut, the value after it
    f'db_password\n=\n\n\n"{_PW}"',  # an operator alone on the line before the cut
    f'api_key:\n\n\n  "{_KEY}"',
    f'client_secret \u00a0\n\u00a0\n\n= "{_KEY}"',  # a line of unicode blanks before the cut
    f'SIGNING =\n\n\n\nf"{_KEY}"',
    f"\n\nAWS = '{SECRETS['aws_access_key']}'\n\n",  # a secret alone between two cuts
    f'token = "{_KEY}"\n\n',
    f"\n\n='{_KEY}'",
    f'DB = "postgres://app:{SECRETS["url_credentials"]}@db:5432/app"\n\n',
    # a private key with a blank line inside its block, and one whose END line an edit removes
    SECRETS["private_key"].replace("\n", "\n\n", 1),
    "-----BEGIN RSA PRIVATE KEY-----\n" + "\n\n".join([_KEY] * 3),
    f'\u0130\npassword = "{_PW}"',  # 'İ' lower-cases to two characters
    f"DB_PASSWORD={_PW.replace('-', '')}2\n\n",
]
# The same values without their names: a secret where a version names it elsewhere (replace_repeats), left
# where none does.
_WITHOUT_NAME = f'    login("{_PW}")\n\n    sign(\'{_KEY}\')\n# the key: {_KEY}\n'


def test_the_literal_scan_reads_around_long_runs_as_the_whole_text_scan_finds() -> None:
    """`_literals` runs the high-entropy regex only from before each run of LITERAL_MIN_CHARS token characters;
    it yields the matches of the regex over the whole text, the same ones in the same order. Real code (the
    stdlib's email package and a file of secrets, whole and cut anywhere), and texts made of what the regex
    turns on: quotes, "=", spaces and tabs, runs around 24 and past 512 characters, a non-ASCII character."""
    rng = random.Random(15)
    texts = [*_email_sources(), code_with_secrets()]
    texts += [t[a:a + rng.randrange(1, 3000)] for t in list(texts) for a in rng.sample(range(len(t)), 40)]
    pieces = ['"', "'", "`", "=", "==", " ", "\t", "\n", "x", ".", "=\t ", "é", *SECRETS.values()]
    for _ in range(3000):
        parts = []
        for _ in range(rng.randrange(1, 12)):
            if rng.random() < 0.5:
                parts.append(rng.choice(pieces))
            else:
                n = rng.choice([3, 22, 23, 24, 25, 40, 511, 512, 513, 1100])
                parts.append("".join(rng.choice("aB3+/=_-.~") for _ in range(n)))
        texts.append("".join(parts))
    found = 0
    for text in texts:
        want = [(m.span(), m.span("s")) for m in _LITERAL.finditer(text)]
        assert [(m.span(), m.span("s")) for m in _literals(text)] == want, text[:80]
        found += len(want)
    assert found > 3000, found


def _email_sources() -> list[str]:
    """Six real files whose successive versions the FileScrubber tests make: the stdlib's email package."""
    email = Path(sysconfig.get_paths()["stdlib"]) / "email"
    return [p.read_text(encoding="utf-8") for p in sorted(email.glob("*.py"))[:6]]


def _versions(rng: random.Random, text: str, n: int) -> list[str]:
    """Successive versions of one file, as commits make them: spans of lines replaced, deleted or added, a
    planted secret now and then, blank lines added and removed next to them."""
    lines = text.splitlines(keepends=True)
    out = []
    for _ in range(n):
        _edit(rng, lines, text)
        out.append("".join(lines))
    return out


def _edit(rng: random.Random, lines: list[str], text: str) -> None:
    """One commit's edit of a file's lines, in place."""
    at = rng.randrange(len(lines) + 1)
    roll = rng.random()
    if roll < 0.35:
        lines[at:at] = [s + "\n" for s in rng.choice(_AT_A_CUT).split("\n")]
    elif roll < 0.55:
        del lines[at:at + rng.randint(1, 4)]  # may join a name to a value across blank lines
    elif roll < 0.75:
        lines[at:at] = ["\n"] * rng.randint(1, 3)
    else:
        donor = rng.choice([*_AT_A_CUT, _WITHOUT_NAME, text]).splitlines(keepends=True) or ["\n"]
        start = rng.randrange(len(donor))
        lines[at:at + rng.randint(0, 3)] = donor[start:start + rng.randint(1, 8)]


@pytest.mark.parametrize("against_base", [False, True])
def test_file_scrubber_gives_the_whole_file_scrub_on_every_version(against_base: bool) -> None:
    """A harvest scrubs each version of a file piece by piece, reusing pieces it saw in earlier versions, and
    (`against_base`) only the part that differs from the version before when that one gave up nothing; the
    result must be what scrubbing the whole file gives, secrets at the cuts included."""
    rng = random.Random(3)
    sources = _email_sources()
    scrubber = FileScrubber(max_chars=200_000)  # small, so pieces and clean versions are also dropped
    checked = planted = 0
    for f, text in enumerate(sources):
        base = ""
        for n, version in enumerate(_versions(rng, text, 60)):
            mine: Counter[str] = Counter()
            whole: Counter[str] = Counter()
            if against_base:
                out = scrubber.scrub_version(f"{f}.{n}", version, mine, base)
                base = f"{f}.{n}"
            else:
                out = scrubber.scrub(version, mine)
            assert out == scrub(version, whole)
            assert mine == whole
            checked += 1
            planted += _PW in version or _KEY in version
    assert checked == 360 and planted > 200


def test_a_version_read_against_a_clean_one_before_gives_the_whole_file_scrub() -> None:
    """A version whose version before gave up nothing is scrubbed only between the safe cuts around what
    changed. Each edit here starts from the last version without a secret (as a commit after a clean one),
    so most of them plant a secret next to text shared with that version: beside a name left above a cut, in
    a blank-line run, after an operator alone on its line; the result must be what scrubbing the whole file
    gives."""
    rng = random.Random(5)
    sources = _email_sources()
    scrubber = FileScrubber(max_chars=200_000)
    read_against = planted = 0
    for f, text in enumerate(sources):
        base, base_lines = "", text.splitlines(keepends=True)
        for n in range(60):
            lines = list(base_lines)
            _edit(rng, lines, text)
            version = "".join(lines)
            before = scrubber.against_base
            mine: Counter[str] = Counter()
            whole: Counter[str] = Counter()
            assert scrubber.scrub_version(f"{f}.{n}", version, mine, base) == scrub(version, whole)
            assert mine == whole
            read_against += scrubber.against_base - before
            if whole:
                planted += scrubber.against_base - before
            else:
                base, base_lines = f"{f}.{n}", lines
    assert read_against > 250 and planted > 100, (read_against, planted)  # 271 and 127 when written


@pytest.mark.parametrize("planted", [p for p in _AT_A_CUT if "PRIVATE KEY" not in p])
def test_a_value_put_after_a_name_left_above_a_cut_is_scrubbed(planted: str) -> None:
    """The version before holds the name and a harmless value after the cut (it gave up nothing); the commit
    changes only the value's line. The changed part must start before the name's piece, which runs on."""
    values = (_PW, _KEY, SECRETS["aws_access_key"], SECRETS["url_credentials"], _PW.replace("-", "") + "2")
    value = next(v for v in values if v in planted)
    before = f"def f():\n    return 1\n\n\n{planted.replace(value, 'None')}\n\ndef g():\n    return 2\n"
    after = before.replace("None", value)
    scrubber = FileScrubber()
    assert scrubber.scrub_version("before", before) == before == scrub(before)
    out = scrubber.scrub_version("after", after, base="before")
    assert scrubber.against_base == 1
    assert out == scrub(after) and value not in out


def test_file_scrubber_rescans_only_the_changed_pieces() -> None:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "email" / "message.py").read_text(encoding="utf-8")
    scrubber = FileScrubber()
    scrubber.scrub(text)
    assert scrubber.new_chars == len(text)
    edited = text.replace("def __init__(self, policy=compat32):", "def __init__(self, policy=None):")
    assert edited != text and scrubber.scrub(edited) == scrub(edited)
    assert scrubber.new_chars - len(text) < len(text) / 50


@pytest.mark.parametrize("planted", _AT_A_CUT)
def test_a_secret_at_a_cut_is_scrubbed_when_only_its_neighbour_changes(planted: str) -> None:
    """The commit changes only the lines next to the planted text (a zero-context hunk that stops at it):
    the unchanged pieces come from the cache, and the secret must still go."""
    scrubber = FileScrubber()
    before = f"def f():\n    return 1\n\n\n{planted}\n\ndef g():\n    return 2\n"
    after = before.replace("return 1", "return 10").replace("return 2", "return 20")
    for version in (before, after, after.replace(planted, planted.replace("\n\n", "\n\n\n"))):
        out = scrubber.scrub(version)
        assert out == scrub(version)
        assert _PW not in out and _KEY not in out and SECRETS["aws_access_key"] not in out
        assert SECRETS["url_credentials"] not in out and "b3BlbnNzaC1rZXkt" not in out


def test_a_secret_cut_from_its_name_by_a_hunk_is_scrubbed_in_diffs_and_contents(tmp_path: Path) -> None:
    """Commit 1 leaves `password =` before a blank line; commit 2 changes only the line after it into the value,
    so its zero-context hunk holds the value without the name; commit 4 takes the value out again (a "-" line
    without the name). The contents are scrubbed from cached pieces plus the changed ones, and the name's piece
    runs on into the value's; the diffs lose what the whole versions gave up."""
    head = "import os\n\n\ndef connect():\n    return os.environ\n\n\n"
    bare = "hunter2Prod9"
    make_repo(tmp_path / "repo", [
        CommitSpec({"app/db.py": head + "password =\n\nlookup()\n", "deploy/env.sh": "set -e\n"}, when=T0,
                   message="first"),
        CommitSpec({"app/db.py": head + f'password =\n\n"{_PW}"\n', "deploy/env.sh": f"set -e\nDB_PASSWORD={bare}\n"},
                   when=T0 + timedelta(hours=1), message="second"),
        CommitSpec({"app/db.py": head + f'password =\n\n"{_PW}"\n\n\nx = 1\n'}, when=T0 + timedelta(hours=2),
                   message="third"),
        CommitSpec({"app/db.py": head + "password =\n\nlookup()\n\n\nx = 1\n", "deploy/env.sh": "set -e\n"},
                   when=T0 + timedelta(hours=3), message="fourth"),
    ])
    setup = write_config(tmp_path / "site", [{"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}])
    report, db = collect_site(setup.config)
    assert report["error"] is None and report["status"]["commits"]["total"] == 4
    text = all_text(db)
    assert _PW not in text and bare not in text
    assert text.count('password =\n\n"<SECRET:secret_assignment>"') == 2  # the versions of commits 2 and 3
    diffs = [r[5] for r in table_rows(db, "commit_files") if r[1] == "app/db.py"]
    assert sum('+"<SECRET:secret_assignment>"' in d for d in diffs) == 1
    assert sum('-"<SECRET:secret_assignment>"' in d for d in diffs) == 1


def test_a_harvest_a_few_commits_at_a_time_stores_what_one_harvest_of_the_history_stores(tmp_path: Path) -> None:
    """The service harvests a few commits at a time: each modified file's version before was stored by an
    earlier collect, is read again, and the new version is scrubbed against it (`scrub_version`'s base). The
    commits edit two real files as `_edit` does (secrets planted beside shared text, lines deleted and copied);
    every stored row must be what one harvest of the whole history stores. (A planted value can stay where an
    edit left it without its name in a version that names it nowhere: nothing knows it there, in either
    harvest.)"""
    rng = random.Random(11)
    email = Path(sysconfig.get_paths()["stdlib"]) / "email"
    texts = {f"app/{name}": (email / name).read_text(encoding="utf-8") for name in ("charset.py", "header.py")}
    lines = {path: text.splitlines(keepends=True) for path, text in texts.items()}
    repo = make_repo(tmp_path / "repo", [CommitSpec(dict(texts), when=T0, message="first")])
    steps = write_config(tmp_path / "steps", [{"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}])
    collect_site(steps.config)
    for n in range(1, 31):
        changed = {}
        for path in rng.sample(sorted(texts), rng.randint(1, 2)):
            # Each edit starts from the file's last version without a secret, so that many versions are read
            # against a clean version before and plant a secret next to what they share with it.
            edited = list(lines[path])
            _edit(rng, edited, texts[path])
            changed[path] = "".join(edited)
            if not find_secrets(changed[path]):
                lines[path] = edited
        commit(repo, CommitSpec(changed, when=T0 + timedelta(hours=n), message=f"edit {n}"))
        if n % 3 == 0:
            report, steps_db = collect_site(steps.config)
            assert report["error"] is None
    whole = write_config(tmp_path / "whole", [{"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}])
    report, whole_db = collect_site(whole.config)
    assert report["status"]["commits"]["total"] == 31
    for table in ("commits", "commit_files", "blobs", "scrubs"):
        assert table_rows(steps_db, table) == table_rows(whole_db, table), table
    scrubbed = [r for r in table_rows(steps_db, "scrubs") if r[0] == "blobs"]
    assert sum(r[3] for r in scrubbed) > 15  # the planted secrets the versions gave up (23 when written)
    for blob, content in table_rows(steps_db, "blobs"):  # and each version is what scrubbing it whole gives
        raw = subprocess.run(["git", "cat-file", "blob", blob], cwd=tmp_path / "repo", capture_output=True,
                             check=True).stdout.decode("utf-8")
        assert content == scrub(raw), blob


# Values the detector gave up in five real histories that showed again in the same file version (bench/README.md,
# "A secret's value where its name is not"), and where they showed.
_REAL_REPEATS = [
    # flask's docs: generated keys, then the same literal in an example without the name
    ('SECRET_KEY = "192b9bdd22ab9ed4d12e236c78afcb9a393ec15f71bbf5dc987d54727823bcbf"\n',
     "$ python -c 'import secrets; print(secrets.token_hex())'\n"
     "'192b9bdd22ab9ed4d12e236c78afcb9a393ec15f71bbf5dc987d54727823bcbf'\n"),
    ("app.secret_key = b'_5#y2L\"F4Q8z\\n\\xec]/'\n", "    sign(b'_5#y2L\"F4Q8z\\n\\xec]/', data)\n"),
    # requests' docs: a table of OAuth tokens under the example that names them
    ('oauth_token = "kkk9d7dh3k39sjv7"\n', "|       oauth_token      | kkk9d7dh3k39sjv7 |\n"),
    (f'password = "{_PW}"\n', f'    assert login(user, "{_PW}")\n'),
]


@pytest.mark.parametrize(("named", "elsewhere"), _REAL_REPEATS)
def test_a_secret_value_is_scrubbed_where_it_shows_again_without_its_name(named: str, elsewhere: str) -> None:
    """Whole and in pieces, against a version before that held only the value without its name, and across the
    fields of one event."""
    ((start, end, _),) = find_secrets(named)
    value = named[start:end]
    assert value in elsewhere
    before = f"import os\n\n\ndef f():\n    return 1\n\n\n{elsewhere}"
    after = f"import os\n\n{named}\n\ndef f():\n    return 1\n\n\n{elsewhere}"
    counts: Counter[str] = Counter()
    out = scrub(after, counts)
    assert value not in out and sum(counts.values()) == 2
    scrubber = FileScrubber()
    assert scrubber.scrub_version("before", before) == before  # no name there: nothing is known of the value
    assert scrubber.scrub_version("after", after, base="before") == out and scrubber.against_base == 1
    assert FileScrubber().scrub(after) == out
    fields = scrub_fields([named, elsewhere, None, "x = 1\n" + elsewhere])
    assert not any(value in (f or "") for f in fields), fields


@pytest.mark.parametrize("value", [
    "complex128",  # a word with a number: `dtype_token = "complex128"`, then np.complex128 156 times
    "decoded:base64", "~opencensus.tags.tag_key.TagKey", "cafebabe:deadbeef",  # names joined by "." or ":"
    "([a-z0-9]{64})", "pypi-[A-Za-z0-9]{8}",  # patterns
    "config", "user123",  # shorter than 8 characters (`config` showed 1,311 times in flask's versions)
])
def test_a_value_the_detector_took_from_code_is_not_spread_through_the_file(value: str) -> None:
    text = (f"from x import {value}\nx = np.{value}\n# {value}\nf({value}, 2)\nz = \"{value}\"\n"
            f"url = 'https://h/{value}/y'\n")
    assert replace_repeats(text, [("secret_assignment", value)]) == text


@pytest.mark.parametrize("value", [
    "MLDSA44Ed25519PrivateKey",  # glued capitalized words: a type's name (the entropy rule's false positive)
    "open-sesame-please",  # words
])
def test_a_value_that_reads_as_no_key_is_spread_only_as_a_whole_literal(value: str) -> None:
    text = f"from x import {value}\n# {value}\nurl = 'https://h/{value}/y'\nz = '{value}'\n"
    out = replace_repeats(text, [("high_entropy", value)])
    assert out == text.replace(f"'{value}'", "'<SECRET:high_entropy>'") and out != text


@pytest.mark.parametrize(("name", "value"), [("password", _PW), ("oauth_token", "kkk9d7dh3k39sjv7")])  # words, a key
def test_a_value_the_cursor_cuts_anywhere_is_scrubbed(name: str, value: str) -> None:
    """The prefix names the value, and the cursor sits anywhere in a later use of it: before or after it, or
    inside it (`login("corr` in the prefix, `ect-horse-battery", ...` in the completion); the value is also
    all of a completion."""
    named = f'{name} = "{value}"\n\nlogin("'
    for cut in range(len(value) + 1):
        fields = scrub_fields([named + value[:cut], value[cut:] + '", retries=3)\n', "\nx = 1\n"])
        assert not any(value[:4] in (f or "") or value[-4:] in (f or "") for f in fields), (cut, fields)
    fields = scrub_fields([named, value, '", retries=3)\n'])
    assert fields[1] == "<SECRET:secret_assignment>"
    # nothing names it: left, at every cut
    assert scrub_fields(['login("' + value[:5], value[5:] + '")']) == ['login("' + value[:5], value[5:] + '")']


def test_a_value_spread_is_counted_and_the_quotes_stay() -> None:
    counts: Counter[str] = Counter()
    text = 'a = "open-sesame-please"\nb = `open-sesame-please`\n# open-sesame-please\n'
    assert replace_repeats(text, [("secret_assignment", "open-sesame-please")], counts) == (
        'a = "<SECRET:secret_assignment>"\nb = `<SECRET:secret_assignment>`\n# open-sesame-please\n')
    assert counts == {"secret_assignment": 2}


def test_a_value_named_once_leaves_the_store_wherever_it_shows_again(tmp_path: Path) -> None:
    """End to end: a file version, a Continue and a Tabby completion that name a value once and use it again."""
    code = f'DB_PASSWORD = "{_PW}"\n\n\ndef connect():\n    return db.login("app", "{_PW}")\n'
    named, used = f'password = "{_PW}"\n\n', f'login("{_PW}")\n'
    continue_log(tmp_path / "alice", [
        autocomplete_event(prefix=named, completion=used, accepted=True),
        # the model suggests the value it read above, the cursor inside the literal
        autocomplete_event(prefix=named + "db.connect(user, '", completion=f"{_PW}')", suffix="\n", accepted=True),
        autocomplete_event(prefix=named + f"db.connect(user, '{_PW[:6]}", completion=f"{_PW[6:]}')", accepted=True)])
    write_lines(tmp_path / "tabby" / "events" / "2026-10-01.json", [
        tabby_completion("cmpl-1", day_ms("2026-10-01", 1), prefix=named, text="sign(" + used),
        tabby_action("view", "cmpl-1", day_ms("2026-10-01", 2))])
    make_repo(tmp_path / "repo", [CommitSpec({"app/db.py": code}, when=T0, message="first")])
    setup = write_config(tmp_path / "site", [
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice"},
        {"kind": "tabby", "path": str(tmp_path / "tabby"), "name": "tabby"},
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}])
    report, db = collect_site(setup.config)
    assert report["error"] is None and report["status"]["commits"]["total"] == 1
    assert report["status"]["suggestions"]["total"] == 4
    text = all_text(db)
    assert _PW not in text
    for kept in ('db.login("app", "<SECRET:secret_assignment>")', 'sign(login("<SECRET:secret_assignment>")',
                 "<SECRET:secret_assignment>')"):
        assert kept in text, kept
    assert _PW[:6] not in text and _PW[6:] not in text


def test_a_tool_call_names_its_secrets_by_key(tmp_path: Path) -> None:
    """A tool call's parameters are an object: the key names the value (`{"db_password": "..."}`), which alone
    names nothing; a value given up there goes wherever the call shows it again (its output)."""
    pw, token = "Wq7zLk2xVn9pRt4m", "hunter2-Prod-Pw"
    params = {"host": "db.internal", "db_password": pw, "auth": {"api_token": token, "user": "alice"},
              "retries": 3, "flags": ["--verbose", "password"]}
    counts: Counter[str] = Counter()
    out = scrub_json({**params, "log": f"connected with {pw}"}, counts)
    assert out == {"host": "db.internal", "db_password": "<SECRET:secret_assignment>",
                   "auth": {"api_token": "<SECRET:secret_assignment>", "user": "alice"}, "retries": 3,
                   "flags": ["--verbose", "password"], "log": "connected with <SECRET:secret_assignment>"}
    assert counts == {"secret_assignment": 3}
    assert scrub_json({"name": pw, "user": token}) == {"name": pw, "user": token}  # no key names them
    v2 = tmp_path / "alice" / "dev_data" / "0.2.0"
    write_lines(v2 / "toolUsage.jsonl", [continue_event(
        "toolUsage", toolCallId="call-1", functionName="run_query", functionParams=params,
        toolCallArgs=json.dumps({"sql": "select 1"}), output=[{"content": f"logged in as alice ({token!r})"}])])
    setup = write_config(tmp_path / "site", [{"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice"}])
    report, db = collect_site(setup.config)
    assert report["error"] is None
    text = all_text(db)
    assert "run_query" in text and "db.internal" in text
    assert pw not in text and token not in text


def test_a_value_removed_in_a_later_harvest_leaves_no_trace_in_its_diff(tmp_path: Path) -> None:
    """The service harvests a few commits at a time: the version holding the value was stored by an earlier
    harvest, and the commit that takes the value out shows it on a "-" line without its name (the name is
    indented, so git's hunk header shows `def connect():` rather than the name)."""
    head = "import os\n\n\ndef connect():\n    password =\n\n"
    repo = make_repo(tmp_path / "repo", [
        CommitSpec({"app/db.py": head + "    lookup()\n"}, when=T0, message="first"),
        CommitSpec({"app/db.py": head + f'    "{_PW}"\n'}, when=T0 + timedelta(hours=1), message="second"),
    ])
    setup = write_config(tmp_path / "site", [{"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}])
    first, db = collect_site(setup.config)
    assert first["error"] is None and first["status"]["commits"]["total"] == 2
    commit(repo, CommitSpec({"app/db.py": head + "    lookup()\n"}, when=T0 + timedelta(hours=2), message="third"))
    second, db = collect_site(setup.config)
    assert second["error"] is None and second["status"]["commits"]["total"] == 3
    diffs = [r[5] for r in table_rows(db, "commit_files") if r[1] == "app/db.py"]
    assert sum("@@ def connect():" in d for d in diffs) == 2  # the name is in neither hunk
    assert _PW not in all_text(db)
    assert sum('-    "<SECRET:secret_assignment>"' in d for d in diffs) == 1


def test_a_patch_is_scrubbed_as_the_code_it_holds() -> None:
    """Line-start patterns see the line under its "+" or "-", and a name and a value on adjacent lines of a
    hunk are read together, with no file version to go by (an old version harvested by an earlier run)."""
    patch = ("diff --git a/deploy/app.yaml b/deploy/app.yaml\n--- a/deploy/app.yaml\n+++ b/deploy/app.yaml\n"
             "@@ -3,3 +3,3 @@ db:\n-  db_password: s3cretValue9\n+  db_password: n3wValue9x\n"
             "-export API_TOKEN=Zq8Lw2ZrX9vT4nB6\n+password =\n+    \"correct-horse-battery\"\n")
    counts: Counter[str] = Counter()
    out = scrub_diff(patch, counts)
    for secret in ("s3cretValue9", "n3wValue9x", "Zq8Lw2ZrX9vT4nB6", "correct-horse-battery"):
        assert secret not in out
    assert counts == {"secret_assignment": 4}
    assert out.startswith(patch[:patch.index("-  db_password")])  # the headers are kept as they were
    assert "\n-  db_password: <SECRET:secret_assignment>\n" in out


def test_a_patch_between_scrubbed_versions_is_scanned_only_outside_its_code_lines() -> None:
    """With both versions scrubbed whole by the caller, a "+" or "-" line's secrets come from `known`: a
    secret the versions did not give up stays (what makes the shortcut a shortcut), while the headers, which
    no version holds as they are, are still scanned."""
    token = SECRETS["github_token"]
    patch = (f"diff --git a/app.py b/app.py\n--- a/app.py\n+++ b/app.py\n@@ -3 +3 @@ def f(token=\"{token}\"):\n"
             f"-x = 1\n+y = \"{SECRETS['aws_access_key']}\"\n")
    skipped = scrub_diff(patch, versions_scrubbed=True)
    assert SECRETS["aws_access_key"] in skipped and token not in skipped
    assert SECRETS["aws_access_key"] not in scrub_diff(patch)
    known = [("aws_access_key", SECRETS["aws_access_key"])]
    assert scrub_diff(patch, known=known, versions_scrubbed=True) == scrub_diff(patch, known=known)


@pytest.mark.parametrize("patch", [
    "", "\n", "+a", "-a\n", "---x", "+++ b\n@@ -1 +1 @@ x\n+y\n\\ No newline at end of file",
    "\n\n@@\n", "a\n\nb\n-c\n--- d\n-- e\n++ f\n+++ g", "diff --git a/x b/x\nnew file mode 100644\nindex 0..1\n"
    "--- /dev/null\n+++ b/x\n@@ -0,0 +1,2 @@\n+one\n+two\ndiff --git a/x b/x\n--- a/x\n+++ b/x\n"
    "@@ -4 +3,0 @@ def g():\n-z",
])
def test_the_lines_outside_code_are_those_a_multiline_match_finds(patch: str) -> None:
    """`_not_code` finds a patch's non-code lines by searching for "\n" (in C); the reference is the plain
    multi-line pattern it replaced."""
    reference = re.compile(r"^(?:[^+\-\n][^\n]*|\+\+\+[^\n]*|---[^\n]*)$", re.M)
    assert _not_code(patch) == [(m.start(), m.group()) for m in reference.finditer(patch)]


def test_a_key_inside_a_one_line_literal_goes_from_a_patch_with_another_key_block() -> None:
    """A Go test file holds a PEM block and, on one line, a literal with another whole key (gitleaks' own
    detect_test.go): the block's "-----BEGIN PRIVATE KEY-----" line must not be replaced before the longer
    line that holds it, or the second key's body stays."""
    body = "435fbRUBHrbHqLYxS3I7Oth8rgG0tBwfMcbk05Sgxq6QUzSYIQAopWvsTwk2sR"
    block = "-----BEGIN PRIVATE KEY-----\nMIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEAq7BFUpkGp3\n" \
            "-----END PRIVATE KEY-----"
    literal = f'"-----BEGIN PRIVATE KEY-----\\n{body}\\n-----END PRIVATE KEY-----"'
    version = f"const a = `{block}`\n\nvar b = {literal}\n"
    found: list[tuple[str, str]] = []
    FileScrubber().scrub(version, None, found)
    assert len(found) == 2 and "MIIBVgIBADANBgkq" in found[0][1]  # the block first
    patch = "diff --git a/k_test.go b/k_test.go\n--- /dev/null\n+++ b/k_test.go\n@@ -0,0 +1,5 @@\n" + "".join(
        f"+{line}\n" for line in version.splitlines())
    for out in (scrub_diff(patch, known=found, versions_scrubbed=True), scrub_diff(patch, known=found)):
        assert body not in out and "MIIBVgIBADANBgkq" not in out


def test_a_harvest_keeps_no_secret_in_the_diffs_it_does_not_scan(tmp_path: Path) -> None:
    """Every diff of this history joins versions the harvest scrubbed itself, so none is scanned but for its
    headers: the planted secrets are added, moved next to a changed line, cut from their names by a hunk, and
    removed; a value is cut short where git ends a hunk header's function context. None may reach the store."""
    code = code_with_secrets()
    moved = "\n".join(f"{line}  # moved" if i % 3 == 0 else line for i, line in enumerate(code.splitlines())) + "\n"
    # git cuts a hunk header's function context at 80 bytes: inside this value (it starts at column 67)
    staple = "correct-horse-battery-staple-9"
    header = f"def connect(user, host, port, timeout, retries, backoff, password=\"{staple}\"):\n    x = 1\n    y = 2\n"
    make_repo(tmp_path / "repo", [
        CommitSpec({"cfg/keys.py": code, "app/db.py": header}, when=T0, message="first"),
        CommitSpec({"cfg/keys.py": moved, "app/db.py": header.replace("y = 2", "y = 3")},
                   when=T0 + timedelta(hours=1), message="second"),
        CommitSpec({"cfg/keys.py": "x = 1\n"}, when=T0 + timedelta(hours=2), message="third"),
    ])
    setup = write_config(tmp_path / "site", [{"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}])
    report, db = collect_site(setup.config)
    assert report["error"] is None and report["status"]["commits"]["total"] == 3
    diffs = [r[5] for r in table_rows(db, "commit_files")]
    assert any("@@ def connect(user, host, port, timeout, retries, backoff, password=\"<SECRET:" in d
               for d in diffs)
    text = all_text(db)
    assert staple[:CUT_SECRET_CHARS] not in text
    for kind, secret in SECRETS.items():
        assert secret not in text, kind


def test_no_planted_secret_reaches_any_file_under_the_state_directory(tmp_path: Path, tiny_model: Path) -> None:
    """Not only the tables: the HTTP inbox, run directories (datasets, logs, adapters), exports, the registry."""
    from daemon import auth, jobs
    from daemon.api import ApiServer
    from daemon.service import _inbound
    from pipelines.scope import team
    from pipelines.store.db import Store

    code = code_with_secrets()
    plain = "".join(f"def fee_{i}(amount):\n    return amount * {i} // 100\n\n" for i in range(30))
    make_repo(tmp_path / "repo", [CommitSpec({f"app/m{i}.py": plain + code if i % 2 else plain + f"N = {i}\n"},
                                             when=T0 + timedelta(hours=i), message=f"m{i}") for i in range(16)])
    continue_log(tmp_path / "alice", [autocomplete_event(completionId=f"c{i}", accepted=i % 2 == 0,
                                                         timestamp=(T0 + timedelta(hours=i)).isoformat() + "Z",
                                                         prefix=plain + code, completion=f"x = {i}\n")
                                      for i in range(12)])
    setup = write_config(tmp_path / "site", [
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice", "developer": "alice@example.com"},
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}],
        teams=[{"name": "payments", "members": ["alice@example.com"]}],
        overrides={"": {"base_model": str(tiny_model)}, "continue_http": {"enabled": True},
                   "datasets": {"min_train_rows": 4, "min_heldout_rows": 1, "max_row_tokens": 256},
                   "train": {"max_steps": 2, "dev_adapters": False},
                   "evaluate": {"max_rows": 8, "generate_rows": 2, "max_new_tokens": 4},
                   "gate": {"min_improvement": -1.0, "edit_similarity_tolerance": 1.0, "exact_match_tolerance": 1.0,
                            "preference_accuracy_tolerance": 1.0, "generated_length_tolerance": 10.0,
                            "heldout_loss_tolerance_rel": 10.0}})
    cfg = load_config(setup.config)
    token, _ = auth.issue(cfg.state_dir, "alice@example.com")
    server = ApiServer("127.0.0.1", 0, "api", {}, {}, inbound=_inbound(cfg, lambda _: None)).start()
    try:
        import urllib.request

        for i, field in enumerate(("prefix", "completion", "suffix")):
            body = {"name": "autocomplete", "schema": "0.2.0", "level": "all",
                    "data": autocomplete_event(completionId=f"h{i}", **{field: code})}
            req = urllib.request.Request(server.url + "/continue/devdata", data=json.dumps(body).encode(),
                                         method="POST", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
    finally:
        server.stop()
    inbox_text = "".join(p.read_text() for p in (cfg.state_dir / "inbox" / "continue").iterdir())
    assert "<SECRET:" in inbox_text  # scrubbed before it was written, not only before the store

    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        result = jobs.cycle(store, cfg, "payments")
        assert result["outcome"] == "promoted", result
        jobs.export_dataset(store, cfg, team("payments"))
        scrubbed = jobs.status(store, cfg)["scrubbed"]
    finally:
        store.close()
    assert scrubbed.get("github_token", 0) >= 3 + 1  # the inbox's counts reached the store
    files = [p for p in cfg.state_dir.rglob("*") if p.is_file()]
    for where in ("inbox", "runs", "exports", "registry"):
        assert any(where in p.relative_to(cfg.state_dir).parts for p in files), f"nothing under {where}/"
    leaks = [f"{kind} in {p.relative_to(cfg.state_dir)}" for p in files for kind, secret in SECRETS.items()
             for needle in {secret, secret.splitlines()[1 if "\n" in secret else 0]}
             if needle.encode() in p.read_bytes()]
    assert leaks == []

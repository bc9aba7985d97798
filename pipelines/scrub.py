"""Secrets out of text before it is stored: every credential becomes a typed placeholder.

Applied to every text field (prefix, suffix, completion, commit messages, diffs, file contents, quarantine
excerpts) on the way into DuckDB, so nothing downstream (datasets, adapters) can see a secret. Each match
becomes `<SECRET:kind>`; the kinds are counted and shown by `devtune status`.

Two layers: well-known credential formats (exact prefixes and lengths, so close to no false positives),
then a high-entropy detector for unknown formats, restricted to string literals and assignment values,
where secrets live, so hashes and identifiers in ordinary code are left alone.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from fnmatch import fnmatchcase
from urllib.parse import unquote, urlparse

# (kind, pattern). The group named "s" is what gets replaced; without one the whole match is.
PATTERNS: list[tuple[str, str]] = [
    ("private_key", r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
                    r"(?:-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|\Z)"),
    ("aws_access_key", r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA)[A-Z2-7]{16}\b"),
    ("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{60,255})\b"),
    ("gitlab_token", r"\bgl(?:pat|dt|ptt|rt|soat|ft|imt|agent|cbt|oas)-[A-Za-z0-9_\-]{20,}"),
    ("slack_token", r"\bxox[abeposr]-[A-Za-z0-9-]{10,}"),
    ("slack_webhook", r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9/_+-]{20,}"),
    ("discord_webhook", r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[\w-]{30,}"),
    ("stripe_key", r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}\b"),
    ("google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}"),
    ("openai_key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}T3BlbkFJ[A-Za-z0-9_\-]{20,}"
                   r"|\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{40,}"),
    ("anthropic_key", r"\bsk-ant-[a-z0-9]{2,8}-[A-Za-z0-9_\-]{40,}"),
    ("npm_token", r"\bnpm_[A-Za-z0-9]{36}\b"),
    ("pypi_token", r"\bpypi-AgE[A-Za-z0-9_\-]{50,}"),
    ("huggingface_token", r"\bhf_[A-Za-z]{34}\b"),
    ("twilio_key", r"\bSK[0-9a-f]{32}\b"),
    ("sendgrid_key", r"\bSG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}\b"),
    ("telegram_token", r"\b\d{8,10}:AA[A-Za-z0-9_\-]{33}\b"),
    ("jwt", r"\beyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}"),
    ("azure_storage_key", r"(?i)AccountKey=(?P<s>[A-Za-z0-9+/]{80,}={0,2})"),
    # scheme://user:password@host: keep the user and host, drop the password.
    ("url_credentials", r"\b[a-zA-Z][a-zA-Z0-9+.\-]{1,20}://[^\s/:@'\"]{1,128}:(?P<s>[^\s/@'\"]{1,256})@"),
    # password = "...", "apiKey": "...", token: '...' (a quoted literal, not an expression).
    ("secret_assignment",
     r"(?i)[\"']?[a-z0-9_.\-]*(?:passw(?:or)?d|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|"
     r"private[_-]?key|client[_-]?secret|auth[_-]?key|credentials?)[a-z0-9_\-]*[\"']?\s*(?::=|=|:|=>)\s*"
     r"(?:[a-z_]\w*\()?[rbuf]?(?P<q>[\"'`])(?P<s>[^\"'`\n]{4,})(?P=q)"),
    # PASSWORD=hunter2 in .env files and shell (unquoted, upper-case name).
    ("secret_assignment",
     r"(?m)^[ \t]*(?:export[ \t]+)?[A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|APIKEY|ACCESS_KEY|"
     r"PRIVATE_KEY|CREDENTIALS?)[A-Z0-9_]*[ \t]*=[ \t]*(?P<s>[^\s'\"#$][^\s'\"#]{3,})"),
]

# A cheap literal prefilter decides which patterns can match at all: most code holds none of these
# markers, and then a pattern costs one substring test on the lower-cased text instead of a regex scan.
_MARKERS: list[tuple[str, ...]] = [
    ("private key",),
    ("akia", "asia", "abia", "acca", "agpa", "aida", "aipa", "anpa", "anva", "aroa", "apka"),
    ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ("glpat-", "gldt-", "glptt-", "glrt-", "glsoat-", "glft-", "glimt-", "glagent-", "glcbt-", "gloas-"),
    ("xox",), ("hooks.slack.com",), ("discord",), ("_live_", "_test_"), ("aiza",), ("sk-",), ("sk-ant-",),
    ("npm_",), ("pypi-",), ("hf_",), ("sk",), ("sg.",), (":aa",), ("eyj",), ("accountkey",), ("://",),
    ("pass", "pwd", "secret", "token", "key", "credential"),
    ("pass", "pwd", "secret", "token", "key", "credential"),
]
_COMPILED = [(kind, re.compile(p)) for kind, p in PATTERNS]
assert len(_MARKERS) == len(_COMPILED)

# High-entropy detector: a string literal or assignment value of 24+ token characters whose Shannon
# entropy is at least 4.0 bits/char and that mixes letters and digits. Measured on this repository's
# dependencies' Python sources (see bench/README.md) this flags about 1 literal in 20,000.
_LITERAL = re.compile(r"(?P<q>[\"'`])(?P<s>[A-Za-z0-9+/=_\-.~]{24,512})(?P=q)"
                      r"|(?<![\w.])=[ \t]*(?P<v>[A-Za-z0-9+/=_\-]{24,512})\b")
ENTROPY_BITS = 4.0


def shannon_entropy(text: str) -> float:
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _looks_random(token: str) -> bool:
    if "/" in token and token.count("/") > 2 and not token.endswith("="):
        return False  # a path, not a key
    has_digit = any(ch.isdigit() for ch in token)
    has_alpha = any(ch.isalpha() for ch in token)
    if not (has_digit and has_alpha):
        return False
    # CONSTANT_NAMES_2 and snake_case_ids_3 are not keys
    if (token.isupper() or token.islower()) and ("_" in token or "-" in token or "." in token):
        return False
    return shannon_entropy(token) >= ENTROPY_BITS


def scrub(text: str, counts: Counter[str] | None = None) -> str:
    """`text` with every secret replaced by `<SECRET:kind>`; kinds found are added to `counts`."""
    if not text:
        return text
    lower = text.lower()
    for (kind, pattern), markers in zip(_COMPILED, _MARKERS, strict=True):
        if not any(m in lower for m in markers):
            continue
        text = pattern.sub(functools.partial(_replace, kind=kind, counts=counts), text)
    return _LITERAL.sub(lambda m: _replace_entropy(m, counts), text)


# Values a keyword assignment holds that are not secrets: prose ("Enter your password"), templates and
# placeholders ("${TOKEN}", "<your-key>", "%s", "changeme"), and names that themselves contain the keyword
# ("bearer_token_kind", "api-key-header"). Everything else assigned to a secret-sounding name is scrubbed:
# a false positive costs one literal in a training row, a false negative leaks a credential.
_PLACEHOLDER = re.compile(r"\s|[${}%<>]|^(?:changeme|change_me|example|placeholder|redacted|dummy|test|none|null"
                          r"|x{3,}|\*+)$", re.I)
_IDENTIFIER = re.compile(r"^[a-z]+(?:[_\-.][a-z]+)*$", re.I)
_KEYWORDS = ("pass", "pwd", "secret", "token", "key", "credential", "auth")


def not_a_secret(value: str) -> bool:
    return bool(_PLACEHOLDER.search(value)) or (
        bool(_IDENTIFIER.match(value)) and any(k in value.lower() for k in _KEYWORDS))


def _replace(m: re.Match[str], kind: str, counts: Counter[str] | None) -> str:
    if "<SECRET:" in m.group(0):
        return m.group(0)  # already scrubbed by an earlier pattern
    if kind == "secret_assignment" and not_a_secret(m.group("s")):
        return m.group(0)
    if counts is not None:
        counts[kind] += 1
    if "s" in m.re.groupindex and m.group("s") is not None:
        start, end = m.span("s")
        base = m.start()
        whole = m.group(0)
        return whole[: start - base] + f"<SECRET:{kind}>" + whole[end - base:]
    return f"<SECRET:{kind}>"


def _replace_entropy(m: re.Match[str], counts: Counter[str] | None) -> str:
    group = "s" if m.group("s") is not None else "v"
    token = m.group(group)
    if not _looks_random(token):
        return m.group(0)
    if counts is not None:
        counts["high_entropy"] += 1
    start, end = m.span(group)
    whole = m.group(0)
    return whole[: start - m.start()] + "<SECRET:high_entropy>" + whole[end - m.start():]


def is_excluded(path: str, globs: tuple[str, ...]) -> bool:
    """Whether a file path (plain, repo-relative or a file:// URI) matches an exclude glob.

    Each glob is tried against the whole path, the path with a leading "/" (so "**/secrets/**" also
    matches "secrets/x" at the repo root) and the file name (so ".env*" matches "app/.env.local").
    """
    if path.startswith("file://"):
        path = unquote(urlparse(path).path)
    path = path.replace("\\", "/")
    name = path.rsplit("/", 1)[-1]
    candidates = (path, "/" + path.lstrip("/"), name)
    return any(fnmatchcase(c, g) for g in globs for c in candidates)

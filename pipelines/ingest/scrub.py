"""Secrets out of text before it is stored: every credential becomes a typed placeholder.

Applied to every text field (prefixes, suffixes, completions, prompts, messages, diffs, file contents, tool
arguments, quarantine excerpts) on the way into DuckDB, so nothing downstream (datasets, adapters) can see
a secret. Each match becomes `<SECRET:kind>`; the kinds are counted and shown by `devtune status`.

Three detectors, in priority order (a span found by an earlier one wins over an overlapping later one):
1. well-known credential formats: fixed prefixes and lengths, so close to no false positives;
2. assignments to secret-sounding names (`password = "..."`, `DB_PASSWORD=...`, `"apiKey": "..."`);
3. a high-entropy detector for unknown formats, restricted to string literals and assignment values,
   where secrets live, so hashes and identifiers in ordinary code are left alone.

Speed matters: every autocomplete event carries 1-3 KB of code, and ingest must keep up with DuckDB's own
JSON reader. A regex that can start anywhere costs 5-13 MB/s in Python's engine; a literal substring test
costs GB/s and a pattern that starts with a small character set ~140 MB/s (measured, bench/README.md). So
each format pattern runs only when one of its literal markers occurs in the text, assignments are found
from keyword hits (`str.find`) and matched in place, and the entropy scan starts on a quote or `=`.
detect-secrets was measured too and is far slower per byte (bench/README.md), which is why this module
keeps its own rules, modelled on the formats detect-secrets and gitleaks know.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any
from urllib.parse import unquote

from ahocorasick_rs import AhoCorasick


@dataclass(frozen=True)
class Rule:
    """A credential format: its kind, its pattern, and literals one of which must occur for it to match."""

    kind: str
    pattern: re.Pattern[str]
    markers: tuple[str, ...]
    lower: bool = False  # markers are tested against the lower-cased text (for case-insensitive patterns)


def _rule(kind: str, pattern: str, *markers: str, lower: bool = False) -> Rule:
    return Rule(kind, re.compile(pattern), markers, lower)


# The group named "s" is what gets replaced; without one the whole match is.
RULES: tuple[Rule, ...] = (
    _rule("private_key", r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
                         r"(?:-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|\Z)", "PRIVATE KEY"),
    # cloud providers
    _rule("aws_access_key", r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA)[A-Z2-7]{16}\b",
          "AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AIPA", "ANPA", "ANVA", "AROA", "APKA"),
    _rule("google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}", "AIza"),
    _rule("azure_storage_key", r"(?i)AccountKey=(?P<s>[A-Za-z0-9+/]{80,}={0,2})", "accountkey=", lower=True),
    _rule("azure_sas_token", r"[?&]sig=(?P<s>[A-Za-z0-9%+/]{30,}={0,2})", "sig="),
    _rule("digitalocean_token", r"\bdo[pro]_v1_[a-f0-9]{64}\b", "_v1_"),
    _rule("alibaba_access_key", r"\bLTAI[A-Za-z0-9]{12,20}\b", "LTAI"),
    # version control and CI
    _rule("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{60,255})\b",
          "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    _rule("gitlab_token", r"\bgl(?:pat|dt|ptt|rt|soat|ft|imt|agent|cbt|oas)-[A-Za-z0-9_\-]{20,}",
          "glpat-", "gldt-", "glptt-", "glrt-", "glsoat-", "glft-", "glimt-", "glagent-", "glcbt-", "gloas-"),
    _rule("bitbucket_token", r"\bATBB[A-Za-z0-9_=.\-]{24,}", "ATBB"),
    _rule("atlassian_token", r"\bATATT3[A-Za-z0-9_=.\-]{24,}", "ATATT3"),
    _rule("circleci_token", r"\bCCIPAT_[A-Za-z0-9_]{20,}", "CCIPAT_"),
    _rule("npm_token", r"\bnpm_[A-Za-z0-9]{36}\b", "npm_"),
    _rule("pypi_token", r"\bpypi-AgE[A-Za-z0-9_\-]{50,}", "pypi-AgE"),
    _rule("docker_token", r"\bdckr_pat_[A-Za-z0-9_\-]{20,}", "dckr_pat_"),
    _rule("huggingface_token", r"\bhf_[A-Za-z]{34}\b", "hf_"),
    # chat apps
    _rule("slack_token", r"\bxox[abeposr]-[A-Za-z0-9-]{10,}", "xox"),
    _rule("slack_webhook", r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9/_+-]{20,}", "hooks.slack.com"),
    _rule("discord_webhook", r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[\w-]{30,}",
          "/api/webhooks/"),
    _rule("teams_webhook", r"https://[A-Za-z0-9.\-]+\.webhook\.office\.com/webhookb2/[A-Za-z0-9@/\-]{40,}",
          "webhook.office.com"),
    _rule("telegram_token", r"\b\d{5,16}:AA[A-Za-z0-9_\-]{30,40}\b", ":AA"),
    # payments
    _rule("stripe_key", r"\b(?:sk|rk|pk|whsec)_(?:live|test)_[A-Za-z0-9]{16,}\b|\bwhsec_[A-Za-z0-9]{24,}\b",
          "_live_", "_test_", "whsec_"),
    _rule("square_token", r"\bsq0(?:atp|csp|idp)-[A-Za-z0-9_\-]{22,}|\bEAAA[A-Za-z0-9_\-+=]{60}\b", "sq0", "EAAA"),
    _rule("paypal_braintree_token", r"\baccess_token\$(?:production|sandbox)\$[a-z0-9]{16}\$[a-f0-9]{32}",
          "access_token$"),
    _rule("shopify_token", r"\bshp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}\b", "shpat_", "shpss_", "shpca_", "shppa_"),
    # AI and mail APIs
    _rule("openai_key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}T3BlbkFJ[A-Za-z0-9_\-]{20,}"
                        r"|\bsk-(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{40,}", "sk-"),
    _rule("anthropic_key", r"\bsk-ant-[a-z0-9]{2,8}-[A-Za-z0-9_\-]{40,}", "sk-ant-"),
    # A pattern that starts with a literal uses the regex engine's fast prefix search: 50x faster on whole
    # files than a leading \b or alternation (0.67 s vs 0.012 s on 20 MB), and "SK"/"AC" occur in most files.
    _rule("twilio_key", r"SK[0-9a-f]{32}\b", "SK"),
    _rule("twilio_key", r"AC[0-9a-f]{32}\b", "AC"),
    _rule("sendgrid_key", r"\bSG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}\b", "SG."),
    _rule("jwt", r"\beyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}", "eyJ"),
    # scheme://user:password@host: keep the user and host, drop the password. Starts at "://" (see above).
    _rule("url_credentials", r"://[^\s/:@'\"]{1,128}:(?P<s>[^\s/@'\"]{1,256})@", "://"),
)

# Assignments to secret-sounding names. Found from a keyword hit, then matched in place.
_SECRET_NAME = (r"[a-z0-9_.\-]*(?:passw(?:or)?d|passwd|passphrase|pwd|secret|token|api[_-]?key|access[_-]?key|"
                r"private[_-]?key|client[_-]?secret|auth[_-]?key|credentials?)[a-z0-9_\-]*")
# Where a secret-sounding name can be, in lower-cased text. Not a bare "key": _SECRET_NAME never matches one,
# and "key" occurs ~1.2 times per line of ordinary code (17 regex matches per event, measured).
_KEYWORDS = ("passw", "passphrase", "pwd", "secret", "token", "credential",
             *(f"{w}{sep}key" for w in ("api", "access", "private", "auth") for sep in ("", "_", "-")))
# password = "...", "apiKey": "...", token: '...', secret := f"..." (a quoted literal, not an expression), also
# wrapped in a call or in parentheses across lines (`password = (\n    "..."\n)`, Python's long-line form).
_ASSIGN_QUOTED = re.compile(
    rf"(?i)(?P<name>{_SECRET_NAME})\\?[\"']?\s*(?::=|=|:|=>)\s*(?:[a-z_]\w*\(|\()?\s*[rbuf]?"
    r"\\?(?P<q>[\"'`])"
    # The value may sit in JSON-encoded text (tool arguments), where its quotes arrive as \".
    r"(?P<s>[^\"'`\n]{4,}?)\\?(?P=q)")
# A call's quoted first argument followed by a literal: getenv("DB_PASSWORD", "...") and .get("token", "...")
# defaults. Not any quoted name followed by a comma: on ordinary code that matched lists of names and doubled
# the false positives (817 -> 1,336 on 60 MB, bench/scrub_fp.py).
_ARG_DEFAULT = re.compile(
    rf"(?i)(?<=\w\([\"'])(?P<name>{_SECRET_NAME})[\"']\s*,\s*[rbuf]?(?P<q>[\"'`])(?P<s>[^\"'`\n]{{4,}}?)(?P=q)")
# PASSWORD=hunter2 in .env files and shells, db_password: s3cret in YAML (unquoted, the rest of the line).
_ASSIGN_BARE = re.compile(
    rf"(?im)^[ \t]*(?:export[ \t]+)?[\"']?(?P<name>{_SECRET_NAME})[\"']?[ \t]*[=:][ \t]*"
    r"(?P<s>[^\s'\"`#$(){}\[\],;<>]{4,})[ \t]*(?:#.*)?$")

# Values a keyword assignment holds that are not secrets: prose ("Enter your password"), templates and
# placeholders ("${TOKEN}", "<your-key>", "%s", "changeme"), and names that themselves contain the keyword
# ("bearer_token_kind", "api-key-header"). Everything else assigned to a secret-sounding name is scrubbed:
# a false positive costs one literal in a training row, a false negative leaks a credential.
_PLACEHOLDER = re.compile(r"\s|[${}%<>]|^(?:changeme|change_me|example|placeholder|redacted|dummy|test|none|null"
                          r"|true|false|x{3,}|\*+)$", re.I)
_IDENTIFIER = re.compile(r"^[a-z]+(?:[_\-.][a-z]+)*$", re.I)
_WORDS = re.compile(r"^[a-z_]+(?:[\-. ][a-z_]+)*$", re.I)
_DOTTED = re.compile(r"^[a-z_]\w*(?:\.[a-z_]\w*)+$", re.I)
_NAME_WORDS = ("pass", "pwd", "secret", "token", "key", "credential", "auth")

# High-entropy detector: a string literal or assignment value of 24+ token characters whose Shannon
# entropy is at least 4.0 bits/char and that mixes letters and digits. The scan starts on a quote or "="
# (a character-set start keeps Python's engine at ~130 MB/s instead of 13 with a look-behind first).
_LITERAL = re.compile(r"(?P<q>[\"'`=])(?:(?<==)[ \t]*)?(?P<s>[A-Za-z0-9+/=_\-.~]{24,512})")
ENTROPY_BITS = 4.0

Span = tuple[int, int, str]  # (start, end, kind) of text to replace

# One Aho-Corasick pass finds every marker (and every assignment keyword) at once: 6 us per event, where
# ~60 `in` tests took 68 us (measured on 10k realistic events, bench/README.md).
_EXACT_MARKERS = sorted({m for r in RULES if not r.lower for m in r.markers})
_LOWER_PATTERNS = sorted({m for r in RULES if r.lower for m in r.markers}) + list(_KEYWORDS)
_EXACT_AC = AhoCorasick(_EXACT_MARKERS)
_LOWER_AC = AhoCorasick(_LOWER_PATTERNS)
_RULES_BY_MARKER: dict[str, tuple[int, ...]] = {}
for _i, _r in enumerate(RULES):
    for _m in _r.markers:
        _RULES_BY_MARKER[_m] = (*_RULES_BY_MARKER.get(_m, ()), _i)


def shannon_entropy(text: str) -> float:
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def looks_random(token: str) -> bool:
    """Whether a 24+ character token reads like a key rather than a path, a name or a constant."""
    if "/" in token and token.count("/") > 2 and not token.endswith("="):
        return False  # a path, not a key
    has_digit = any(ch.isdigit() for ch in token)
    has_alpha = any(ch.isalpha() for ch in token)
    if not (has_digit and has_alpha):
        return False
    # CONSTANT_NAMES_2 and snake_case_ids_3 are not keys
    if (token.isupper() or token.islower()) and ("_" in token or "-" in token or "." in token):
        return False
    # A random key switches between lower case, upper case and digits at ~60% of its characters; names,
    # paths and alphabets ("IPython.core.inputtransformer2", "python-mappings/CP1140.TXT", "ABC...XYZ234567")
    # at under 20%. On 41 MB of ordinary Python this cut the entropy false positives from 570 to 329.
    return shannon_entropy(token) >= ENTROPY_BITS and _switch_rate(token) >= SWITCH_RATE


SWITCH_RATE = 0.3


def _switch_rate(token: str) -> float:
    classes = ["d" if ch.isdigit() else "u" if ch.isupper() else "l" if ch.islower() else "s" for ch in token]
    return sum(a != b for a, b in itertools.pairwise(classes)) / len(token)


def not_a_secret(value: str) -> bool:
    return bool(_PLACEHOLDER.search(value)) or (
        bool(_IDENTIFIER.match(value)) and any(k in value.lower() for k in _NAME_WORDS))


def lower_in_place(text: str) -> str:
    """`text.lower()` with every character where it was, so a keyword found in it is at the same index in `text`.

    'İ' (U+0130) is the one character whose lower case is two ('i̇'): before this, each one shifted every later
    keyword hit by one, and `İ\npassword = "hunter2hunter2"` was stored unscrubbed.
    """
    lower = text.lower()
    return lower if len(lower) == len(text) else text.replace("\u0130", "i").lower()


def _scan(text: str, lower: str) -> tuple[list[Rule], list[int]]:
    """The format rules whose markers occur in `text`, and where assignment keywords start in `lower`."""
    hit: set[int] = set()
    for index, _, _ in _EXACT_AC.find_matches_as_indexes(text, overlapping=True):
        hit.update(_RULES_BY_MARKER[_EXACT_MARKERS[index]])
    keywords = []
    for index, start, _ in _LOWER_AC.find_matches_as_indexes(lower, overlapping=True):
        pattern = _LOWER_PATTERNS[index]
        if pattern in _RULES_BY_MARKER:
            hit.update(_RULES_BY_MARKER[pattern])
        else:
            keywords.append(start)
    keywords.sort()
    return [RULES[i] for i in sorted(hit)], keywords


def find_secrets(text: str, scanned: tuple[list[Rule], list[int]] | None = None) -> list[Span]:
    """Every secret in `text` as non-overlapping spans, in text order.

    `scanned` is `_scan`'s answer for this text when the caller already has it (see `scrub_fields`).
    """
    found: list[Span] = []
    lower = lower_in_place(text)
    hit_rules, keywords = scanned if scanned is not None else _scan(text, lower)
    for rule in hit_rules:
        for m in rule.pattern.finditer(text):
            group = "s" if "s" in rule.pattern.groupindex and m.group("s") is not None else 0
            if rule.kind == "url_credentials" and _PLACEHOLDER.search(m.group(group)):
                continue  # "postgres://%s:%s@host", "https://user:${PASSWORD}@host": a template
            _add(found, m.start(group), m.end(group), rule.kind)
    for start, end in _assignments(text, lower, keywords):
        _add(found, start, end, "secret_assignment")
    for m in _LITERAL.finditer(text):
        end = m.end("s")
        if m.group("q") != "=":
            closing = text[end:end + 2]
            if not (closing[:1] == m.group("q") or closing == "\\" + m.group("q")):
                continue  # not a whole quoted literal (a JSON-escaped \" closes one too)
        elif m.start() > 0 and (text[m.start() - 1].isalnum() or text[m.start() - 1] in "_.=!<>"):
            continue  # "a==b", "x.y=...", "name=value" inside an identifier run: not a literal
        elif "." in m.group("s"):
            continue  # `= module.attr.name`: an unquoted dotted value is code
        elif end < len(text) and (text[end].isalnum() or text[end] in "_"):
            continue
        if looks_random(m.group("s")):
            _add(found, m.start("s"), end, "high_entropy")
    return sorted(found)


def _add(found: list[Span], start: int, end: int, kind: str) -> None:
    # Earlier detectors win: a span overlapping one already found is dropped.
    if end > start and all(end <= s or start >= e for s, e, _ in found):
        found.append((start, end, kind))


def _assignments(text: str, lower: str, keywords: list[int]) -> list[tuple[int, int]]:
    """Value spans of assignments to secret-sounding names, from the keyword hits at `keywords`."""
    spans: list[tuple[int, int]] = []
    tried: set[int] = set()
    for hit in keywords:
        start = hit
        while start > 0 and (lower[start - 1].isalnum() or lower[start - 1] in "_.-"):
            start -= 1
        if start not in tried:
            tried.add(start)
            m = _ASSIGN_QUOTED.match(text, start) or _ARG_DEFAULT.match(text, start)
            if m and assigned_secret(m.group("name"), m.group("s"), quoted=True):
                spans.append(m.span("s"))
        line = text.rfind("\n", 0, hit) + 1
        if -1 - line not in tried:  # line starts are remembered as negative numbers
            tried.add(-1 - line)
            m = _ASSIGN_BARE.match(text, line)
            if m and assigned_secret(m.group("name"), m.group("s"), quoted=False):
                spans.append(m.span("s"))
    return spans


def assigned_secret(name: str, value: str, quoted: bool) -> bool:
    """Whether `value`, assigned to the secret-sounding `name`, is a credential worth scrubbing."""
    if not_a_secret(value):
        return False
    if _WORDS.match(value):
        # Letters and separators only: a password can be a word ('hunter'), but a token, key or secret
        # never is, and an unquoted word is an expression (`password: str`, `TOKEN = TSPECIALS`). Measured
        # on CPython's email package: 342 false positives like token_type = 'address-list' without this.
        return quoted and any(w in name.lower() for w in ("pass", "pwd"))
    if quoted or name.isupper():
        return True  # a literal, or DB_PASSWORD=hunter2 in an environment file
    # db_password: s3cret in YAML or INI, but not `token = self.token2`: a dotted name is code.
    return not _DOTTED.match(value)


def scrub(text: str, counts: Counter[str] | None = None,
          scanned: tuple[list[Rule], list[int]] | None = None, extra: list[Span] | None = None) -> str:
    """`text` with every secret replaced by `<SECRET:kind>`; kinds found are added to `counts`. `extra`: spans
    to replace besides what the scan finds."""
    if not text:
        return text
    spans = find_secrets(text, scanned)
    if extra:
        spans = _merge(spans, extra)
    if not spans:
        return text
    out = []
    pos = 0
    for start, end, kind in spans:
        out.append(text[pos:start])
        out.append(f"<SECRET:{kind}>")
        pos = end
        if counts is not None:
            counts[kind] += 1
    out.append(text[pos:])
    return "".join(out)


# Where a file is cut into pieces that are scrubbed on their own (see FileScrubber).
PIECE_SEPARATOR = "\n\n"
# What can follow a secret-sounding name on its own line before the value (`password\n=\n"..."`).
_ASSIGN_OPS = ("=", ":", ":=", "=>")
_KEYWORD = re.compile("|".join(re.escape(k) for k in _KEYWORDS))
# A piece's scrubbed text and the secrets it replaced: (kind, the original text).
_Piece = tuple[str, tuple[tuple[str, str], ...]]


class FileScrubber:
    r"""Scrubs successive versions of files, rescanning only the pieces of a file that a commit changed.

    A git harvest stores every changed file's whole content after each commit: 168 MB of file versions for
    5,000 commits (bench/git_harvest.py), where the diffs are 29 MB. Scrubbing them whole took 3.8 s, the
    largest part of the harvest. A file is cut at every blank line ("\n\n") into pieces that are scrubbed on
    their own and remembered by their text; a new version of a file shares all but the edited pieces with the
    previous one (19% of the bytes were new in that history), and the scrubbed file is the same text as
    `scrub(text)` gives (tests/test_privacy.py compares them on real files with planted secrets).

    Why a cut at a blank line cannot split a secret: every detector but two matches within one line
    (their character classes exclude "\n"), and a piece boundary lies between two line breaks. The two that
    span lines are handled apart:
    - a private key block (`[\s\S]*?` up to its END line or the end of the text): a file holding the
      "PRIVATE KEY" marker is scrubbed whole;
    - an assignment whose name and value are on different lines (`password =\n\n"..."`, through the
      `\s*` around its operator): a piece whose last non-blank line holds a secret-sounding keyword or only
      an operator, or that is blank, is joined to the next piece before it is scrubbed.
    Everything a detector checks next to a match (`\b`, `^`/`$`, the character before a literal's "=", the
    quote after it) reads the same at a piece edge as next to the "\n" there.
    """

    def __init__(self, max_chars: int = 32 << 20):
        # Two generations: a piece used in the current one stays; the older one is dropped when the current
        # one holds `max_chars` / 2 characters. Plain dicts: an LRU's move_to_end cost 0.3 s per 660k pieces.
        # Only pieces that do not run on are kept, so a piece found here always ends at a safe cut.
        self.max_chars = max_chars
        self._current: dict[str, _Piece] = {}
        self._previous: dict[str, _Piece] = {}
        self._chars = 0
        self.chars = 0  # characters asked for
        self.new_chars = 0  # characters scanned (in pieces not seen before)
        # The secrets found in each file version that held any, by the caller's key (a blob sha): a later
        # commit's diff shows them again on its "-" lines, often without the name that made them secrets.
        self.found_in: dict[str, tuple[tuple[str, str], ...]] = {}

    def scrub(self, text: str, counts: Counter[str] | None = None,
              secrets: list[tuple[str, str]] | None = None) -> str:
        """`scrub(text, counts)`, reusing the pieces of `text` seen before; the secrets replaced, as (kind,
        original text), are added to `secrets`."""
        self.chars += len(text)
        if PIECE_SEPARATOR not in text or "PRIVATE KEY" in text:
            self.new_chars += len(text)
            scrubbed, found = _replace(text, find_secrets(text))
            _tally(found, counts, secrets)
            return scrubbed
        # 660k pieces in that history: the common path (every piece known) stays in C (map, join, filter).
        parts = text.split(PIECE_SEPARATOR)
        pieces: list[_Piece | None] = list(map(self._current.get, parts))
        if None in pieces:
            parts, pieces = self._fill(parts, pieces)
        known: list[_Piece] = pieces  # type: ignore[assignment]  # _fill left no None
        for _, found in filter(itemgetter(1), known):
            _tally(found, counts, secrets)
        return PIECE_SEPARATOR.join(map(itemgetter(0), known))

    def _fill(self, parts: list[str], pieces: list[_Piece | None]) -> tuple[list[str], list[_Piece | None]]:
        """Units (a part, or parts joined while one runs on) and their pieces, scanning the ones not seen.

        Only the parts around a miss are visited in Python; the runs of known pieces between are sliced."""
        units: list[str] = []
        found: list[_Piece | None] = []
        done = 0
        while (i := _index_of_none(pieces, done)) >= 0:
            units += parts[done:i]
            found += pieces[done:i]
            unit = parts[i]
            i += 1
            while (piece := self._previous.get(unit)) is None and i < len(parts) and _runs_on(unit):
                unit += PIECE_SEPARATOR + parts[i]
                i += 1
                if (piece := self._current.get(unit)) is not None:
                    break
            if piece is not None:
                self._keep(unit, piece)  # into the current generation
            units.append(unit)
            found.append(piece)
            done = i
        units += parts[done:]
        found += pieces[done:]
        start = 0
        while (i := _index_of_none(found, start)) >= 0:
            # New units next to each other are scanned as one text (a scan's fixed cost is ~8 us, and a new
            # version's unseen pieces are mostly neighbours), then cut back into pieces.
            j = i + 1
            while j < len(units) and found[j] is None:
                j += 1
            found[i:j] = self._scan_new(units[i:j], last=j == len(units))
            start = j
        return units, found

    def _scan_new(self, units: list[str], last: bool) -> list[_Piece]:
        """The pieces of consecutive units, from one scan of their joined text (the file's own text)."""
        text = PIECE_SEPARATOR.join(units)
        self.new_chars += len(text)
        spans = find_secrets(text)
        pieces: list[_Piece] = []
        start = 0
        k = 0
        for n, unit in enumerate(units):
            end = start + len(unit)
            mine = []
            while k < len(spans) and spans[k][0] < end:
                if spans[k][1] > end:  # cannot happen (the class docstring says why); never store half a secret
                    raise AssertionError(f"a {spans[k][2]} secret spans a piece boundary")
                mine.append((spans[k][0] - start, spans[k][1] - start, spans[k][2]))
                k += 1
            piece = _replace(unit, mine) if mine else (unit, ())
            if not (last and n == len(units) - 1 and _runs_on(unit)):
                self._keep(unit, piece)  # the text's last unit may run on; the cache holds no such piece
            pieces.append(piece)
            start = end + len(PIECE_SEPARATOR)
        return pieces

    def _keep(self, unit: str, piece: _Piece) -> None:
        if self._chars >= self.max_chars // 2:
            self._previous, self._current, self._chars = self._current, {}, 0
        self._current[unit] = piece
        self._chars += len(unit)


def _replace(text: str, spans: list[Span]) -> _Piece:
    out = []
    found = []
    pos = 0
    for start, end, kind in spans:
        out += [text[pos:start], f"<SECRET:{kind}>"]
        found.append((kind, text[start:end]))
        pos = end
    return ("".join([*out, text[pos:]]) if spans else text), tuple(found)


def _tally(found: tuple[tuple[str, str], ...], counts: Counter[str] | None,
           secrets: list[tuple[str, str]] | None) -> None:
    if counts is not None:
        for kind, _ in found:
            counts[kind] += 1
    if secrets is not None:
        secrets += found


def _index_of_none(items: list[Any], start: int) -> int:
    try:
        return items.index(None, start)
    except ValueError:
        return -1


def _runs_on(piece: str) -> bool:
    """Whether an assignment could start in `piece` and take its value from the text after it: its last
    non-blank line names a secret-sounding keyword or is an operator alone, or it has no non-blank line."""
    end = len(piece)
    while True:
        start = piece.rfind("\n", 0, end) + 1
        line = piece[start:end].strip()
        if line:
            return line in _ASSIGN_OPS or _KEYWORD.search(lower_in_place(line)) is not None
        if start == 0:
            return True
        end = start - 1


def scrub_diff(diff: str, counts: Counter[str] | None = None, known: Iterable[tuple[str, str]] = ()) -> str:
    """A zero-context patch scrubbed: read as the lines of code it holds, and of every secret `known` to be in
    the file versions it joins (as (kind, original text)).

    A hunk stops at the changed lines, so it can hold a value without the name that makes it a secret
    (`password =` unchanged above a changed `"hunter2..."` line) or a key block without its BEGIN line; the
    file versions were scrubbed whole, so what they gave up is replaced here wherever it shows, line by line.
    And the "+"/"-" before each line kept the line-start patterns from matching at all (`+DB_PASSWORD=...`,
    `-  db_password: s3cret`): the patch is scanned with those signs read as spaces (same length, so the
    secrets found are at the same places), which also joins a name and a value on adjacent lines of a hunk.
    """
    code = diff.replace("\n+", "\n ").replace("\n-", "\n ")
    if code[:1] in ("+", "-"):
        code = " " + code[1:]
    out, found = _replace(diff, find_secrets(code))
    _tally(found, counts, None)
    for kind, original in known:
        for line in original.split("\n"):
            if line.strip() and line in out:
                if counts is not None:
                    counts[kind] += out.count(line)
                out = out.replace(line, f"<SECRET:{kind}>")
    return out


# How far either side of the cursor a secret can start or end and still need the other side to be seen: an
# assignment with its value on a later line spans a few lines (`password = (` ... `"..."`), and the longest
# token formats run to 255 characters. A private key block opened in the prefix is read from its BEGIN line
# instead. The two extra scans cost 11% of Continue ingest at 256 (5,506 -> 4,900 events/s, 30k events of
# bench/ingest_continue.py) and 18% at 512.
SEAM_CHARS = 256


def cursor_spans(prefix: str | None, middles: list[str | None], suffix: str | None) -> list[list[Span]]:
    """The secrets that show only when a prefix, a middle and a suffix are read as the one file they are, as
    spans in each part (prefix, each middle, suffix), for `scrub_fields(..., extra=)`.

    A cursor can sit anywhere: between `password = ` and its value (the value then starts the suffix, or is
    the completion), inside a token, inside a private key block. Each part alone holds half of the pattern,
    so the text around the cursor is scanned once without a middle (the file as it was) and once with each
    middle (the file had it been accepted). The spans are only added to what each part's own scan finds:
    replacing them first could break a neighbouring secret's marker (a key cut after "LTAI5tB9" ran on into
    the suffix's "sk-ant-..." and took its "sk").
    """
    p, s = prefix or "", suffix or ""
    tail = max(0, len(p) - SEAM_CHARS)
    head = min(len(s), SEAM_CHARS)
    begin = p.rfind("-----BEGIN")
    if begin >= 0 and "PRIVATE KEY" in p[begin:] and "-----END" not in p[begin:]:
        tail = min(tail, begin)
        end = s.find("-----END")
        line_end = s.find("\n", end) if end >= 0 else -1
        head = len(s) if line_end < 0 else max(head, line_end)
    last = len(middles) + 1
    found: list[list[Span]] = [[] for _ in range(last + 1)]  # prefix, each middle, suffix
    for which, middle in [(0, ""), *((i + 1, m or "") for i, m in enumerate(middles))]:
        lp, lm = len(p), len(middle)
        # where each part lies in the joined prefix + middle + suffix
        bounds = [(0, 0, lp), (which, lp, lp + lm), (last, lp + lm, lp + lm + len(s))] if which else \
            [(0, 0, lp), (last, lp, lp + len(s))]
        for start, end, kind in find_secrets(p[tail:] + middle + s[:head]):
            start, end = start + tail, end + tail
            for part, lo, hi in bounds:
                if start < hi and end > lo:
                    found[part].append((max(start, lo) - lo, min(end, hi) - lo, kind))
    return [_merge(spans, []) for spans in found]


def _merge(spans: list[Span], extra: list[Span]) -> list[Span]:
    """Both lists as one, in text order, overlapping spans joined into one (of the first one's kind)."""
    merged: list[Span] = []
    for start, end, kind in sorted([*spans, *extra]):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), merged[-1][2])
        else:
            merged.append((start, end, kind))
    return merged


def scrub_fields(texts: list[str | None], counts: Counter[str] | None = None,
                 extra: list[list[Span]] | None = None) -> list[str | None]:
    """Scrub the text fields of one event, scanning for markers and keywords once over all of them; `extra`
    holds spans to replace in each field besides (`cursor_spans`)."""
    present = [t for t in texts if t]
    extra = extra or [[] for _ in texts]
    if len(present) < 2:
        return [scrub(t, counts, None, more) if t else t for t, more in zip(texts, extra, strict=True)]
    joined = "\0".join(present)  # no marker or keyword holds NUL, so none can span two fields
    rules, keywords = _scan(joined, lower_in_place(joined))
    out: list[str | None] = []
    start = 0
    k = 0
    for t, more in zip(texts, extra, strict=True):
        if not t:
            out.append(t)
            continue
        end = start + len(t)
        mine = []
        while k < len(keywords) and keywords[k] < end:
            mine.append(keywords[k] - start)
            k += 1
        out.append(scrub(t, counts, (rules, mine), more))
        start = end + 1
    return out


def scrub_json(value: Any, counts: Counter[str] | None = None) -> Any:
    """A JSON value with every string in it (keys excepted) scrubbed."""
    if isinstance(value, str):
        return scrub(value, counts)
    if isinstance(value, list):
        return [scrub_json(v, counts) for v in value]
    if isinstance(value, dict):
        return {k: scrub_json(v, counts) for k, v in value.items()}
    return value


def is_excluded(path: str, globs: tuple[str, ...]) -> bool:
    """Whether a file path (plain, repo-relative or a file:// URI) matches an exclude glob.

    Each glob is tried against the whole path, the path with a leading "/" (so "**/secrets/**" also
    matches "secrets/x" at the repo root) and the file name (so ".env*" matches "app/.env.local").
    """
    return _is_excluded(path, globs)


@functools.lru_cache(maxsize=1 << 16)
def _is_excluded(path: str, globs: tuple[str, ...]) -> bool:
    # Cached: a developer's events name a few hundred files over and over (15 fnmatch calls each, uncached).
    if path.startswith("file://"):
        rest = path[len("file://"):]
        path = unquote(rest[rest.find("/"):] if "/" in rest else rest)  # drop the URI's host part
    path = path.replace("\\", "/")
    name = path.rsplit("/", 1)[-1]
    matcher = _globs(globs)
    return any(matcher(c) is not None for c in (path, "/" + path.lstrip("/"), name))


@functools.lru_cache(maxsize=16)
def _globs(globs: tuple[str, ...]) -> Any:
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs) or r"(?!)").match

"""Continue.dev "dev data": `<root>/dev_data/<schema>/<eventName>.jsonl` (FORMATS.md §1.1-1.6).

`root` is the folder that holds `dev_data/` (`~/.continue`, or `$CONTINUE_GLOBAL_DIR`). Continue writes
each event with one `appendFileSync(JSON.stringify(event) + "\\n")`, so a line is either whole or, after a
crash, cut short; it never rotates or truncates these files.

`parse_event` turns one event object into typed records; the HTTP destination (collectors/continue_http.py)
feeds the same function, so a POSTed event and a file line are parsed alike.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson

from collectors.base import (
    Batch,
    Cursor,
    EditOutcome,
    Found,
    Interaction,
    Limits,
    LineParser,
    RawEvent,
    Suggestion,
    Watch,
)
from collectors.jsonl import collect_lines, decode_object, pending_bytes

# Stream -> the event its lines hold. 0.2.0 is what Continue writes today; 0.1.0 holds files migrated from
# the 2024 layout; root-level files are that layout when the migration never ran (FORMATS.md §1.1). Not
# read: tokensGenerated (token counts only) and nextEditWithHistory (no accept signal).
STREAMS: dict[str, str] = {
    **{f"dev_data/0.2.0/{name}.jsonl": name for name in (
        "autocomplete", "editOutcome", "nextEditOutcome", "chatFeedback", "chatInteraction", "editInteraction",
        "toolUsage")},
    "dev_data/0.1.0/autocomplete.jsonl": "autocomplete",
    "dev_data/0.1.0/quickEdit.jsonl": "quickEdit",
    "dev_data/0.1.0/chatFeedback.jsonl": "chatFeedback",
    "dev_data/autocomplete.jsonl": "autocomplete",
    "dev_data/chat.jsonl": "chatFeedback",
    "dev_data/quickEdit.jsonl": "quickEdit",
}
EVENT_NAMES = frozenset(STREAMS.values())

# Epoch-ms timestamps outside 2000-2100 are corrupt, not old (Continue was first released in 2023).
MIN_TS_MS, MAX_TS_MS = 946_684_800_000, 4_102_444_800_000

QWEN_REPO_SEPARATOR = "<|system_separator_istruction_repository_level|>"  # sic: Continue's spelling

class ContinueCollector:
    kind = "continue"
    unit = "bytes"

    def streams(self, root: Path) -> list[str]:
        return [s for s in STREAMS if (root / s).is_file()]

    def pending(self, root: Path, stream: str, cursor: Cursor | None) -> int:
        return pending_bytes(root / stream, cursor)

    def repo(self, root: Path) -> str | None:
        return None  # each event names its own (`gitRepo`)

    def watch_paths(self, root: Path) -> list[Watch]:
        return [Watch(root / "dev_data", recursive=True, suffixes=(".jsonl",))]

    def discover(self) -> list[Found]:
        """Continue's folder at $CONTINUE_GLOBAL_DIR, else ~/.continue, when it holds dev_data/."""
        return found_at("CONTINUE_GLOBAL_DIR", "~/.continue", "dev_data")

    def collect(self, root: Path, stream: str, cursor: Cursor | None, limits: Limits) -> Iterator[Batch]:
        yield from collect_lines(root / stream, stream, cursor, limits, self.line_parser(root, stream))

    def line_parser(self, root: Path, stream: str) -> LineParser:
        name = STREAMS[stream]
        # Legacy chat and quickEdit lines carry no timestamp: the file's mtime is the best bound we have,
        # and it only ever errs towards "more recent".
        fallback_ts = datetime.fromtimestamp((root / stream).stat().st_mtime, UTC).replace(tzinfo=None)

        def parse(raw: bytes) -> tuple[RawEvent, ...] | str:
            obj = decode_object(raw)
            return obj if isinstance(obj, str) else parse_event(name, obj, fallback_ts)

        return parse


def found_at(env: str, default: str, marker: str) -> list[Found]:
    """The folder `$env` names (else `default`) when it holds `marker`: where a tool writes by default."""
    root = Path(os.environ.get(env) or default).expanduser()
    if not (root / marker).is_dir():
        return []
    why = f"${env}" if os.environ.get(env) else f"the default {default}"
    return [Found(root.resolve(), f"{marker}/ found at {why}")]


def parse_event(name: str, obj: dict[str, Any], fallback_ts: datetime,
                level: str = "all") -> tuple[RawEvent, ...] | str:
    """One Continue event object as typed records (none when it carries no label), or why it was rejected.

    `level` is the `data:` destination's level: at "noCode" the code fields are absent by design.
    """
    if name == "autocomplete":
        one: RawEvent | str = parse_autocomplete(obj, fallback_ts, level)
    elif name in ("editOutcome", "nextEditOutcome"):
        if name == "nextEditOutcome" and obj.get("aborted") is True:
            return ()  # cancelled after display: no label (FORMATS.md §1.3)
        one = parse_edit_outcome(name, obj, fallback_ts)
    elif name in ("chatFeedback", "chatInteraction", "editInteraction", "toolUsage", "quickEdit"):
        one = parse_interaction(name, obj, fallback_ts)
    else:
        return f"event {name!r} is not one devtune reads"
    return one if isinstance(one, str) else (one,)


def parse_autocomplete(obj: dict[str, Any], fallback_ts: datetime | None, level: str = "all") -> Suggestion | str:
    """One autocomplete event as a `Suggestion`, or the reason it was rejected."""
    code = level != "noCode"
    problems = [p for p in (
        _require(obj, "completionId", str),
        _require(obj, "accepted", bool),
        _require(obj, "prefix", str) if code else _optional(obj, "prefix", str),
        _require(obj, "suffix", str) if code else _optional(obj, "suffix", str),
        _require(obj, "completion", str) if code else _optional(obj, "completion", str),
        _require(obj, "filepath", str),
    ) if p]
    if problems:
        return "; ".join(problems)
    if not obj["completionId"]:
        return "field 'completionId' is empty"
    shown_at = parse_timestamp(obj.get("timestamp"), fallback_ts)
    if isinstance(shown_at, str):
        return shown_at
    model = _optional_str(obj, "modelName")
    compiled = obj.get("prefix")
    raw_prefix, how = (recover_prefix(compiled, obj["filepath"], model or "", "template" in obj)
                       if compiled is not None else (None, "no_code"))
    repo = _optional_str(obj, "gitRepo")
    return Suggestion(
        key=obj["completionId"],
        source_kind="continue",
        event_kind="autocomplete",
        shown_at=shown_at,
        accepted=obj["accepted"],
        partial=False,  # Continue does not distinguish word/line accepts (FORMATS.md §1.4)
        filepath=obj["filepath"],
        prefix=raw_prefix,
        prefix_compiled=compiled,
        prefix_recovery=how,
        suffix=obj.get("suffix"),
        completion=obj.get("completion"),
        repo=normalize_repo(repo) if repo else None,
        model=model,
        user_ids=_user_ids(obj),
    )


def parse_edit_outcome(name: str, obj: dict[str, Any], fallback_ts: datetime | None) -> EditOutcome | str:
    """An editOutcome or a (not aborted) nextEditOutcome, or the reason it was rejected."""
    next_edit = name == "nextEditOutcome"
    texts = (("originalEditableRange", "completion") if next_edit else ("prompt", "previousCode", "newCode"))
    problems = [p for p in (
        _require(obj, "completionId", str) if next_edit else "",
        _require(obj, "accepted", bool),
        _optional(obj, "fileUri" if next_edit else "filepath", str),
        _optional(obj, "gitRepo", str),
        *(_optional(obj, t, str) for t in texts),
    ) if p]
    if problems:
        return "; ".join(problems)
    if next_edit and not obj["completionId"]:
        return "field 'completionId' is empty"
    decided_at = parse_timestamp(obj.get("timestamp"), fallback_ts)
    if isinstance(decided_at, str):
        return decided_at
    repo = _optional_str(obj, "gitRepo")
    return EditOutcome(
        key=obj["completionId"] if next_edit else content_key(name, obj),
        source_kind="continue",
        event_kind=name,
        decided_at=decided_at,
        accepted=obj["accepted"],
        filepath=obj.get("fileUri" if next_edit else "filepath") or "",
        instruction=None if next_edit else obj.get("prompt"),
        before_text=obj.get("originalEditableRange" if next_edit else "previousCode"),
        after_text=obj.get("completion" if next_edit else "newCode"),
        repo=normalize_repo(repo) if repo else None,
        model=_optional_str(obj, "modelName") or _optional_str(obj, "modelTitle"),
        user_ids=_user_ids(obj),
    )


# Per interaction kind: (optional string fields, optional boolean label field, fields kept as detail).
_INTERACTIONS: dict[str, tuple[tuple[str, ...], str | None, tuple[str, ...]]] = {
    "chatFeedback": (("prompt", "completion", "sessionId"), "feedback", ()),
    "chatInteraction": (("prompt", "completion", "sessionId"), None, ("tools", "rules")),
    "editInteraction": (("prompt", "completion", "filepath"), None, ()),
    "toolUsage": (("toolCallId", "functionName", "toolCallArgs"), "accepted",
                  ("functionName", "functionParams", "toolCallArgs", "succeeded", "output")),
    "quickEdit": (("prompt", "path", "label"), None, ("label", "diffs")),
}


def parse_interaction(name: str, obj: dict[str, Any], fallback_ts: datetime | None) -> Interaction | str:
    """A chat, edit or tool event (no code accept flag), or the reason it was rejected."""
    strings, label_field, detail_fields = _INTERACTIONS[name]
    problems = [p for p in (
        *(_optional(obj, f, str) for f in strings),
        _optional(obj, label_field, bool) if label_field else "",
        _require(obj, "toolCallId", str) if name == "toolUsage" else "",
    ) if p]
    if problems:
        return "; ".join(problems)
    occurred_at = parse_timestamp(obj.get("timestamp"), fallback_ts)
    if isinstance(occurred_at, str):
        return occurred_at
    detail = {f: obj[f] for f in detail_fields if f in obj}
    return Interaction(
        key=obj["toolCallId"] if name == "toolUsage" and obj["toolCallId"] else content_key(name, obj),
        source_kind="continue",
        event_kind=name,
        occurred_at=occurred_at,
        filepath=obj.get("filepath") or obj.get("path") or None,
        model=_optional_str(obj, "modelName") or _optional_str(obj, "modelTitle") or _optional_str(obj, "model"),
        session_id=_optional_str(obj, "sessionId"),
        prompt=obj.get("prompt"),
        completion=obj.get("completion"),
        label=obj.get(label_field) if label_field else None,
        detail=detail or None,
        user_ids=_user_ids(obj),
    )


def content_key(name: str, obj: dict[str, Any]) -> str:
    """A stable id for an event that has none: sha1 of its content with the timestamp left out.

    Continue stamps the local file copy and each HTTP destination's copy separately (`addBaseValues` runs per
    destination, core/data/log.ts), so one event's two copies can differ by a few ms in `timestamp` and in
    nothing else. A copy sent at level noCode lacks the code fields and so gets a key of its own.
    """
    body = orjson.dumps({k: v for k, v in obj.items() if k != "timestamp"}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha1(name.encode() + b"\0" + body).hexdigest()


def _user_ids(obj: dict[str, Any]) -> tuple[str, ...]:
    return tuple(u for u in (_optional_str(obj, "userId"), _optional_str(obj, "uniqueId")) if u)


def _type_name(value: Any) -> str:
    return {bool: "boolean", str: "string", int: "number", float: "number", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _require(obj: dict[str, Any], key: str, typ: type) -> str:
    if key not in obj:
        return f"missing required field '{key}'"
    value = obj[key]
    # bool is an int in Python and "true" is not a bool: neither is coerced.
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        want = "boolean" if typ is bool else "string" if typ is str else typ.__name__
        return f"field '{key}' must be a {want}, got {_type_name(value)}"
    return ""


def _optional(obj: dict[str, Any], key: str, typ: type) -> str:
    """A problem when `key` is present with another type (null counts as absent)."""
    if obj.get(key) is None:
        return ""
    return _require(obj, key, typ)


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def parse_timestamp(value: Any, fallback: datetime | None) -> datetime | str:
    """An ISO-8601 string or an epoch-ms number (both occur: FORMATS.md §1.6), as naive UTC."""
    if value is None:
        return fallback if fallback is not None else "missing required field 'timestamp'"
    if isinstance(value, bool):
        return "field 'timestamp' must be an ISO string or epoch milliseconds, got boolean"
    if isinstance(value, int | float):
        if not MIN_TS_MS <= value <= MAX_TS_MS:
            return f"field 'timestamp' {value} is not epoch milliseconds between 2000 and 2100"
        return datetime.fromtimestamp(value / 1000, UTC).replace(tzinfo=None)
    if isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)
        except ValueError:
            return f"field 'timestamp' is not ISO-8601: {value[:40]!r}"
        if ts.tzinfo is not None:
            ts = ts.astimezone(UTC).replace(tzinfo=None)
        return ts
    return f"field 'timestamp' must be an ISO string or epoch milliseconds, got {_type_name(value)}"


def recover_prefix(compiled: str, filepath: str, model: str, custom_template: bool) -> tuple[str | None, str]:
    """The raw editor prefix inside Continue's compiled prefix (FORMATS.md §1.5), and how it was found.

    Returns (prefix, how) with how one of: "raw" (nothing was prepended), "qwen_repo_level",
    "codestral_multifile", "comment_header", or "unrecognised" (prefix None: the compiled text is kept
    but not trained on, since retrieved context would be taught as if the developer had typed it).
    """
    name = model.lower()
    if QWEN_REPO_SEPARATOR in compiled:
        return compiled.rsplit(QWEN_REPO_SEPARATOR, 1)[1], "qwen_repo_level"
    if "qwen" in name and "coder" in name and not custom_template:
        return compiled, "raw"  # qwenMultifileFimTemplate with no snippets returns the prefix untouched
    if "codestral" in name and not custom_template:
        found = _after_codestral_header(compiled, filepath)
        return (found, "codestral_multifile") if found is not None else (compiled, "raw")
    found = _after_comment_header(compiled, filepath)
    if found is not None:
        return found, "comment_header"
    return None, "unrecognised"


@functools.lru_cache(maxsize=4096)  # a developer's events name a few hundred files, over and over
def _path_tail(filepath: str, parts: int) -> tuple[str, ...]:
    """The last `parts` path segments of a URI or path, raw and percent-decoded (Continue keeps URIs)."""
    tail = "/".join(filepath.replace("\\", "/").rstrip("/").split("/")[-parts:])
    return tuple(dict.fromkeys([tail, unquote(tail)]))


def _after_codestral_header(compiled: str, filepath: str) -> str | None:
    # "+++++ {other}\n{content}\n\n+++++ {current relative path}\n{prefix}": cut after the last header
    # naming the current file.
    basename = _path_tail(filepath, 1)
    best = -1
    for m in re.finditer(r"(?m)^\+\+\+\+\+ (.*)\n", compiled):
        if any(m.group(1).rstrip().endswith(b) for b in basename):
            best = m.end()
    return compiled[best:] if best >= 0 else None


def _after_comment_header(compiled: str, filepath: str) -> str | None:
    # formatSnippets(): snippet lines as comments ("# Path: a/b.py", "# code"), then "{c} {last two path
    # parts of the current file}", joined to the prefix with "\n". With no snippets: "\n# app/x.py\n...".
    # Continue takes the last two parts of the path relative to the workspace: one part for a file at the
    # workspace root.
    tails = _path_tail(filepath, 2) + _path_tail(filepath, 1)
    offset = 0
    marker = None
    # Line by line up to the first that is not a header's (splitting the whole prefix cost 2 of the 4.8 us this
    # took a bench event); the last line is the prefix's own
    while (end := compiled.find("\n", offset)) >= 0:
        line = compiled[offset:end]
        if line == "" and offset == 0:
            offset = 1
            continue
        head, _, rest = line.partition(" ")
        if not head or head.isalnum():
            return None  # a code line before the current-file comment: this is not a header
        if marker is None:
            marker = head
        elif head != marker:
            return None
        offset = end + 1
        if rest in tails:
            return compiled[offset:]
    return None


# "owner/name" from every spelling Continue and Tabby log: https, ssh URL, scp-like and Continue's own
# "git@github.com:owner/name" (its https-oriented split leaves the host on SSH remotes).
_REPO = re.compile(r"(?:[:/])?([^/:\s]+)/([^/:\s]+?)(?:\.git)?/?$")


@functools.lru_cache(maxsize=4096)  # a developer's events name a handful of repositories, over and over
def normalize_repo(value: str) -> str:
    """Normalise a git remote or Continue `gitRepo` value to lower-case "owner/name"."""
    m = _REPO.search(value.strip())
    if not m:
        return value.strip().lower()
    return f"{m.group(1)}/{m.group(2)}".lower()


_LANGUAGES = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".jsx": "javascript", ".mjs": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".go": "go", ".rs": "rust", ".java": "java",
    ".kt": "kotlin", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".hpp": "cpp", ".cs": "csharp",
    ".rb": "ruby", ".php": "php", ".swift": "swift", ".scala": "scala", ".sh": "shell", ".sql": "sql",
    ".lua": "lua", ".r": "r", ".jl": "julia", ".dart": "dart", ".ex": "elixir", ".vue": "vue",
}


def language_of(filepath: str) -> str:
    """Continue logs no language: derive it from the file extension ("unknown" when unlisted)."""
    name = filepath.rsplit("/", 1)[-1].lower()
    dot = name.rfind(".")
    return _LANGUAGES.get(name[dot:], "unknown") if dot >= 0 else "unknown"

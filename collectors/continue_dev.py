"""Continue.dev "dev data": `<root>/dev_data/<schema>/autocomplete.jsonl` (FORMATS.md §1.1-1.6).

`root` is the folder that holds `dev_data/` (`~/.continue`, or `$CONTINUE_GLOBAL_DIR`). Continue writes
each event with one `appendFileSync(JSON.stringify(event) + "\\n")`, so a line is either whole or, after a
crash, cut short; it never rotates or truncates these files.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from collectors.base import Batch, Cursor, Limits, RawEvent, Reject, Suggestion
from collectors.jsonl import (
    Oversized,
    cursor_at,
    decode_object,
    iter_lines,
    oversized_reject,
    reject,
    resume_offset,
)

# Newest first. 0.1.0 holds files migrated from the 2024 layout; the root-level file is the pre-2025
# layout when the migration never ran. All three carry the same autocomplete fields.
STREAMS = (
    "dev_data/0.2.0/autocomplete.jsonl",
    "dev_data/0.1.0/autocomplete.jsonl",
    "dev_data/autocomplete.jsonl",
)

# Epoch-ms timestamps outside 2000-2100 are corrupt, not old (Continue was first released in 2023).
MIN_TS_MS, MAX_TS_MS = 946_684_800_000, 4_102_444_800_000

QWEN_REPO_SEPARATOR = "<|system_separator_istruction_repository_level|>"  # sic: Continue's spelling


class ContinueCollector:
    kind = "continue"

    def streams(self, root: Path) -> list[str]:
        return [s for s in STREAMS if (root / s).is_file()]

    def collect(self, root: Path, stream: str, cursor: Cursor | None, limits: Limits) -> Iterator[Batch]:
        path = root / stream
        start, note = resume_offset(path, cursor)
        # 0.1.0 lines carry no timestamp (the versioned 0.1.0 schema has no base fields): the file's mtime
        # is the best bound we have, and it only ever errs towards "more recent".
        fallback_ts = datetime.fromtimestamp(path.stat().st_mtime, UTC).replace(tzinfo=None)
        events: list[RawEvent] = []
        rejects: list[Reject] = []
        end = start
        for item in iter_lines(path, start, limits.max_line_bytes):
            if isinstance(item, Oversized):
                rejects.append(oversized_reject(stream, item, limits.max_line_bytes))
            elif not item.raw.strip():
                pass  # blank lines carry nothing; the cursor still moves past them
            else:
                parsed = parse_autocomplete(item.raw, fallback_ts)
                if isinstance(parsed, str):
                    rejects.append(reject(stream, item.offset, item.raw, item.end - item.offset, parsed))
                else:
                    events.append(parsed)
            end = item.end
            if len(events) + len(rejects) >= limits.batch_events:
                yield Batch(tuple(events), tuple(rejects), cursor_at(path, stream, end), note)
                events, rejects, note = [], [], ""
        if events or rejects or end != (cursor.offset if cursor else 0) or note:
            yield Batch(tuple(events), tuple(rejects), cursor_at(path, stream, end), note)


def parse_autocomplete(raw: bytes, fallback_ts: datetime) -> Suggestion | str:
    """One autocomplete line as a `Suggestion`, or the reason it was rejected."""
    obj = decode_object(raw)
    if isinstance(obj, str):
        return obj
    problems = [p for p in (
        _require(obj, "completionId", str),
        _require(obj, "accepted", bool),
        _require(obj, "prefix", str),
        _require(obj, "suffix", str),
        _require(obj, "completion", str),
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
    raw_prefix, how = recover_prefix(obj["prefix"], obj["filepath"], model or "", "template" in obj)
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
        prefix_compiled=obj["prefix"],
        prefix_recovery=how,
        suffix=obj["suffix"],
        completion=obj["completion"],
        repo=normalize_repo(repo) if repo else None,
        model=model,
        user_ids=tuple(u for u in (_optional_str(obj, "userId"), _optional_str(obj, "uniqueId")) if u),
    )


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


def _path_tail(filepath: str, parts: int) -> list[str]:
    """The last `parts` path segments of a URI or path, raw and percent-decoded (Continue keeps URIs)."""
    tail = "/".join(filepath.replace("\\", "/").rstrip("/").split("/")[-parts:])
    return list(dict.fromkeys([tail, unquote(tail)]))


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
    lines = compiled.split("\n")
    # Continue takes the last two parts of the path relative to the workspace: one part for a file at the
    # workspace root.
    tails = _path_tail(filepath, 2) + _path_tail(filepath, 1)
    offset = 0
    marker = None
    for i, line in enumerate(lines[:-1]):
        if line == "" and i == 0:
            offset += 1
            continue
        head, _, rest = line.partition(" ")
        if not head or head.isalnum():
            return None  # a code line before the current-file comment: this is not a header
        if marker is None:
            marker = head
        elif head != marker:
            return None
        offset += len(line) + 1
        if rest in tails:
            return compiled[offset:]
    return None


# "owner/name" from every spelling Continue and Tabby log: https, ssh URL, scp-like and Continue's own
# "git@github.com:owner/name" (its https-oriented split leaves the host on SSH remotes).
_REPO = re.compile(r"(?:[:/])?([^/:\s]+)/([^/:\s]+?)(?:\.git)?/?$")


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

"""Continue autocomplete logs into a real DuckDB store: parsing, quarantine, cursors, idempotence."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors.base import Limits
from collectors.continue_dev import ContinueCollector, normalize_repo, parse_autocomplete, recover_prefix
from support import autocomplete_event, collect_site, continue_log, table_rows, write_config

STREAM = "dev_data/0.2.0/autocomplete.jsonl"


def collect(tmp_path: Path, folder: Path, **collect_overrides: Any) -> tuple[dict[str, Any], Path]:
    return collect_site(write_config(tmp_path / "site", [{"kind": "continue", "path": str(folder), "name": "alice",
                                                         "developer": "alice@example.com"}],
                                     overrides={"collect": collect_overrides} if collect_overrides else None).config)


def test_valid_lines_are_stored_with_identity_and_recovered_prefix(tmp_path: Path) -> None:
    good = [autocomplete_event(completionId=f"id-{i}", accepted=i % 3 == 0) for i in range(6)]
    continue_log(tmp_path / "alice", good)
    result, db = collect(tmp_path, tmp_path / "alice")
    assert result["error"] is None
    sug = result["status"]["suggestions"]
    assert (sug["total"], sug["accepted"], sug["rejected"]) == (6, 2, 4)
    rows = table_rows(db, "suggestions")
    assert {r[5] for r in rows} == {"alice@example.com"}  # developer: the source's owner, not the machine id
    assert {r[7] for r in rows} == {"acme/payments"}  # "git@github.com:acme/payments" normalised
    assert {r[9] for r in rows} == {"python"}


def test_malformed_lines_are_quarantined_with_reason_and_the_rest_stored(tmp_path: Path) -> None:
    ok1, ok2 = autocomplete_event(completionId="ok-1"), autocomplete_event(completionId="ok-2")
    lines: list[Any] = [
        ok1,
        '{"completionId": "cut", "accepted": tr',  # cut short by a crash
        json.dumps(autocomplete_event(completionId="str-bool", accepted="true")),  # no coercion
        json.dumps(autocomplete_event(completionId="no-prefix") | {"prefix": None}),
        json.dumps({k: v for k, v in autocomplete_event().items() if k != "completionId"}),
        "[1, 2, 3]",
        b"\xff\xfe not utf-8\n",
        "",  # blank lines are skipped, not quarantined
        "   ",
        json.dumps(autocomplete_event(completionId="bad-ts", timestamp="yesterday")),
        ok2,
    ]
    continue_log(tmp_path / "alice", lines)
    result, db = collect(tmp_path, tmp_path / "alice")
    assert result["status"]["suggestions"]["total"] == 2
    quarantine = {r[5]: r for r in table_rows(db, "quarantine")}
    reasons = sorted(quarantine)
    assert len(reasons) == 7
    expected = ["not JSON", "field 'accepted' must be a boolean, got string",
                "field 'prefix' must be a string, got null",
                "missing required field 'completionId'", "not a JSON object (got list)", "not UTF-8",
                "field 'timestamp' is not ISO-8601"]
    for fragment in expected:
        assert any(fragment in r for r in reasons), (fragment, reasons)
    # offsets point at the line in the file, so `quarantine retry` can re-read it
    raw = (tmp_path / "alice" / STREAM).read_bytes()
    for row in quarantine.values():
        offset, length = row[2], row[3]
        assert raw[offset + length - 1: offset + length] == b"\n"


def test_collecting_twice_changes_nothing(tmp_path: Path) -> None:
    continue_log(tmp_path / "alice", [autocomplete_event() for _ in range(20)] + ["not json"])
    _, db = collect(tmp_path, tmp_path / "alice")
    before = {t: table_rows(db, t) for t in ("suggestions", "quarantine", "cursors")}
    second, _ = collect(tmp_path, tmp_path / "alice")
    assert second["sources"][0]["seen"] == 0
    assert {t: table_rows(db, t) for t in before} == before


def test_partial_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    full = json.dumps(autocomplete_event(completionId="late"))
    path = continue_log(tmp_path / "alice", [autocomplete_event(completionId="early"), full[:40].encode()])
    result, db = collect(tmp_path, tmp_path / "alice")
    assert result["status"]["suggestions"]["total"] == 1
    assert result["status"]["quarantined"]["total"] == 0  # deferred, not quarantined
    with path.open("ab") as f:
        f.write(full[40:].encode() + b"\n")
    result, _ = collect(tmp_path, tmp_path / "alice")
    assert result["status"]["suggestions"]["total"] == 2
    assert [r[0] for r in table_rows(db, "suggestions")] == ["early", "late"]


def test_oversized_line_is_rejected_without_parsing_and_collection_goes_on(tmp_path: Path) -> None:
    huge = json.dumps(autocomplete_event(completionId="huge", prefix="x" * 5000))
    continue_log(tmp_path / "alice", [autocomplete_event(completionId="a"), huge, autocomplete_event(completionId="b")])
    result, db = collect(tmp_path, tmp_path / "alice", max_line_bytes=2048)
    assert result["status"]["suggestions"]["total"] == 2
    (reason,) = [r[5] for r in table_rows(db, "quarantine")]
    assert "over the 2048-byte limit; not parsed" in reason


def test_oversized_line_spanning_read_chunks(tmp_path: Path) -> None:
    # Longer than the 1 MiB read chunk and with no newline in the first chunk: skipped in pieces.
    big = b'{"x": "' + b"y" * (3 << 20) + b'"}\n'
    continue_log(tmp_path / "alice", [autocomplete_event(completionId="a"), big, autocomplete_event(completionId="b")])
    result, _ = collect(tmp_path, tmp_path / "alice")
    assert result["status"]["suggestions"]["total"] == 2
    assert result["status"]["quarantined"]["total"] == 1


def test_replaced_and_truncated_files_are_reread_without_duplicates(tmp_path: Path) -> None:
    events = [autocomplete_event(completionId=f"e{i}") for i in range(5)]
    path = continue_log(tmp_path / "alice", events)
    collect(tmp_path, tmp_path / "alice")
    # Truncated: a shorter file with the same first events.
    continue_log(tmp_path / "alice", events[:2])
    result, _ = collect(tmp_path, tmp_path / "alice")
    assert any("shrank" in n for n in result["sources"][0]["notes"])
    # Replaced: different first bytes, longer than before.
    new = [autocomplete_event(completionId=f"n{i}") for i in range(8)]
    path.write_text("".join(json.dumps(e) + "\n" for e in new))
    result, db = collect(tmp_path, tmp_path / "alice")
    assert any("replaced" in n for n in result["sources"][0]["notes"])
    assert result["status"]["suggestions"]["total"] == 13
    assert len({r[0] for r in table_rows(db, "suggestions")}) == 13


def test_timestamps_iso_and_epoch_ms() -> None:
    iso = parse_autocomplete(autocomplete_event(timestamp="2025-07-09T10:11:12.500Z"), None)
    ms = parse_autocomplete(autocomplete_event(timestamp=1751000000000), None)
    assert not isinstance(iso, str) and not isinstance(ms, str)
    assert iso.shown_at == datetime(2025, 7, 9, 10, 11, 12, 500000)
    assert ms.shown_at == datetime(2025, 6, 27, 4, 53, 20)
    bad = parse_autocomplete(autocomplete_event(timestamp=True), None)
    assert bad == "field 'timestamp' must be an ISO string or epoch milliseconds, got boolean"


@pytest.mark.parametrize(("compiled", "model", "expected", "how"), [
    ("def f():\n    ", "qwen2.5-coder:1.5b", "def f():\n    ", "raw"),
    ("<|repo_name|>acme/pay\n<|file_sep|>a/b.py\nx = 1\n<|file_sep|>ledger/math.py"
     "<|system_separator_istruction_repository_level|>def f():\n", "qwen2.5-coder:7b", "def f():\n", "qwen_repo_level"),
    ("\n# ledger/math.py\ndef f():\n", "starcoder2:3b", "def f():\n", "comment_header"),
    ("# Path: other/util.py\n# def helper():\n#     return 1\n# ledger/math.py\nimport os\n", "deepseek-coder",
     "import os\n", "comment_header"),
    ("+++++ other/util.py\nx = 1\n\n+++++ ledger/math.py\nimport os\n", "codestral-latest", "import os\n",
     "codestral_multifile"),
    ("import os\nprint(1)\n", "starcoder2:3b", None, "unrecognised"),
    # the header's edges, as the line-by-line reading found them before it stopped splitting the whole prefix
    ("\n\n# ledger/math.py\nx\n", "starcoder2:3b", None, "unrecognised"),
    ("# ledger/math.py", "starcoder2:3b", None, "unrecognised"),  # no line after it: it is the prefix
    ("# ledger/math.py\n", "starcoder2:3b", "", "comment_header"),
    ("// a.ts\n# ledger/math.py\nx", "starcoder2:3b", None, "unrecognised"),  # two comment markers
    ("# math.py\nx = 1\n", "starcoder2:3b", "x = 1\n", "comment_header"),
    ("# Path: a%20b/c.py\n# ledger/math.py\n\n", "starcoder2:3b", "\n", "comment_header"),
])
def test_prefix_recovery(compiled: str, model: str, expected: str | None, how: str) -> None:
    assert recover_prefix(compiled, "file:///home/a/src/pay/ledger/math.py", model, False) == (expected, how)


TOKEN = "ghp_" + "Zx9" * 12


def test_the_logged_prefix_is_kept_once_beside_the_raw_one_and_read_back_whole(tmp_path: Path) -> None:
    # Recovered shapes keep only the template's header (prefix_compiled NULL); an unrecognised one keeps the
    # whole logged prefix. Either way coalesce(prefix_compiled, prefix_header || prefix) is the logged prefix,
    # scrubbed: a token in another file's context (the header) and one in the raw prefix are both replaced.
    shapes = {
        "raw": ("def f():\n    ", "qwen2.5-coder:1.5b"),
        "qwen": ("<|repo_name|>acme/pay\n<|file_sep|>a/b.py\nx = 1\n<|file_sep|>ledger/math.py"
                 "<|system_separator_istruction_repository_level|>def f():\n", "qwen2.5-coder:7b"),
        "codestral": (f"+++++ other/util.py\nKEY = '{TOKEN}'\n\n+++++ ledger/math.py\nimport os\n", "codestral-latest"),
        "comment": (f"\n# ledger/math.py\nauth = '{TOKEN}'\n", "starcoder2:3b"),
        "unrecognised": (f"import os\nT = '{TOKEN}'\n", "starcoder2:3b"),
    }
    continue_log(tmp_path / "alice", [autocomplete_event(completionId=name, prefix=compiled, modelName=model)
                                      for name, (compiled, model) in shapes.items()])
    result, db = collect(tmp_path, tmp_path / "alice")
    assert result["error"] is None
    con = duckdb.connect(str(db), read_only=True)
    rows = {r[0]: r[1:] for r in con.execute(
        "SELECT id, prefix, prefix_compiled, prefix_header, coalesce(prefix_compiled, prefix_header || prefix) "
        "FROM suggestions").fetchall()}
    con.close()
    for name, (compiled, _) in shapes.items():
        prefix, stored_compiled, header, logged = rows[name]
        assert logged == compiled.replace(TOKEN, "<SECRET:github_token>"), name
        if name == "unrecognised":
            assert (prefix, header) == (None, None) and stored_compiled == logged
        else:
            assert stored_compiled is None and logged.endswith(prefix) and header == logged[:len(logged) - len(prefix)]
    assert rows["raw"][2] == "" and rows["comment"][0] == "auth = '<SECRET:github_token>'\n"


@pytest.mark.parametrize("value", ["acme/payments", "git@github.com:acme/payments", "https://github.com/acme/payments.git",
                                   "ssh://git@github.com/Acme/Payments.git", "git@github.com:acme/payments.git"])
def test_repo_spellings_normalise_to_one_name(value: str) -> None:
    assert normalize_repo(value) == "acme/payments"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=300), st.builds(
    lambda d: json.dumps(d).encode(), st.dictionaries(st.sampled_from(list(autocomplete_event())), st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
        st.lists(st.integers())),
    ))), max_size=12))
def test_no_input_crashes_the_collector(tmp_path_factory: pytest.TempPathFactory, lines: list[bytes]) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / STREAM
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    collector = ContinueCollector()
    batches = list(collector.collect(folder, STREAM, None, Limits(batch_events=5)))
    seen = sum(len(b.events) + len(b.rejects) for b in batches)
    non_blank = sum(1 for chunk in b"\n".join(lines).split(b"\n") if chunk.strip())
    assert seen == non_blank  # every non-blank line is either an event or a reject
    assert batches[-1].cursor.offset == path.stat().st_size


def test_every_training_relevant_event_kind_is_stored(tmp_path: Path) -> None:
    from support import continue_event, write_lines

    folder = tmp_path / "alice"
    v2 = folder / "dev_data" / "0.2.0"
    next_ok = continue_event("nextEditOutcome", completionId="ne-1", accepted=True)
    write_lines(v2 / "editOutcome.jsonl", [continue_event("editOutcome", accepted=True),
                                          continue_event("editOutcome", accepted=False, prompt="rename")])
    write_lines(v2 / "nextEditOutcome.jsonl", [
        next_ok, continue_event("nextEditOutcome", completionId="ne-2", accepted=False),
        {k: v for k, v in continue_event("nextEditOutcome", completionId="ne-3", aborted=True).items()
         if k != "accepted"},  # aborted: no label, not stored
    ])
    write_lines(v2 / "chatFeedback.jsonl", [continue_event("chatFeedback", feedback=False)])
    write_lines(v2 / "chatInteraction.jsonl", [continue_event("chatInteraction")])
    write_lines(v2 / "editInteraction.jsonl", [continue_event("editInteraction")])
    write_lines(v2 / "toolUsage.jsonl", [continue_event("toolUsage", toolCallId="call-1")])
    write_lines(v2 / "tokensGenerated.jsonl", ["{\"model\": \"qwen\"}"])  # not read: token counts only
    # Legacy layouts: 0.1.0 (migrated) and root-level files, with numeric timestamps or none at all.
    legacy_ac = {k: v for k, v in autocomplete_event(completionId="legacy-1", timestamp=1_720_000_000_000).items()
                 if k not in ("eventName", "schema", "userId", "userAgent", "selectedProfileId")}
    write_lines(folder / "dev_data" / "0.1.0" / "autocomplete.jsonl", [legacy_ac])
    write_lines(folder / "dev_data" / "autocomplete.jsonl", [legacy_ac | {"completionId": "legacy-root"}])
    write_lines(folder / "dev_data" / "chat.jsonl", [{"modelTitle": "GPT", "completionOptions": {}, "prompt": "q",
                                                    "completion": "a", "feedback": True, "sessionId": "s0"}])
    write_lines(folder / "dev_data" / "0.1.0" / "quickEdit.jsonl", [
        {"prompt": "fix", "path": "/home/alice/a.py", "label": "Edit", "diffs": [{"type": "new", "line": "x"}]}])
    result, db = collect(tmp_path, folder)
    assert result["error"] is None and result["status"]["quarantined"]["total"] == 0
    edits = {r[0]: r for r in table_rows(db, "edit_outcomes")}
    assert len(edits) == 4 and "ne-3" not in edits
    ne = edits["ne-1"]
    # id, source, source_kind, event_kind, decided_at, developer, team, repo, filepath, accepted, instruction,
    # before_text, after_text, model
    assert ne[3:5] == ("nextEditOutcome", datetime(2026, 9, 21, 14, 13, 20))  # epoch-ms timestamp
    assert (ne[5], ne[7], ne[9], ne[11], ne[12]) == ("alice@example.com", "acme/payments", True, "x = 1\n", "x = 2\n")
    edit = next(r for r in edits.values() if r[3] == "editOutcome" and r[9])
    assert (edit[10], edit[11], edit[13]) == ("add a docstring", "def f():\n    pass\n", "Claude Sonnet 4")
    interactions = {r[3]: r for r in table_rows(db, "interactions")}
    assert set(interactions) == {"chatFeedback", "chatInteraction", "editInteraction", "toolUsage", "quickEdit"}
    assert result["status"]["interactions"]["by_kind"]["chatFeedback"] == 2  # 0.2.0 and the legacy chat.jsonl
    tool = interactions["toolUsage"]
    assert tool[0] == "call-1" and tool[12] is True and json.loads(tool[13])["functionName"] == "run_terminal_command"
    assert {r[0] for r in table_rows(db, "suggestions")} == {"legacy-1", "legacy-root"}


def _event_strategy(name: str) -> st.SearchStrategy[dict[str, Any]]:
    from support import continue_event

    keys = list(autocomplete_event() if name == "autocomplete" else continue_event(name))
    values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers()))
    base = autocomplete_event() if name == "autocomplete" else continue_event(name)
    return st.dictionaries(st.sampled_from(keys), values).map(lambda d: {**base, **d})


@pytest.mark.parametrize("name", ["autocomplete", "editOutcome", "nextEditOutcome", "chatFeedback",
                                  "chatInteraction", "editInteraction", "toolUsage"])
def test_no_event_of_any_kind_crashes_the_parser(name: str) -> None:
    from collectors.continue_dev import parse_event
    from collectors.jsonl import decode_object

    @settings(max_examples=120, deadline=None)
    @given(_event_strategy(name), st.sampled_from(["all", "noCode"]))
    def check(obj: dict[str, Any], level: str) -> None:
        # The line's bytes through the decoder every collector uses, as a file line or a POST body would go.
        decoded = decode_object(json.dumps(obj).encode())
        parsed = decoded if isinstance(decoded, str) else parse_event(name, decoded, datetime(2026, 1, 1), level)
        assert isinstance(parsed, str | tuple)
        for event in parsed if isinstance(parsed, tuple) else ():
            assert event.key  # every stored record has its dedupe key

    check()

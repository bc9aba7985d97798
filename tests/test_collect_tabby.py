"""Tabby event logs into a real DuckDB store: linking across day files, accept/partial/reject, old shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors.base import Limits
from collectors.tabby import TabbyCollector, parse_line
from support import collect_site, day_ms, tabby_action, tabby_completion, table_rows, write_config, write_lines

D1, D2 = "2026-10-01", "2026-10-02"


def collect(tmp_path: Path, root: Path, **collect_overrides: Any) -> tuple[dict[str, Any], Path]:
    return collect_site(write_config(tmp_path / "site", [{"kind": "tabby", "path": str(root), "name": "tabby"}],
                                     teams=[{"name": "payments", "members": ["tabby-u1"]}],
                                     overrides={"collect": collect_overrides} if collect_overrides else None).config)


def suggestions(db: Path) -> dict[str, dict[str, Any]]:
    rows = table_rows(db, "suggestions")
    cols = ["id", "source", "source_kind", "event_kind", "shown_at", "developer", "team", "repo", "filepath",
            "language", "accepted", "partial", "prefix", "prefix_compiled", "prefix_recovery", "suffix",
            "completion", "model"]
    return {r[0]: dict(zip(cols, r, strict=False)) for r in rows}


def test_outcomes_are_linked_across_day_files_and_runs(tmp_path: Path) -> None:
    root = tmp_path / "tabby"
    write_lines(root / "events" / f"{D1}.json", [
        tabby_completion("cmpl-full", day_ms(D1, 10)), tabby_action("view", "cmpl-full", day_ms(D1, 11)),
        tabby_action("select", "cmpl-full", day_ms(D1, 12)),
        tabby_completion("cmpl-part", day_ms(D1, 20)), tabby_action("view", "cmpl-part", day_ms(D1, 21)),
        tabby_action("select", "cmpl-part", day_ms(D1, 22), line=True),
        tabby_completion("cmpl-rej", day_ms(D1, 30)), tabby_action("view", "cmpl-rej", day_ms(D1, 31)),
        tabby_action("dismiss", "cmpl-rej", day_ms(D1, 32)),
        tabby_completion("cmpl-unseen", day_ms(D1, 40)),  # never shown: not a suggestion
        # shown just before midnight; its select lands in the next day's file, read in a later run
        tabby_completion("cmpl-late", day_ms(D1, 86399)), tabby_action("view", "cmpl-late", day_ms(D1, 86399.5)),
        {"user": None, "ts": day_ms(D1, 50), "event": {"chat_completion": {}}},
    ])
    result, db = collect(tmp_path, root)
    assert result["error"] is None
    first = suggestions(db)
    assert set(first) == {"cmpl-full", "cmpl-part", "cmpl-rej", "cmpl-late"}
    assert (first["cmpl-full"]["accepted"], first["cmpl-full"]["partial"]) == (True, False)
    assert (first["cmpl-part"]["accepted"], first["cmpl-part"]["partial"]) == (True, True)
    assert (first["cmpl-rej"]["accepted"], first["cmpl-late"]["accepted"]) == (False, False)
    full = first["cmpl-full"]
    assert full["completion"] == "    return a + b\n" and full["prefix"] == "def add(a, b):\n"
    assert (full["repo"], full["language"], full["filepath"]) == ("acme/payments", "python", "ledger/math.py")
    assert (full["developer"], full["team"], full["source_kind"]) == ("tabby-u1", "payments", "tabby")
    assert str(full["shown_at"]) == "2026-10-01 00:00:11"  # the first view, not the generation time

    write_lines(root / "events" / f"{D2}.json", [tabby_action("select", "cmpl-late", day_ms(D2, 1))])
    result, db = collect(tmp_path, root)
    late = suggestions(db)["cmpl-late"]
    assert late["accepted"] is True and late["partial"] is False
    sug = result["status"]["suggestions"]
    assert (sug["total"], sug["accepted"], sug["rejected"], sug["partial"]) == (4, 3, 1, 1)
    assert result["status"]["tabby"] == {"completions": 5, "not_shown": 1}


def test_pre_v011_lines_and_a_partial_last_line(tmp_path: Path) -> None:
    root = tmp_path / "tabby"
    path = root / "events" / f"{D1}.json"
    later = json.dumps(tabby_action("select", "cmpl-old", day_ms(D1, 3), user=None)).encode()
    write_lines(path, [
        tabby_completion("cmpl-old", day_ms(D1, 1), user="old-user", legacy=True),
        {"ts": day_ms(D1, 2), "event": {"view": {"completion_id": "cmpl-old", "choice_index": 0}}},
        later[:25],  # the server's buffer was flushed mid-line: wait for the rest
    ])
    result, db = collect(tmp_path, root)
    assert result["status"]["quarantined"]["total"] == 0
    assert suggestions(db)["cmpl-old"]["accepted"] is False
    assert suggestions(db)["cmpl-old"]["developer"] == "old-user"  # the pre-v0.11 user inside the completion
    write_lines(path, [later[25:] + b"\n"], append=True)
    result, db = collect(tmp_path, root)
    assert suggestions(db)["cmpl-old"]["accepted"] is True
    assert result["status"]["quarantined"]["total"] == 0


def test_bad_lines_are_quarantined_with_reasons(tmp_path: Path) -> None:
    root = tmp_path / "tabby"
    write_lines(root / "events" / f"{D1}.json", [
        tabby_completion("cmpl-ok", day_ms(D1, 1)), tabby_action("view", "cmpl-ok", day_ms(D1, 2)),
        {"user": None, "ts": "yesterday", "event": {"view": {"completion_id": "x"}}},
        {"user": None, "ts": day_ms(D1, 3), "event": {"teleport": {}}},
        {"user": None, "ts": day_ms(D1, 4), "event": {"select": {"completion_id": "", "choice_index": 0}}},
        "{not json",
    ])
    result, db = collect(tmp_path, root)
    reasons = sorted(r[5] for r in table_rows(db, "quarantine"))
    assert len(reasons) == 4
    for fragment in ("field 'ts' must be epoch milliseconds", "unknown event kind 'teleport'",
                     "select: field 'completion_id' must be a non-empty string", "not JSON"):
        assert any(fragment in r for r in reasons), (fragment, reasons)
    assert result["status"]["suggestions"]["total"] == 1


def test_new_day_files_are_streams_in_day_order(tmp_path: Path) -> None:
    root = tmp_path / "tabby"
    for day in (D2, D1):
        write_lines(root / "events" / f"{day}.json", [tabby_completion(f"cmpl-{day}", day_ms(day, 1))])
    (root / "events" / "notes.txt").write_text("not a day file")
    assert TabbyCollector().streams(root) == [f"events/{D1}.json", f"events/{D2}.json"]


_LINE = st.fixed_dictionaries({}, optional={
    "user": st.one_of(st.none(), st.text(max_size=8), st.integers()),
    "ts": st.one_of(st.integers(min_value=-1, max_value=5 * 10**12), st.floats(), st.text(max_size=5), st.none()),
    "event": st.one_of(st.none(), st.integers(), st.dictionaries(
        st.sampled_from(["completion", "view", "select", "dismiss", "chat_completion", "x"]),
        st.one_of(st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(
            st.sampled_from(["completion_id", "choice_index", "kind", "choices", "segments", "language", "user"]),
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10),
                      st.lists(st.dictionaries(st.sampled_from(["index", "text"]),
                                               st.one_of(st.integers(), st.text(max_size=5))), max_size=2),
                      st.dictionaries(st.sampled_from(["prefix", "suffix", "filepath", "git_url"]),
                                      st.one_of(st.text(max_size=10), st.integers()))),
            max_size=6)), max_size=2)),
})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), _LINE.map(lambda d: json.dumps(d).encode())))
def test_no_line_crashes_the_tabby_parser(raw: bytes) -> None:
    parsed = parse_line(raw)
    assert isinstance(parsed, str | tuple)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=120), _LINE.map(lambda d: json.dumps(d).encode())), max_size=10))
def test_no_file_crashes_the_tabby_collector(tmp_path_factory: pytest.TempPathFactory, lines: list[bytes]) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    path = write_lines(root / "events" / f"{D1}.json", [b"\n".join(lines) + b"\n"])
    batches = list(TabbyCollector().collect(root, f"events/{D1}.json", None, Limits(batch_events=4)))
    assert batches[-1].cursor.offset == path.stat().st_size
    rejects = sum(len(b.rejects) for b in batches)
    assert rejects <= sum(1 for chunk in b"\n".join(lines).split(b"\n") if chunk.strip())

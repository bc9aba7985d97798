"""`devtune quarantine list|show|retry` with the real CLI: find a bad line, fix it in place, store it."""

from __future__ import annotations

import json
from pathlib import Path

from support import autocomplete_event, continue_log, devtune_json, run_devtune, write_config

STREAM = "dev_data/0.2.0/autocomplete.jsonl"


def test_list_show_fix_and_retry(tmp_path: Path) -> None:
    fixable = json.dumps(autocomplete_event(completionId="fixable", accepted="true", prefix='token = "' + "a1B2" * 8
                                            + '"\n'), separators=(",", ":"))
    hopeless = '{"completionId": "cut-short", "accepted": tr'
    path = continue_log(tmp_path / "alice", [autocomplete_event(completionId="ok"), fixable, hopeless])
    setup = write_config(tmp_path / "site", [{"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice",
                                              "developer": "alice@example.com"}])
    config = str(setup.config)
    assert run_devtune("--config", config, "collect").returncode == 0

    listed = devtune_json("--config", config, "quarantine", "list", "--json")
    assert len(listed) == 2
    by_reason = {("accepted" in r["reason"]): r for r in listed}
    bad = by_reason[True]
    assert (bad["source"], bad["stream"]) == ("alice", STREAM)
    assert "field 'accepted' must be a boolean, got string" in bad["reason"]
    assert "a1B2" * 8 not in bad["excerpt"]  # excerpts are scrubbed before they are stored

    shown = run_devtune("--config", config, "quarantine", "show", bad["id"])
    assert shown.returncode == 0
    for fragment in (str(path), f"offset         {bad['offset']}", "must be a boolean", "<SECRET:"):
        assert fragment in shown.stdout, (fragment, shown.stdout)

    # The fix: the bad value corrected in place, keeping the line's length (JSON allows the padding).
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"accepted":"true"', b'"accepted":true  '))
    retried = run_devtune("--config", config, "quarantine", "retry", bad["id"])
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "stored: 1 event(s) parsed and stored" in retried.stdout

    report = devtune_json("--config", config, "status", "--json")
    assert report["suggestions"]["total"] == 2 and report["quarantined"]["total"] == 1
    assert report["scrubbed"].get("secret_assignment", 0) >= 1  # the retried line went through the scrubber

    # A line that still does not parse stays, with the reason as of now; retry says so and exits 1.
    still = run_devtune("--config", config, "quarantine", "retry")
    assert still.returncode == 1 and "still quarantined: not JSON" in still.stdout
    missing = run_devtune("--config", config, "quarantine", "show", "000000000000")
    assert missing.returncode == 1 and "no quarantined line 000000000000" in missing.stderr

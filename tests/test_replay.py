"""Warm-started runs train on what their adapter has not seen, plus a fixed replay sample of the rest."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipelines.config import TrainConfig
from pipelines.datasets.build import write_jsonl
from pipelines.datasets.context import TextContext
from pipelines.datasets.dpo import PairExample, pair_row
from pipelines.datasets.kto import kto_row
from pipelines.datasets.outcomes import Side
from pipelines.datasets.sft import ChatExample, FimExample, chat_row, fim_row
from pipelines.tokens import FAMILIES, FimTokens
from pipelines.train.replay import latest_ts, new_rows, select_rows
from pipelines.train.rundir import new_lines, read_line_index, read_rows, write_line_index
from pipelines.train.train import read_training_rows


def rows(n: int) -> list[dict[str, str]]:
    return [{"id": str(i), "ts": f"2026-10-{1 + i:02d}T09:00:00"} for i in range(n)]


def test_no_boundary_means_every_row() -> None:
    picked = select_rows(rows(10), None, 0.25, seed=0)
    assert len(picked.rows) == 10 and picked.new == 10 and picked.replayed == 0


def test_new_rows_plus_a_replay_share_of_older_ones() -> None:
    data = rows(20)
    picked = select_rows(data, "2026-10-12T09:00:00", 0.25, seed=0)  # rows 0..11 seen, 12..19 new
    assert picked.new == 8 and picked.replayed == 3  # 8 * 0.25 / 0.75 = 2.67 -> 3
    ids = [int(r["id"]) for r in picked.rows]
    assert [i for i in ids if i >= 12] == list(range(12, 20))
    assert all(i < 12 for i in ids if i not in range(12, 20))
    assert ids == sorted(ids)  # oldest first, as in the file
    assert select_rows(data, "2026-10-12T09:00:00", 0.25, seed=0) == picked  # a resumed run sees the same rows
    assert select_rows(data, "2026-10-12T09:00:00", 0.25, seed=1).rows != picked.rows


def test_replay_is_capped_by_what_exists_and_nothing_new_means_nothing() -> None:
    data = rows(5)
    assert select_rows(data, "2026-10-02T09:00:00", 0.9, seed=0).replayed == 2  # all older rows, no more
    assert select_rows(data, "2026-12-01T00:00:00", 0.25, seed=0).rows == []
    assert new_rows(data, "2026-10-03T09:00:00") == 2 and new_rows(data, None) == 5
    assert latest_ts(data, [{"ts": "2026-11-01T00:00:00"}]) == "2026-11-01T00:00:00" and latest_ts([]) is None


# Texts that look like a row's `ts` from inside a string, and the separators str.splitlines would cut at.
TRICKY = ['x = {"ts":"2099-01-01T00:00:00"}\n', 'say "ts": "1999"\u2028next\u0085', "plain code\n", '\\"ts\\":\\"']


def write_dataset(data: Path, n: int, index: bool = False) -> list[str]:
    """The four training files as the dataset builder writes them (its row functions and writer; with `index`,
    data/lines.json too)."""
    family, _, (pre, suf, mid), eos, spm = FAMILIES[1]  # StarCoder: SPM rows too
    fim = FimTokens(family, pre, suf, mid, eos or "<|endoftext|>", spm_supported=spm)
    start = datetime(2026, 10, 1, 9, tzinfo=UTC)
    ts = [start + timedelta(hours=7 * i) for i in range(n)]
    text = [TRICKY[i % len(TRICKY)] * (1 + i % 3) for i in range(n)]
    rows = {
        "sft.jsonl": [fim_row(FimExample(f"s{i}", "kept", "alice", ts[i], "r/a.py", TextContext(text[i], "tail"),
                                         "mid " + text[i], "spm" if i % 5 == 0 else "psm"), fim) for i in range(n)],
        "dpo.jsonl": [pair_row(PairExample(f"p{i}", "rejected", "kept", "alice", ts[i], "r/a.py",
                                           TextContext(text[i], ""), "yes", "no" + text[i]), fim)
                      for i in range(0, n, 2)],
        "kto.jsonl": [kto_row(Side(f"k{i}", "rejected", i % 3 == 0, "alice", ts[i], "r/a.py", TextContext(text[i], "s"),
                                   "t"), fim) for i in range(n)],
        "chat.jsonl": [chat_row(ChatExample(f"c{i}", "edit", "alice", ts[i], "a.py", text[i], '{"ts":"0"}'))
                       for i in range(0, n, 3)],
    }
    data.mkdir(parents=True)
    lines = {name: new_lines() for name in rows}
    for name, written in rows.items():
        write_jsonl(data / name, iter(written), hashlib.sha256(), lines[name])
    if index:
        write_line_index(data, lines)
    return [t.isoformat() for t in ts]


@pytest.mark.parametrize("index", ["scanned", "indexed", "rewritten"])
@pytest.mark.parametrize("chat_template", [None, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"])
def test_a_run_reads_the_rows_that_parsing_every_row_would_pick(tmp_path: Path, tiny_model: Path,
                                                                  chat_template: str | None, index: str) -> None:
    """Only the picked rows are parsed (a row's ts is read from its line, or from the build's data/lines.json):
    the same rows, counts and data_until as selecting from every parsed row, on rows whose texts imitate a `ts`
    key and hold U+2028. A file rewritten after the index was written is scanned."""
    data = tmp_path / "data"
    stamps = write_dataset(data, 40, index=index != "scanned")
    if index == "rewritten":  # a row removed from kto.jsonl (as by hand): the index no longer describes it
        kept = (data / "kto.jsonl").read_bytes().split(b"\n")
        (data / "kto.jsonl").write_bytes(b"\n".join(kept[:10] + kept[11:]))
    assert set(read_line_index(data)) == {"scanned": set(), "rewritten": {"sft.jsonl", "dpo.jsonl", "chat.jsonl"},
                                          "indexed": {"sft.jsonl", "dpo.jsonl", "kto.jsonl", "chat.jsonl"}}[index]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = chat_template
    cfg = TrainConfig(replay_share=0.3, seed=7)
    for until in (None, stamps[0], stamps[25], stamps[-2], stamps[-1], "2020-01-01T00:00:00+00:00"):
        got = read_training_rows(tmp_path, cfg, tokenizer, until)
        files = {n: read_rows(tmp_path / "data" / f"{n}.jsonl") for n in ("sft", "chat", "dpo", "kto")}
        if chat_template is None:
            files["chat"] = []
        want = {n: select_rows(r, until, cfg.replay_share, cfg.seed) for n, r in files.items()}
        assert got.counts == {n: {"rows": len(w.rows), "new": w.new, "replayed": w.replayed} for n, w in want.items()}
        assert got.dpo == want["dpo"].rows and got.kto == want["kto"].rows
        assert [r["prompt"] for r in got.sft][:len(want["sft"].rows)] == [r["prompt"] for r in want["sft"].rows]
        assert len(got.sft) == len(want["sft"].rows) + len(want["chat"].rows)
        assert got.data_until == latest_ts(*files.values())
        if until == stamps[25]:
            assert 0 < got.counts["kto"]["new"] < 40 and got.counts["kto"]["replayed"] > 0

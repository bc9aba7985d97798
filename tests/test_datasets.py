"""FIM tokens from the base tokenizer, the time-based split, and the dataset files built from a real store."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import fields, replace
from datetime import datetime
from pathlib import Path

import pytest

from daemon import jobs
from daemon.config import load_config
from pipelines.config import DatasetsConfig
from pipelines.datasets.build import FILES, _cut, build_datasets
from pipelines.datasets.context import Spool, TextContext
from pipelines.datasets.dpo import PairExample
from pipelines.datasets.outcomes import Side, clip_prefix, clip_suffix
from pipelines.datasets.sft import FimExample, block_bodies
from pipelines.datasets.split import heldout_cutoff, time_split
from pipelines.scope import team
from pipelines.store.db import Store
from pipelines.tokens import TokenizerError, load_base_tokenizer
from support import (
    QWEN,
    ROOT,
    STARCODER,
    T0,
    CommitSpec,
    autocomplete_event,
    continue_log,
    days,
    family_tokenizer,
    make_repo,
    read_jsonl,
    run_devtune,
    write_config,
)


@pytest.mark.parametrize(("specials", "eos", "family", "psm", "spm", "end"), [
    (*QWEN, "qwen2.5-coder", "<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>", None, "<|endoftext|>"),
    (*STARCODER, "starcoder", "<fim_prefix>P<fim_suffix>S<fim_middle>", "<fim_prefix><fim_suffix>S<fim_middle>P",
     "<|endoftext|>"),
    (["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"], "</s>", "codellama", "▁<PRE> P ▁<SUF>S ▁<MID>",
     "▁<PRE> ▁<SUF>S ▁<MID> P", "▁<EOT>"),
    (["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"], "<｜end▁of▁sentence｜>", "deepseek-coder",
     "<｜fim▁begin｜>P<｜fim▁hole｜>S<｜fim▁end｜>", None, "<｜end▁of▁sentence｜>"),
])
def test_fim_tokens_come_from_the_tokenizer(tmp_path: Path, specials: list[str], eos: str, family: str,
                                            psm: str, spm: str | None, end: str) -> None:
    base = load_base_tokenizer(str(family_tokenizer(tmp_path / family, specials, eos)))
    assert base.fim.family == family
    assert base.fim.psm("P", "S") == psm and base.fim.eos == end
    assert base.fim.spm_supported == (spm is not None)
    if spm is None:
        with pytest.raises(ValueError, match="no suffix-first"):
            base.fim.spm("P", "S")
    else:
        assert base.fim.spm("P", "S") == spm
    # each sentinel is one token, as the model saw it in pretraining
    assert base.count([specials[0]]) == [1]


def test_a_tokenizer_without_fim_tokens_is_a_clear_error(tmp_path: Path) -> None:
    folder = family_tokenizer(tmp_path / "plain", ["<pad>"], "</s>")
    with pytest.raises(TokenizerError, match=r"'.*plain' has no fill-in-the-middle tokens.*Qwen2\.5-Coder.*CodeLlama"):
        load_base_tokenizer(str(folder))


def test_a_hub_model_that_cannot_be_fetched_is_not_called_missing(tmp_path: Path) -> None:
    # conftest sets HF_HUB_OFFLINE: the hub cannot be asked, which is not the same as "no tokenizer.json"
    with pytest.raises(TokenizerError, match="cannot load the tokenizer of base_model 'acme/no-such-coder'"):
        load_base_tokenizer("acme/no-such-coder")


def test_time_split_holds_out_the_most_recent_rows_and_never_splits_a_timestamp() -> None:
    rows = [(datetime(2026, 1, d), i) for i, d in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 9])]
    train, held = time_split(rows, lambda r: r[0], 0.1)
    assert [r[1] for r in held] == [8, 9]  # both rows of the last day, though 10% asked for one
    assert max(r[0] for r in train) < min(r[0] for r in held)
    # or by days: the last 3 days before the newest row
    assert heldout_cutoff([r[0] for r in rows], 0.1, days=3) == datetime(2026, 1, 6)
    assert [r[1] for r in time_split(rows, lambda r: r[0], 0.1, days=3)[1]] == [5, 6, 7, 8, 9]


def test_clipping_keeps_whole_lines() -> None:
    text = "line one\nline two\nline three\n"
    assert clip_prefix(text, 15) == "line three\n"
    assert clip_suffix(text, 12) == "line one\n"


def test_block_middles_are_indented_bodies_inside_added_lines() -> None:
    text = "class A:\n    def f(self):\n        x = 1\n\n        return x\n\n    y = 2\nz = 3\n"
    lines = text.splitlines(keepends=True)
    assert block_bodies(lines, [(1, 8)], max_lines=30) == [(2, 7), (3, 5)]  # class body, method body
    assert block_bodies(lines, [(2, 5)], max_lines=30) == [(3, 5)]
    assert block_bodies(lines, [(1, 8)], max_lines=4) == [(3, 5)]


def store_with_team_data(tmp_path: Path, n_commits: int = 14) -> Store:
    specs = [CommitSpec({f"ledger/m{i}.py": "".join(f"def op_{i}_{j}(x):\n    return x * {j}\n\n" for j in range(6))},
                        author=("Bob", "bob@example.com") if i % 2 else ("Alice", "alice@example.com"),
                        when=T0 + days(i), message=f"m{i}") for i in range(n_commits)]
    make_repo(tmp_path / "repo", specs)
    continue_log(tmp_path / "alice", [
        autocomplete_event(timestamp=(T0 + days(i / 2)).isoformat() + "Z", accepted=i % 3 == 0,
                           prefix=f"def op_{i}(x):\n", completion=f"    return x + {i}\n") for i in range(30)])
    setup = write_config(tmp_path / "site", [
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"},
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice", "developer": "alice@example.com"}],
        teams=[{"name": "payments", "members": ["alice@example.com", "bob@example.com"]}])
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    assert jobs.collect(store, cfg)["error"] is None
    return store


def test_sft_rows_use_the_base_tokens_and_hold_out_the_latest(tmp_path: Path, tiny_model: Path) -> None:
    store = store_with_team_data(tmp_path)
    tokenizer = load_base_tokenizer(str(tiny_model))
    cfg = DatasetsConfig(heldout_fraction=0.2, min_train_rows=10, min_heldout_rows=3, max_row_tokens=512)
    report = build_datasets(store, team("payments"), cfg, tokenizer, tmp_path / "data")
    store.close()
    assert report.skipped == ""
    train = read_jsonl(tmp_path / "data" / "sft.jsonl")
    held = read_jsonl(tmp_path / "data" / "heldout.jsonl")
    assert len(train) == report.train_rows and len(held) == report.heldout_rows
    # 30 events, every third accepted, none with a commit to check against: all ten are "accepted" rows
    assert report.counts["train"].get("accepted", 0) + report.counts["heldout"].get("accepted", 0) == 10
    assert report.links == {"unknown": 10}
    assert report.counts["train"]["committed"] + report.counts["heldout"].get("committed", 0) > 0
    for row in train + held:
        assert row["prompt"].startswith("<|fim_prefix|>") and row["prompt"].endswith("<|fim_middle|>")
        assert row["completion"].endswith("<|endoftext|>") and row["order"] == "psm"  # Qwen: no SPM
    assert max(r["ts"] for r in train) < min(r["ts"] for r in held)
    assert not {(r["prompt"], r["completion"]) for r in train} & {(r["prompt"], r["completion"]) for r in held}
    # a committed middle is text the commit added, with the file around it as context
    committed = next(r for r in train if r["signal"] == "committed")
    assert committed["completion"].startswith(("def op_", "    return x *", "\n"))
    # rejected suggestions with no accepted one at their spot are KTO's undesirable rows
    kto = read_jsonl(tmp_path / "data" / "kto.jsonl")
    assert {r["label"] for r in kto} == {False, True} and all(r["prompt"].startswith("<|fim_prefix|>") for r in kto)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    digest = hashlib.sha256(b"".join((tmp_path / "data" / name).read_bytes() for name in FILES)).hexdigest()
    assert manifest["sha256"] == digest and manifest["fim_family"] == "qwen2.5-coder"
    assert manifest["files"]["sft.jsonl"] == report.counts["train"]
    # data/lines.json names every training row's line and ts, as scanning the files finds them
    from pipelines.train.rundir import read_line_index, scan_index

    index = read_line_index(tmp_path / "data")
    assert set(index) == {"sft.jsonl", "dpo.jsonl", "kto.jsonl", "chat.jsonl"}
    assert all(lines == scan_index(tmp_path / "data" / name) for name, lines in index.items())
    assert len(index["sft.jsonl"][0]) == len(train) and len(index["kto.jsonl"][0]) == len(kto) > 0


def test_committed_rows_use_blocks_and_suffix_first_layouts_where_the_family_has_them(tmp_path: Path) -> None:
    store = store_with_team_data(tmp_path)
    tokenizer = load_base_tokenizer(str(family_tokenizer(tmp_path / "tok", *STARCODER)))
    cfg = DatasetsConfig(heldout_fraction=0.2, min_train_rows=1, min_heldout_rows=1, spm_fraction=1.0,
                         block_fraction=1.0, fim_spans_per_file=3)
    build_datasets(store, team("payments"), cfg, tokenizer, tmp_path / "data")
    store.close()
    committed = [r for r in read_jsonl(tmp_path / "data" / "sft.jsonl") if r["signal"] == "committed"]
    assert committed and all(r["order"] == "spm" for r in committed)
    for r in committed:
        assert r["prompt"].startswith("<fim_prefix><fim_suffix>")
        prefix = r["prompt"].split("<fim_middle>")[1]
        # a block body: the function's header ends the prefix, its body is the middle
        assert prefix.endswith(":\n") and r["completion"].startswith("    return x * ")
        assert not r["prompt"].endswith("<fim_middle>")  # the prefix comes last
    # held-out rows are scored in the layout editors send: PSM, the prompt ending with <fim_middle>
    held = [r for r in read_jsonl(tmp_path / "data" / "heldout.jsonl") if r["kind"] == "fim"]
    assert held and all(r["order"] == "psm" and r["prompt"].endswith("<fim_middle>") for r in held)


def test_rows_over_the_token_cap_lose_context_not_their_middle(tmp_path: Path, tiny_model: Path) -> None:
    store = store_with_team_data(tmp_path)
    tokenizer = load_base_tokenizer(str(tiny_model))
    for exact in (True, False):
        cfg = DatasetsConfig(heldout_fraction=0.2, min_train_rows=1, min_heldout_rows=1, max_row_tokens=64,
                             max_prefix_chars=3000, exact_token_counts=exact)
        out = tmp_path / f"data-{exact}"
        build_datasets(store, team("payments"), cfg, tokenizer, out)
        rows = read_jsonl(out / "sft.jsonl") + read_jsonl(out / "kto.jsonl")
        assert rows
        for r in rows:
            assert tokenizer.count([r["prompt"] + r["completion"]])[0] <= 64
        counted = json.loads((out / "manifest.json").read_text())["token_counts"]
        # exact: every row longer in bytes than the cap is tokenized; else most are bounded by the estimate
        assert counted["tokenized"] > 0 and ("estimated" not in counted if exact else counted["estimated"] > 0)
    store.close()


def test_a_team_without_enough_data_is_skipped_with_the_reason(tmp_path: Path) -> None:
    store = store_with_team_data(tmp_path, n_commits=2)
    tokenizer = load_base_tokenizer(str(family_tokenizer(tmp_path / "tok", *QWEN)))
    report = build_datasets(store, team("payments"), DatasetsConfig(min_train_rows=500), tokenizer, tmp_path / "data")
    store.close()
    assert "fewer than [datasets] min_train_rows = 500" in report.skipped


def test_dataset_build_and_show_on_the_command_line(tmp_path: Path) -> None:
    store_with_team_data(tmp_path).close()
    family_tokenizer(tmp_path / "tok", *QWEN)
    config = tmp_path / "site" / "config.toml"
    text = config.read_text().replace('base_model = "Qwen/Qwen2.5-Coder-1.5B"', f'base_model = "{tmp_path / "tok"}"')
    config.write_text(text.replace("min_train_rows = 32", "min_train_rows = 4"))
    out = tmp_path / "snapshot"
    built = run_devtune("--config", str(config), "dataset", "build", "--scope", "team:payments", "--out", str(out))
    assert built.returncode == 0, built.stderr
    assert "team:payments:" in built.stdout and "SFT training rows" in built.stdout
    assert {p.name for p in out.iterdir()} == {*FILES, "manifest.json", "lines.json"}
    shown = run_devtune("--config", str(config), "dataset", "show", str(out))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("signal"))
    assert header.split() == ["signal", "sft", "dpo", "kto", "chat", "heldout"]
    manifest = json.loads((out / "manifest.json").read_text())
    total = next(ln for ln in lines if ln.startswith("total")).split()
    assert total[1:] == [f"{sum(manifest['files'][f].values()):,}" for f in FILES]
    bad = run_devtune("--config", str(config), "dataset", "build", "--scope", "team:nosuch", "--out", str(out))
    assert bad.returncode == 2 and "no team 'nosuch'" in bad.stderr

    # While the service holds the store, the same command is answered by the service: the same files.
    service = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config), "run"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        service_file = config.parent / "state" / "service.json"
        deadline = time.monotonic() + 60
        while not service_file.is_file():
            assert service.poll() is None and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.2)
        again = tmp_path / "snapshot-from-service"
        via = run_devtune("--config", str(config), "dataset", "build", "--scope", "team:payments", "--out",
                          str(again), "--json")
        assert via.returncode == 0, via.stderr
        assert json.loads(via.stdout)["sha256"] == manifest["sha256"]
        assert all((again / f).read_bytes() == (out / f).read_bytes() for f in FILES)
        # the service built it in its own state directory; this process (the command's user) wrote --out
        assert [p.name for p in (config.parent / "state" / "exports").iterdir()] != []
        assert json.loads((again / "manifest.json").read_text())["out_dir"] == str(again)
    finally:
        service.terminate()
        assert service.wait(timeout=60) == 0


def test_rows_with_unicode_line_separators_read_back_whole(tmp_path: Path) -> None:
    # orjson leaves U+2028, U+2029 and U+0085 unescaped in strings; JavaScript sources carry them. The
    # trainer's and evaluator's reader split lines at them and failed on such a row.
    from pipelines.datasets.build import write_jsonl
    from pipelines.train.rundir import read_rows

    rows = [{"signal": "kept", "ts": f"2026-10-0{i + 1}T09:00:00", "prompt": f"const s = 'a\u2028b';\n{i}",
             "completion": "x\u0085y\u2029z\r\n"} for i in range(3)]
    write_jsonl(tmp_path / "sft.jsonl", iter(rows), hashlib.sha256())
    assert read_rows(tmp_path / "sft.jsonl") == rows


@pytest.mark.parametrize("chunk_bytes", [1, 2, 5, 13, 64, 1 << 20])
def test_dataset_files_read_a_chunk_at_a_time_give_the_lines_a_whole_read_gives(tmp_path: Path,
                                                                                  chunk_bytes: int) -> None:
    # The trainer reads a night's files a chunk at a time (a 1M-suggestion kto.jsonl is 1.8 GB) and the picked
    # lines back by offset: the lines must be those of splitting the whole file at b"\n", wherever a chunk ends.
    from pipelines.train.rundir import read_spans, scan_lines

    texts = [b"", b"\n", b"{}", b'{"a":1}\n', b'{"a":1}\n\n  \n{"b":"x\xe2\x80\xa8y"}\n{"c":2}',
             b'\n\n{"a":"' + b"z" * 200 + b'"}\r\n \t\n{"d":4}\n', b'{"e":"\xc2\x85"}\n{"f":[1,2]}\n\n']
    for n, data in enumerate(texts):
        path = tmp_path / f"{n}.jsonl"
        path.write_bytes(data)
        whole = [line for line in data.split(b"\n") if line.strip()]
        scanned = list(scan_lines(path, chunk_bytes))
        assert [line for _, line in scanned] == whole
        assert read_spans(path, [(at, len(line)) for at, line in scanned]) == whole
    assert list(scan_lines(tmp_path / "missing.jsonl")) == []


def test_rows_cut_to_fit_are_the_rows_dataclasses_replace_would_make() -> None:
    """The token stage copies a row with new context without __init__: only sound while the row types
    validate nothing in __post_init__ and keep all their fields in __slots__ (no __dict__ besides, which a
    base class without slots of its own would add: 160 bytes a row instead of 112)."""
    at = datetime(2026, 11, 2, 9)
    spool = Spool()
    for context in (TextContext("def f():\n", "\nx\n"), spool.put("def f():\n", "\nx\n")):
        rows = [FimExample("f", "kept", "alice", at, "r/a.py", context, "  return 1", "spm"),
                PairExample("a>b", "rejected", "kept", "alice", at, "r/a.py", context, "1", "2"),
                Side("s", "rejected", False, "alice", at, "r/a.py", context, "3")]
        for row in rows:
            assert not hasattr(type(row), "__post_init__") and not hasattr(row, "__dict__")
            assert set(type(row).__slots__) == {f.name for f in fields(row)}
            cut, want = _cut(row, 5, 1), replace(row, context=TextContext("f():\n", "\n"))
            assert cut == want and hash(cut) == hash(want)
            assert (cut.prefix, cut.suffix) == ("f():\n", "\n")
            assert type(cut) is type(row) and row.prefix != cut.prefix  # the original is untouched
    spool.close()

"""FIM tokens from the base tokenizer, the time-based split, and SFT rows built from a real store."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from daemon import jobs
from daemon.config import DatasetsConfig, load_config
from pipelines.scope import team
from pipelines.sft import build_sft, clip_prefix, clip_suffix
from pipelines.split import time_split
from pipelines.store import Store
from pipelines.tokens import TokenizerError, load_base_tokenizer
from support import T0, CommitSpec, autocomplete_event, continue_log, days, make_repo, write_config


def family_tokenizer(folder: Path, specials: list[str], eos: str) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[eos, *specials], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return folder


@pytest.mark.parametrize(("specials", "eos", "family", "prompt", "end"), [
    (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"], "<|endoftext|>", "qwen2.5-coder",
     "<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>", "<|endoftext|>"),
    (["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], "<|endoftext|>", "starcoder",
     "<fim_prefix>P<fim_suffix>S<fim_middle>", "<|endoftext|>"),
    (["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"], "</s>", "codellama", "▁<PRE> P ▁<SUF>S ▁<MID>", "▁<EOT>"),
    (["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"], "<｜end▁of▁sentence｜>", "deepseek-coder",
     "<｜fim▁begin｜>P<｜fim▁hole｜>S<｜fim▁end｜>", "<｜end▁of▁sentence｜>"),
])
def test_fim_tokens_come_from_the_tokenizer(tmp_path: Path, specials: list[str], eos: str, family: str,
                                            prompt: str, end: str) -> None:
    base = load_base_tokenizer(str(family_tokenizer(tmp_path / family, specials, eos)))
    assert base.fim.family == family
    assert base.fim.psm("P", "S") == prompt and base.fim.eos == end
    # each sentinel is one token, as the model saw it in pretraining
    assert base.count([specials[0]]) == [1]


def test_a_tokenizer_without_fim_tokens_is_a_clear_error(tmp_path: Path) -> None:
    folder = family_tokenizer(tmp_path / "plain", ["<pad>"], "</s>")
    with pytest.raises(TokenizerError, match=r"has no fill-in-the-middle tokens.*Qwen2\.5-Coder.*CodeLlama"):
        load_base_tokenizer(str(folder))


def test_time_split_holds_out_the_most_recent_rows_and_never_splits_a_timestamp() -> None:
    rows = [(datetime(2026, 1, d), i) for i, d in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 9])]
    train, held = time_split(rows, lambda r: r[0], 0.1)
    assert [r[1] for r in held] == [8, 9]  # both rows of the last day, though 10% asked for one
    assert max(r[0] for r in train) < min(r[0] for r in held)


def test_clipping_keeps_whole_lines() -> None:
    text = "line one\nline two\nline three\n"
    assert clip_prefix(text, 15) == "line three\n"
    assert clip_suffix(text, 12) == "line one\n"


def store_with_team_data(tmp_path: Path, n_commits: int = 14) -> tuple[Store, Path]:
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
    return store, tmp_path


def test_sft_rows_use_the_base_tokens_and_hold_out_the_latest(tmp_path: Path, tiny_model: Path) -> None:
    store, _ = store_with_team_data(tmp_path)
    tokenizer = load_base_tokenizer(str(tiny_model))
    cfg = DatasetsConfig(heldout_fraction=0.2, min_train_rows=10, min_heldout_rows=3, max_row_tokens=512)
    report = build_sft(store, team("payments"), cfg, tokenizer, tmp_path / "data")
    store.close()
    assert report.skipped == ""
    train = [json.loads(x) for x in (tmp_path / "data" / "sft.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == report.train_rows and len(held) == report.heldout_rows
    # 30 events, every third accepted: all ten are rows, on one side of the split or the other
    assert report.counts["train"].get("accepted", 0) + report.counts["heldout"].get("accepted", 0) == 10
    assert report.counts["train"]["committed"] + report.counts["heldout"].get("committed", 0) > 0
    for row in train + held:
        assert row["prompt"].startswith("<|fim_prefix|>") and row["prompt"].endswith("<|fim_middle|>")
        assert row["completion"].endswith("<|endoftext|>")
    assert max(r["ts"] for r in train) < min(r["ts"] for r in held)
    assert not {(r["prompt"], r["completion"]) for r in train} & {(r["prompt"], r["completion"]) for r in held}
    # a committed middle is text the commit added, with the file around it as context
    committed = next(r for r in train if r["signal"] == "committed")
    assert committed["completion"].startswith(("def op_", "    return x *", "\n"))
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    digest = hashlib.sha256((tmp_path / "data" / "sft.jsonl").read_bytes()
                            + (tmp_path / "data" / "heldout.jsonl").read_bytes()).hexdigest()
    assert manifest["sha256"] == digest and manifest["fim_family"] == "qwen2.5-coder"


def test_rows_over_the_token_cap_lose_context_not_their_middle(tmp_path: Path, tiny_model: Path) -> None:
    store, _ = store_with_team_data(tmp_path)
    tokenizer = load_base_tokenizer(str(tiny_model))
    cfg = DatasetsConfig(heldout_fraction=0.2, min_train_rows=1, min_heldout_rows=1, max_row_tokens=64,
                         max_prefix_chars=3000)
    build_sft(store, team("payments"), cfg, tokenizer, tmp_path / "data")
    store.close()
    rows = [json.loads(x) for x in (tmp_path / "data" / "sft.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:
        assert tokenizer.count([r["prompt"] + r["completion"]])[0] <= 64


def test_a_team_without_enough_data_is_skipped_with_the_reason(tmp_path: Path, tiny_model: Path) -> None:
    store, _ = store_with_team_data(tmp_path, n_commits=2)
    tokenizer = load_base_tokenizer(str(tiny_model))
    report = build_sft(store, team("payments"), DatasetsConfig(min_train_rows=500), tokenizer, tmp_path / "data")
    store.close()
    assert "fewer than [datasets] min_train_rows = 500" in report.skipped

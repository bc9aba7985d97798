"""DPO pairing rules, KTO rows and weights, and chat rows from edit outcomes."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from pathlib import Path

from daemon import jobs
from daemon.config import load_config
from pipelines.config import DatasetsConfig
from pipelines.datasets.build import build_datasets
from pipelines.datasets.context import TextContext
from pipelines.datasets.dpo import pair_examples, same_text
from pipelines.datasets.kto import kto_weights
from pipelines.datasets.outcomes import Outcome, sides
from pipelines.scope import dev, team
from pipelines.store.db import Store
from pipelines.tokens import load_base_tokenizer
from support import (
    QWEN,
    T0,
    continue_event,
    days,
    family_tokenizer,
    read_jsonl,
    store_suggestions,
    tabby_suggestion,
    write_config,
    write_lines,
)

PREFIX = "".join(f"CONST_{i} = {i}\n" for i in range(100)) + "import math\n\n\ndef area(r):\n"  # ~1,400 chars
SUFFIX = "\n\ndef perimeter(r):\n    return 2 * math.pi * r\n"


def outcome(n: int, text: str, accepted: bool, link: str = "", developer: str = "alice", prefix: str = PREFIX,
            suffix: str = SUFFIX, committed: str | None = None) -> Outcome:
    return Outcome(id=f"s{n}", developer=developer, ts=T0 + timedelta(minutes=n), path="acme/geo/geo.py",
                   context=TextContext(prefix, suffix), text=text, accepted=accepted,
                   link=link or ("unknown" if accepted else ""), committed_text=committed)


def test_pairs_share_one_context_and_never_have_equal_sides() -> None:
    far_prefix = "# pruned differently\n" * 40 + PREFIX.replace("import math", "import math  ")
    items = [
        outcome(1, "    return math.pi * r ** 2\n", accepted=True, link="kept"),
        outcome(2, "    return r * r\n", accepted=False),
        # the same spot: the far prefix and trailing spaces differ
        outcome(3, "    return 3.14 * r\n", accepted=False, prefix=far_prefix, suffix=SUFFIX.replace("\n", "  \n", 1)),
        # the same text as the accepted one, spaced differently: accepted and rejected at once says nothing
        outcome(4, "    return  math.pi*r ** 2\n", accepted=False),
        # another developer at the same spot: never paired with alice's choice
        outcome(5, "    return 0\n", accepted=False, developer="bob"),
        # another spot in the file (the cursor line differs)
        outcome(6, "return 1\n", accepted=False, prefix=PREFIX + "    "),
        # a rewritten suggestion: paired with what replaced it
        outcome(7, "    return r\n", accepted=True, link="rewritten", committed="    return math.tau * r / 2\n",
                prefix=PREFIX.replace("area", "half")),
        outcome(8, "    pass\n", accepted=True, link="deleted", prefix=PREFIX.replace("area", "gone")),
    ]
    dropped: Counter[str] = Counter()
    pairs, unpaired = pair_examples(sides(items), max_pairs_per_context=4, dropped=dropped)
    got = {(p.chosen, p.rejected, p.signal) for p in pairs}
    assert got == {("    return math.pi * r ** 2\n", "    return r * r\n", "rejected"),
                   ("    return math.pi * r ** 2\n", "    return 3.14 * r\n", "rejected"),
                   ("    return math.tau * r / 2\n", "    return r\n", "replaced")}
    assert all(not same_text(p.chosen, p.rejected) and p.developer == "alice" for p in pairs)
    assert dropped == {"rejected_equals_accepted": 1}
    kto = {k.id: k for k in unpaired}
    assert set(kto) == {"s5", "s6", "s8"}  # bob's and the other spot's rejections, the deleted suggestion
    assert not any(k.desirable for k in kto.values()) and kto["s8"].signal == "deleted"


def test_pairs_per_context_are_capped_and_the_rest_go_to_kto() -> None:
    items = [outcome(0, "    return math.pi * r ** 2\n", accepted=True)]
    items += [outcome(i, f"    return {i}\n", accepted=False) for i in range(1, 8)]
    pairs, unpaired = pair_examples(sides(items), max_pairs_per_context=4, dropped=Counter())
    assert len(pairs) == 4 and len({p.rejected for p in pairs}) == 4
    assert sorted(s.id for s in unpaired) == ["s5", "s6", "s7"]  # the accepted side was used, so not in KTO


def test_kto_weights_bring_the_weighted_ratio_into_trls_range() -> None:
    for n_desirable, n_undesirable in [(30, 70), (1, 99), (100, 20), (55, 45), (50, 60), (7, 7)]:
        d, u = kto_weights(n_desirable, n_undesirable)
        assert 1.0 <= round(d * n_desirable / (u * n_undesirable), 2) <= 1.33
        assert min(d, u) == 1.0
    assert kto_weights(30, 70) == (round(7 / 6 * 70 / 30, 4), 1.0)
    assert kto_weights(0, 10) == (1.0, 1.0)


def test_kto_weights_and_chat_rows_in_a_built_dataset(tmp_path: Path) -> None:
    # Edit outcomes come through the real Continue collector: two of alice's (one accepted), one of bob's.
    for who, outcomes in (("alice", [(1, True), (2, False)]), ("bob", [(3, True)])):
        write_lines(tmp_path / who / "dev_data" / "0.2.0" / "editOutcome.jsonl", [continue_event(
            "editOutcome", timestamp=(T0 + days(n / 10)).isoformat() + "Z", accepted=ok, prompt="Add a guard.",
            previousCode="v1", newCode=f"v1 + guard {n}", completion=f"v1 + guard {n}",
            filepath=f"file:///home/{who}/src/payments/ledger/x.py") for n, ok in outcomes])
    setup = write_config(tmp_path / "site", [
        {"kind": "continue", "path": str(tmp_path / who), "name": who, "developer": f"{who}@example.com"}
        for who in ("alice", "bob")], teams=[{"name": "payments", "members": ["alice@example.com", "bob@example.com"]}])
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    assert jobs.collect(store, cfg)["error"] is None
    rows = []
    for i in range(40):  # 10 spots, one suggestion each, a quarter accepted: no pairs, all KTO
        rows.append(tabby_suggestion(id=f"t{i}", shown_at=T0 + timedelta(hours=i), accepted=i % 4 == 0,
                                     filepath=f"lib/m{i}.py", prefix=f"def f{i}(x):\n",
                                     completion=f"    return x + {i}\n"))
    store_suggestions(store, rows)
    tokenizer = load_base_tokenizer(str(family_tokenizer(tmp_path / "tok", *QWEN)))
    cfg_ds = DatasetsConfig(min_train_rows=1, min_heldout_rows=1, heldout_fraction=0.1)
    build_datasets(store, team("payments"), cfg_ds, tokenizer, tmp_path / "team")
    manifest = json.loads((tmp_path / "team" / "manifest.json").read_text())
    kto = read_jsonl(tmp_path / "team" / "kto.jsonl")
    n_desirable = sum(r["label"] for r in kto)
    assert (manifest["kto"]["desirable"], manifest["kto"]["undesirable"]) == (n_desirable, len(kto) - n_desirable)
    weights, n_undesirable = manifest["kto"], len(kto) - n_desirable
    assert 0 < n_desirable < n_undesirable
    assert 1.0 <= weights["desirable_weight"] * n_desirable / (weights["undesirable_weight"] * n_undesirable) <= 4 / 3
    chat = read_jsonl(tmp_path / "team" / "chat.jsonl")
    # accepted edits only, oldest first; the rejected one (guard 2) is not a chat row
    assert [r["completion"][0]["content"] for r in chat] == ["```\nv1 + guard 1\n```", "```\nv1 + guard 3\n```"]
    assert chat[0]["prompt"] == [{"role": "user", "content": "Add a guard.\n\nledger/x.py:\n```\nv1\n```"}]
    assert [r["developer"] for r in chat] == ["alice@example.com", "bob@example.com"]
    build_datasets(store, dev("alice@example.com"), DatasetsConfig(min_dev_examples=1, min_train_rows=1,
                                                                   min_heldout_rows=1), tokenizer, tmp_path / "alice")
    store.close()
    alice_chat = read_jsonl(tmp_path / "alice" / "chat.jsonl")
    assert [r["completion"][0]["content"] for r in alice_chat] == ["```\nv1 + guard 1\n```"]




def test_the_build_holds_out_the_most_recent_pairs(tmp_path: Path) -> None:
    """What `build_datasets` itself splits: the most recent pairs go to heldout.jsonl, the rest to dpo.jsonl,
    one time cutoff between them and no pair in both."""
    setup = write_config(tmp_path / "site", [], teams=[{"name": "payments", "members": ["alice@example.com"]}])
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    rows = []
    for i in range(24):  # one spot a day: a suggestion rejected, then another one accepted at the same cursor
        spot = {"filepath": f"lib/m{i}.py", "prefix": f"def area_{i}(r):\n", "suffix": "\n"}
        rows.append(tabby_suggestion(id=f"no{i}", shown_at=T0 + days(i), accepted=False,
                                     completion=f"    return r * {i}\n", **spot))
        rows.append(tabby_suggestion(id=f"yes{i}", shown_at=T0 + days(i) + timedelta(minutes=1), accepted=True,
                                     completion=f"    return math.pi * r * r * {i}\n", **spot))
    store_suggestions(store, rows)
    tokenizer = load_base_tokenizer(str(family_tokenizer(tmp_path / "tok", *QWEN)))
    build_datasets(store, team("payments"), DatasetsConfig(min_train_rows=1, min_heldout_rows=1,
                                                           heldout_fraction=0.25), tokenizer, tmp_path / "out")
    store.close()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    train = read_jsonl(tmp_path / "out" / "dpo.jsonl")
    held = [r for r in read_jsonl(tmp_path / "out" / "heldout.jsonl") if r["kind"] == "pair"]
    assert len(train) + len(held) == 24 and len(held) >= 4 and len(train) >= 12
    cutoff = manifest["heldout_cutoff"]
    assert max(r["ts"] for r in train) < cutoff <= min(r["ts"] for r in held)
    key = [(r["prompt"], r["chosen"], r["rejected"]) for r in train]
    assert not set(key) & {(r["prompt"], r["chosen"], r["rejected"]) for r in held}
    assert all("area_" in r["prompt"] and r["chosen"].startswith("    return math.pi") for r in held)

"""A run directory: everything a training or evaluation child needs, and everything it leaves behind.

    runs/<run_id>/config.json      RunConfig (written by the cycle, read by the children)
                  data/            sft.jsonl, dpo.jsonl, kto.jsonl, chat.jsonl, heldout.jsonl, manifest.json,
                                   lines.json (LINE_INDEX: where each training row's line is, and its `ts`)
                  checkpoints/     <stage>/step-N/ and <stage>/done/ (resume after a crash or kill -9)
                  adapter/         the finished LoRA adapter (renamed into place when complete)
                  train.json       training metrics        progress.json   live step/loss/ETA
                  eval.json        evaluation report       train.log, eval.log

The children read only this directory (and the base model), never the store.

Dataset files (one JSON object per line, oldest first; `ts` is ISO-8601 UTC; every row has `id`,
`signal`, `developer`, `ts`). `prompt` is always a complete FIM prompt in the base tokenizer's own
tokens, and every completion / chosen / rejected ends with the tokenizer's end-of-middle token:
    sft.jsonl      {"prompt", "completion"}                      supervised FIM rows
    dpo.jsonl      {"prompt", "chosen", "rejected"}              preference pairs sharing one context
    kto.jsonl      {"prompt", "completion", "label": bool}       unpaired desirable / undesirable rows
    heldout.jsonl  {"kind": "fim", "prompt", "completion"}       held-out FIM rows (loss, generation)
                   {"kind": "pair", "prompt", "chosen", "rejected"}  held-out logged pairs (preference)
    manifest.json  scope, counts per split/signal, drops by reason, sha256, fim_family, max_row_tokens,
                   and for KTO "kto": {"desirable_weight", "undesirable_weight"}
A file with no rows may be absent; readers treat a missing file as empty.

Added keys (pipelines/datasets/build.py writes them; readers may ignore them):
    every row      "path": the file it comes from ("owner/name/path" for a suggestion mapped onto a repository)
    FIM rows       "order": "psm" or "spm". An SPM row's prompt is laid out suffix-first in the family's own
                   way (FimTokens.spm: StarCoder/StarCoder2 and CodeLlama only); the completion still
                   follows the prompt directly. held-out FIM rows are always "psm".
    dpo / pairs    "chosen_signal": where the chosen side came from ("kept", "accepted", "rewritten");
                   `signal` is the rejected side's ("rejected": shown and not accepted; "replaced": accepted,
                   then rewritten before commit, the chosen side being what replaced it)
    signals        FIM: "kept", "rewritten", "accepted" (no commit to check it against), "committed" (code
                   cut from commits); KTO also "rejected", "replaced", "deleted" (label false)
    chat.jsonl     {"prompt": [{"role": "user", "content"}], "completion": [{"role": "assistant", "content"}]}
                   TRL's conversational prompt-completion shape, from accepted Continue edit outcomes
                   (signal "edit"): the instruction and the code before, then the code after. A trainer may
                   skip it for a base model without a chat template.
    manifest.json  "files": rows per file and signal; "links": the scope's accepted suggestions by link
                   status; "kto" also holds "desirable"/"undesirable" row counts; "heldout_cutoff";
                   "accept_rate"; "seconds" per build stage; "token_counts" (how row lengths were checked)
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from pipelines.config import EvaluateConfig, TrainConfig
from pipelines.files import write_json_atomic


@dataclass(frozen=True)
class RunConfig:
    run_id: str
    scope: str
    base_model: str
    max_row_tokens: int
    train: TrainConfig
    evaluate: EvaluateConfig
    served_adapter: str | None  # the champion: what the scope is served when the run starts (gated against)
    init_adapter: str | None = None  # the adapter training starts from (warm start), or None for a fresh LoRA
    data_until: str | None = None  # rows up to this ts were seen by init_adapter: replay only; None = use all
    scores_dir: str | None = None  # row scores remembered across evaluations (pipelines/evaluate/scores.py)

    def write(self, run_dir: Path) -> None:
        write_json_atomic(run_dir / "config.json", asdict(self))

    @classmethod
    def read(cls, run_dir: Path) -> RunConfig:
        data = json.loads((run_dir / "config.json").read_text())
        train = {k: v for k, v in data.pop("train").items() if k in TrainConfig.__dataclass_fields__}
        train["target_modules"] = tuple(train["target_modules"])
        evaluate = {k: v for k, v in data.pop("evaluate").items() if k in EvaluateConfig.__dataclass_fields__}
        return cls(train=TrainConfig(**train), evaluate=EvaluateConfig(**evaluate), **data)


def new_run_id(scope: str) -> str:
    """Sortable and unique: "20261122-020000-team-payments-3f2a"."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{scope.replace(':', '-')}-{secrets.token_hex(2)}"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a dataset file; a missing file has none (the contract above)."""
    return [orjson.loads(line) for _, line in scan_lines(path)]


def scan_lines(path: Path, chunk_bytes: int = 16 << 20) -> Iterator[tuple[int, bytes]]:
    """Each row of a dataset file as (its byte offset, its JSON line), read `chunk_bytes` at a time; a missing
    file has none.

    Lines are split at b"\n" only: orjson writes U+2028 and U+0085 unescaped inside strings, and
    str.splitlines splits at them, so a row of JavaScript holding one failed to load. A chunk at a time, not
    the whole file: a 1M-suggestion dataset's kto.jsonl is 1.8 GB, and reading it whole and splitting it held
    it twice (bench/read_rows.py).
    """
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        # No larger than the file: a read allocates its whole size first (a 16 MB buffer for a 2 KB file
        # failed a run left 12 MB to train in, tests/test_train.py)
        chunk_bytes = max(1, min(chunk_bytes, os.fstat(f.fileno()).st_size))
        tail = b""
        at = 0  # the offset of `tail`
        while data := f.read(chunk_bytes):
            lines = (tail + data).split(b"\n")
            tail = lines.pop()  # a line the next chunk ends (or the file's last, without its b"\n")
            for line in lines:
                if line.strip():
                    yield at, line
                at += len(line) + 1
        if tail.strip():
            yield at, tail


# data/lines.json, written by the dataset build beside its files: {file: {"size", "mtime_ns", "offsets": [...],
# "lengths": [...], "ts": "ts\\nts..."}} for each training file, its lines in order. A warm-started run picks its
# rows from it instead of scanning every line for its `ts` (0.29-0.34 s against 0.07 s for the 141k training
# rows of a night at 100k stored suggestions, bench/nightly_growth.py; in proportion to the history). An entry
# counts only for the file as written: one rewritten or replaced since (another size or modification time) is
# scanned, and so is one the index does not name.
LINE_INDEX = "lines.json"
Lines = tuple[list[int], list[int], list[str]]  # each line's offset, length and `ts`, in file order


def new_lines() -> Lines:
    return [], [], []


def scan_index(path: Path) -> Lines:
    """`path`'s Lines, read from the file itself."""
    lines = new_lines()
    offsets, lengths, stamps = lines
    for at, line in scan_lines(path):
        offsets.append(at)
        lengths.append(len(line))
        stamps.append(line_ts(line))
    return lines


def write_line_index(data: Path, files: dict[str, Lines]) -> None:
    """data/lines.json for `files` (file name -> its Lines), already written in `data`."""
    index = {}
    for name, (offsets, lengths, stamps) in files.items():
        if any("\n" in t for t in stamps):
            continue  # cannot be joined: that file is scanned
        st = (data / name).stat()
        index[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "offsets": offsets, "lengths": lengths,
                       "ts": "\n".join(stamps)}
    tmp = data / f".{LINE_INDEX}.tmp"
    tmp.write_bytes(orjson.dumps(index))
    tmp.replace(data / LINE_INDEX)


def read_line_index(data: Path) -> dict[str, Lines]:
    """The entries of data/lines.json that still describe their file, by file name; none when it is absent or
    unreadable."""
    try:
        index = orjson.loads((data / LINE_INDEX).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    out = {}
    for name, entry in index.items() if isinstance(index, dict) else ():
        try:
            st = (data / name).stat()
            offsets, lengths = entry["offsets"], entry["lengths"]
            stamps = entry["ts"].split("\n") if entry["ts"] else []
            if (entry["size"], entry["mtime_ns"]) == (st.st_size, st.st_mtime_ns) and \
                    len(offsets) == len(lengths) == len(stamps):
                out[name] = (offsets, lengths, stamps)
        except (OSError, KeyError, TypeError, AttributeError):
            continue
    return out


def read_spans(path: Path, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes at (offset, length) `spans` of a file: the lines `scan_lines` found, read back one by one."""
    if not spans:
        return []
    with path.open("rb") as f:
        fd = f.fileno()
        return [os.pread(fd, n, at) for at, n in spans]


# `"ts":"` can only be a key and the opening of its string value: inside a JSON string every quote is escaped.
# The writers (pipelines/datasets) put `ts` before the only nested values (a chat row's messages), so the
# first match is the row's own.
_TS = re.compile(rb'"ts":"([^"\\]*)"')


def line_ts(line: bytes) -> str:
    """A row's `ts` read from its JSON line without parsing the row (a warm-started run parses only the rows
    it picks: 1k of 87k KTO rows on a 100k-suggestion night); the row is parsed when the value is escaped
    or not a string. A row without `ts` raises KeyError, as `select_rows` does."""
    found = _TS.search(line)
    return found.group(1).decode() if found else str(orjson.loads(line)["ts"])

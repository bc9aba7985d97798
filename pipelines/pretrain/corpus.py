"""The continued-pretraining corpus of a team: its repositories' files as of the held-out cutoff.

Which files: every file of the repositories the team commits to (and those its [[teams]] table names) as the
last stored commit before the cutoff left it (`Store.repo_files_at`): nothing from the held-out period, so the
gate's question stays "does it help with code written after it was trained?". The store's contents are
already scrubbed of secrets and excluded paths at ingest. Then the dataset builder's rules
(pipelines/datasets/quality.py): vendored, generated, lock, minified and binary files dropped, exact
duplicates once, near duplicates (MinHash over the whole file, whitespace collapsed, `near_dup_threshold`)
once. Written as data/cpt.jsonl, one file per line: {"repo", "path", "ts", "text"}.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from pipelines.datasets.quality import drop_exact_duplicates, exact_key, file_problem, near_duplicates, sketch
from pipelines.store.db import Store
from pipelines.store.records import RepoFile


@dataclass(frozen=True)
class CorpusReport:
    repos: list[str]
    cutoff: str  # files as of just before this time
    files: int
    chars: int
    dropped: dict[str, int]  # reason -> files
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_corpus(store: Store, repos: list[str], cutoff: datetime, near_dup_threshold: float,
                 out: Path) -> CorpusReport:
    """Write the files of `repos` as of `cutoff`, filtered and deduplicated, to `out` (JSON lines)."""
    dropped: Counter[str] = Counter()
    files: list[RepoFile] = []
    for f in store.repo_files_at(repos, cutoff):
        problem = "empty" if not f.content.strip() else file_problem(f.path, f.content)
        if problem is not None:
            dropped[problem] += 1
            continue
        files.append(f)
    files = drop_exact_duplicates(files, lambda f: exact_key(f.content), dropped)
    if len(files) > 1:
        sig = sketch([" ".join(f.content.split()) for f in files])
        dup = near_duplicates(sig, sig, near_dup_threshold)
        dropped["near_duplicate"] += int(dup.sum())
        files = [f for f, d in zip(files, dup, strict=True) if not d]
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("wb") as fh:
        for f in files:
            line = orjson.dumps({"repo": f.repo, "path": f.path, "ts": f.committed_at.isoformat(),
                                 "text": f.content}) + b"\n"
            digest.update(line)
            fh.write(line)
    tmp.replace(out)
    return CorpusReport(repos=repos, cutoff=cutoff.isoformat(), files=len(files),
                        chars=sum(len(f.content) for f in files),
                        dropped={k: n for k, n in sorted(dropped.items()) if n}, sha256=digest.hexdigest())

"""Per-row scores of the base model and of adapters, remembered from one night's evaluation to the next.

Every night scores three models on the newest held-out rows: the base, the served adapter and the candidate.
Two of the three did not change since the night before (the base never does; the served adapter only when a
candidate was promoted, and then it is that candidate, scored the night before), and the held-out set moves by
the night's new rows only: at 1,000 new suggestions a night on a 100k history, 90% of the scored rows were
scored the night before. So the evaluation keeps, per scope and per model, each row's numbers: the summed
log-likelihood of a FIM row's middle, both sides' of a pair, and a generated middle's exact match, edit
similarity and length. The next evaluation scores only the rows it does not find.

A row is keyed by the token ids it is scored on (prompt and completion as encoded, truncation included), so
a different tokenizer or `max_row_tokens` never meets a stale number; a generated row also by the end tokens
and `max_new_tokens`. A model is keyed by its weights: the base model's files (name, size, modification time)
and the adapter's weight file's digest, so the candidate's numbers are the served adapter's the night after
it is promoted (the registry copies the same bytes). The dtype and device are part of the key: bf16 on a GPU
and float32 on a CPU do not give the same numbers.

A cached number was computed in another batch than tonight's: rows are right-padded without a mask and
causal attention keeps pads out of every real token, so only the floating-point order of a matrix product
of a different width differs (within 1e-5 of the loss in the tests). A file holds only the rows its last
evaluation scored, so it stays the size of one held-out set; forgetting a developer removes them all
(pipelines/forget.py): the keys are digests of held-out rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from pipelines.files import write_json_atomic

log = logging.getLogger("devtune.evaluate")

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def row_key(*parts: Sequence[int] | int) -> str:
    """A digest of token id lists and numbers, in order."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        ids = [part] if isinstance(part, int) else part
        h.update(len(ids).to_bytes(4, "little"))
        for i in ids:
            h.update(int(i).to_bytes(4, "little", signed=True))
    return h.hexdigest()


def base_identity(base_model: str) -> str:
    """The base model's files as they are on disk: a local folder, or the Hugging Face cache's snapshot the
    model was loaded from (its files are links to blobs named by their content)."""
    folder = Path(base_model)
    if not folder.is_dir():
        try:
            from transformers.utils import cached_file

            found = cached_file(base_model, "config.json")
        except (OSError, ValueError):
            found = None
        if not found:
            return base_model
        folder = Path(found).parent
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return base_model + "".join(f"|{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def adapter_identity(adapter_dir: Path) -> str | None:
    """The digest of an adapter's weight file, or None when the folder holds none."""
    for name in ADAPTER_WEIGHTS:
        path = adapter_dir / name
        if path.is_file():
            h = hashlib.blake2b(digest_size=16)
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            return h.hexdigest()
    return None


def scope_dir(scores_dir: Path, scope: str) -> Path:
    return scores_dir / scope.replace(":", "-")


def forget_others(scores_dir: Path, scope: str, kept: Iterable[Path | None]) -> None:
    """Remove the scope's files other than `kept`."""
    keep = {p for p in kept if p is not None}
    folder = scope_dir(scores_dir, scope)
    for path in folder.glob("*.json") if folder.is_dir() else []:
        if path not in keep:
            path.unlink(missing_ok=True)


class RowScores:
    """One model's remembered row scores for one scope: `scores_dir/<scope>/<model key digest>.json`."""

    def __init__(self, scores_dir: Path | None, scope: str, model: str | None) -> None:
        self.path = None if scores_dir is None or model is None else (
            scope_dir(scores_dir, scope) / f"{hashlib.blake2b(model.encode(), digest_size=16).hexdigest()}.json")
        self.known: dict[str, list[float]] = {}
        self.used: dict[str, list[float]] = {}
        self.hits = 0
        if self.path is not None and self.path.is_file():
            try:
                self.known = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:  # a cache: start it again rather than fail the evaluation
                log.warning("evaluate: row scores %s unreadable (%s); scoring every row", self.path, e)

    def get(self, key: str) -> list[float] | None:
        values = self.known.get(key)
        if values is not None:
            self.hits += 1
            self.used[key] = values
        return values

    def put(self, key: str, values: Iterable[float]) -> None:
        self.used[key] = list(values)

    def save(self) -> None:
        """Keep exactly the rows this evaluation scored."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.used)

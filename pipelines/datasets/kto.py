"""KTO rows: single completions labelled desirable or undesirable, for everything DPO could not pair.

Desirable: kept, accepted (link unknown) and rewritten-to (committed) completions left without a rejected
partner in their context. Undesirable: rejected suggestions left without a chosen partner, accepted
suggestions that were rewritten (when the replacement could not be laid out as a middle, or the context
reached its pair cap) and accepted suggestions that were deleted before commit. The rows are the
unpaired `outcomes.Side`s themselves: `desirable` is the label.

The weights. Developers accept about 25-35% of suggestions, so undesirable rows outnumber desirable ones.
TRL's KTOTrainer wants desirable_weight x n_desirable / (undesirable_weight x n_undesirable) between 1 and
4/3 (Eq. 8 of the KTO paper; the trainer warns outside it). `kto_weights` leaves the larger side at 1.0 and
raises the other so the ratio lands at 7/6, the middle of that range, where the trainer's own check (on
values rounded to 2 decimals) cannot fall just outside it; both stay 1.0 when the counts are already in range.
"""

from __future__ import annotations

from typing import Any

from pipelines.datasets.outcomes import Side
from pipelines.tokens import FimTokens

TARGET_RATIO = 7 / 6  # desirable_weight * n_desirable / (undesirable_weight * n_undesirable)


def kto_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) bringing the weighted ratio into TRL's [1, 4/3] range."""
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if 1.0 <= ratio <= 4 / 3:
        return 1.0, 1.0
    if ratio < 1.0:
        return round(TARGET_RATIO / ratio, 4), 1.0
    return 1.0, round(ratio / TARGET_RATIO, 4)


def kto_row(s: Side, fim: FimTokens) -> dict[str, Any]:
    """An unpaired side as a KTO row: its completion, labelled desirable or not."""
    return {"id": s.id, "signal": s.signal, "developer": s.developer, "ts": s.ts.isoformat(), "path": s.path,
            "prompt": fim.psm(*s.context.texts()), "completion": s.text + fim.eos, "label": s.desirable}

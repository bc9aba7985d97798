"""How a generated middle is compared with the one the developer kept: exact match and edit similarity.

Edit similarity is 1 - Levenshtein(generated, kept) / max(len(generated), len(kept)) over characters, the
measure code-completion evaluations use (CodeXGLUE, CrossCodeEval): a middle right but for one identifier
scores near 1, exact match gives it 0. Exact match ignores trailing whitespace only (a generated middle
often stops before the final newline the kept one has). No torch here: pure functions, tested directly.
"""

from __future__ import annotations


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions) between two strings.

    Bit-parallel (Myers 1999, Hyyrö's formulation): one pass over `a` with a bit per character of `b`,
    so a 300-character middle takes ~300 big-integer steps instead of the 90,000 cells of the table.
    """
    if a == b:
        return 0
    if not a or not b:
        return len(a) or len(b)
    m = len(b)
    full, top = (1 << m) - 1, 1 << (m - 1)
    peq: dict[str, int] = {}
    for i, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    pv, mv, score = full, 0, m
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) ^ pv) | eq) & full
        ph = (mv | ~(xh | pv)) & full
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & full
        mh = (mh << 1) & full
        pv = (mh | ~(xv | ph)) & full
        mv = ph & xv
    return score


def edit_similarity(generated: str, kept: str) -> float:
    """1.0 for identical strings, 0.0 when nothing is shared."""
    longest = max(len(generated), len(kept))
    return 1.0 if longest == 0 else 1.0 - levenshtein(generated, kept) / longest


def exact_match(generated: str, kept: str) -> bool:
    return generated.rstrip() == kept.rstrip()

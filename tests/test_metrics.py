"""Exact match and edit similarity of a generated middle against the kept one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.evaluate.metrics import edit_similarity, exact_match, levenshtein


def table_distance(a: str, b: str) -> int:
    """The textbook dynamic-programming edit distance, to check the bit-parallel one against."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab x\n_(", max_size=40), st.text(alphabet="ab x\n_(", max_size=40))
def test_levenshtein_matches_the_table(a: str, b: str) -> None:
    assert levenshtein(a, b) == table_distance(a, b) == levenshtein(b, a)


def test_long_middles_cross_the_machine_word() -> None:
    a = "    return amount * rate  # " + "x" * 150
    b = "    return amount * fee  # " + "x" * 140 + "yy"
    assert levenshtein(a, b) == table_distance(a, b)


def test_edit_similarity_and_exact_match() -> None:
    assert edit_similarity("    return x * 2\n", "    return x * 2\n") == 1.0
    assert edit_similarity("", "") == 1.0 and edit_similarity("", "abc") == 0.0
    assert edit_similarity("    return x * 3\n", "    return x * 2\n") == 1 - 1 / 17
    assert exact_match("    return x\n", "    return x") and not exact_match("return x", "    return x")

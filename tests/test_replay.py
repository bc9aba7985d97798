"""Warm-started runs train on what their adapter has not seen, plus a fixed replay sample of the rest."""

from __future__ import annotations

from pipelines.train.replay import latest_ts, new_rows, select_rows


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

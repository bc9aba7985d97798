"""What a warm-started training run costs to read its rows: time and peak memory of `read_training_rows` on a
run folder's dataset, against reading each file whole and splitting it (the reader before, kept here as the
baseline), each in a fresh process, alternating.

    python bench/read_rows.py RUN_DIR [--new-share 0.01] [--reps 3]

RUN_DIR holds data/ (sft.jsonl, dpo.jsonl, kto.jsonl, chat.jsonl), e.g. a cycle's run folder or the data/ that
bench/dataset_build.py --measure leaves. The starting adapter's `data_until` is put where `--new-share` of
the rows are newer, as on a night.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def whole_files(run_dir: Path, data_until: str, share: float, seed: int) -> dict[str, int]:
    """The reader before: each file read whole, split at b"\\n", every line kept until the picked ones parse."""
    import orjson

    from pipelines.train.replay import select_indices
    from pipelines.train.rundir import line_ts

    picked = {}
    for name in ("sft", "chat", "dpo", "kto"):
        path = run_dir / "data" / f"{name}.jsonl"
        lines = [ln for ln in path.read_bytes().split(b"\n") if ln.strip()] if path.is_file() else []
        keep, _, _ = select_indices([line_ts(ln) for ln in lines], data_until, share, seed)
        picked[name] = len([orjson.loads(lines[i]) for i in keep])
    return picked


def one(run_dir: Path, how: str, data_until: str) -> dict[str, Any]:
    from pipelines.config import TrainConfig
    from pipelines.progress import peak_rss_mb
    from pipelines.train.train import read_training_rows

    cfg = TrainConfig()
    t = time.monotonic()
    if how == "whole":
        picked = whole_files(run_dir, data_until, cfg.replay_share, cfg.seed)
    else:
        rows = read_training_rows(run_dir, cfg, None, data_until)
        picked = {k: v["rows"] for k, v in rows.counts.items()}
    return {"seconds": time.monotonic() - t, "peak_mb": peak_rss_mb(),
            "picked": picked}


def boundary(run_dir: Path, share: float) -> tuple[str, int]:
    from pipelines.train.rundir import line_ts, scan_lines

    stamps = sorted(line_ts(line) for name in ("sft", "chat", "dpo", "kto")
                    for _, line in scan_lines(run_dir / "data" / f"{name}.jsonl"))
    return stamps[int(len(stamps) * (1 - share))], len(stamps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--new-share", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("HOW", "DATA_UNTIL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.run_dir, *args.child)))
        return 0
    data_until, total = boundary(args.run_dir, args.new_share)
    size = sum(p.stat().st_size for p in (args.run_dir / "data").glob("*.jsonl") if p.name != "heldout.jsonl")
    print(f"{total:,} training rows, {size / 2**20:,.0f} MB; data_until {data_until}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"whole": [], "chunked": []}
    for rep in range(args.reps):
        for how in (("whole", "chunked") if rep % 2 == 0 else ("chunked", "whole")):
            out = subprocess.run([sys.executable, __file__, str(args.run_dir), "--child", how, data_until],
                                 check=True, capture_output=True, text=True).stdout
            results[how].append(json.loads(out.strip().splitlines()[-1]))
            r = results[how][-1]
            print(f"  {how:8} {r['seconds']:6.2f} s  peak {r['peak_mb']:7,.0f} MB  rows {r['picked']}", flush=True)
    assert results["whole"][0]["picked"] == results["chunked"][0]["picked"], "the readers picked different rows"
    med = {how: sorted(r["seconds"] for r in rs)[len(rs) // 2] for how, rs in results.items()}
    peak = {how: sorted(r["peak_mb"] for r in rs)[len(rs) // 2] for how, rs in results.items()}
    print(f"median: whole files {med['whole']:.2f} s, {peak['whole']:,.0f} MB; chunked {med['chunked']:.2f} s, "
          f"{peak['chunked']:,.0f} MB; time ratio {med['chunked'] / med['whole']:.2f}x, "
          f"peak ratio {peak['chunked'] / peak['whole']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The scrubber on ordinary code: how often it fires where there is no secret (false positives), how fast it
is, and the same for detect-secrets (when installed: `pip install detect-secrets`) on the same files.

    python bench/scrub_fp.py --mb 40

The corpus is the installed packages' and the standard library's Python sources: ordinary code with
hashes, UUIDs, base64 test vectors and long identifiers, and no real credentials, so every hit is
counted as a false positive (the sample printed at the end is what to read to check that claim).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.ingest.scrub import find_secrets


def corpus(limit_mb: float) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    size = 0
    for root in (Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])):
        for path in sorted(root.rglob("*.py")):
            if "test" in path.parts or "tests" in path.parts:
                continue  # test suites plant fake keys on purpose
            text = path.read_text(encoding="utf-8", errors="replace")
            out.append((path, text))
            size += len(text)
            if size >= limit_mb * 1e6:
                return out
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mb", type=float, default=40.0)
    parser.add_argument("--detect-secrets-mb", type=float, default=2.0, help="detect-secrets is slow: less text")
    args = parser.parse_args()
    files = corpus(args.mb)
    mb = sum(len(t) for _, t in files) / 1e6
    lines = sum(t.count("\n") for _, t in files)
    kinds: Counter[str] = Counter()
    samples: list[str] = []
    started = time.monotonic()
    for path, text in files:
        for start, end, kind in find_secrets(text):
            kinds[kind] += 1
            if len(samples) < 25:
                line_start = text.rfind("\n", 0, start) + 1
                samples.append(f"{kind:18s} {path.name}: {text[line_start:text.find(chr(10), end)][:110]!r}")
    seconds = time.monotonic() - started
    hits = sum(kinds.values())
    print(f"devtune scrubber: {mb:.1f} MB, {len(files):,} files, {lines:,} lines in {seconds:.1f}s "
          f"({mb / seconds:.1f} MB/s)")
    print(f"  hits (all false positives): {hits:,} = {hits / lines * 1e4:.2f} per 10k lines, "
          f"{sum(1 for p, t in files if find_secrets(t)) / len(files):.2%} of files; by kind {dict(kinds)}")
    try:
        from detect_secrets import SecretsCollection
        from detect_secrets.settings import default_settings
    except ImportError:
        print("detect-secrets not installed: skipped")
    else:
        small: list[Path] = []
        size = 0
        for path, text in files:
            small.append(path)
            size += len(text)
            if size >= args.detect_secrets_mb * 1e6:
                break
        ds_lines = sum(files[i][1].count("\n") for i in range(len(small)))
        ours = sum(len(find_secrets(files[i][1])) for i in range(len(small)))
        with default_settings():  # every plugin, with its default filters, as `detect-secrets scan` runs
            collection = SecretsCollection()
            started = time.monotonic()
            for path in small:
                collection.scan_file(str(path))
            ds_seconds = time.monotonic() - started
        ds_hits = Counter(s.type for _, s in collection)
        print(f"detect-secrets (scan_file, default settings): {size / 1e6:.1f} MB, {ds_lines:,} lines in "
              f"{ds_seconds:.1f}s ({size / 1e6 / ds_seconds:.2f} MB/s)")
        print(f"  hits: {sum(ds_hits.values()):,} = {sum(ds_hits.values()) / ds_lines * 1e4:.2f} per 10k lines "
              f"(devtune on the same files: {ours} = {ours / ds_lines * 1e4:.2f}); by type {dict(ds_hits)}")
    print("sample of devtune hits:")
    for s in samples:
        print("  " + s)


if __name__ == "__main__":
    main()

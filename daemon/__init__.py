"""The service and the CLI: configuration files, schedules, the API, the gateway, the dashboard."""

import os

# DuckDB allocates through its own jemalloc, which keeps the pages a job freed for reuse and purges them only
# when it allocates again, so an idle service held ~30 MB of its last collect for hours; glibc's malloc_trim
# does not reach them. With a background thread purging what has been free for a second, an in-process
# collect of 1,000 events settles at 171 MB two seconds later instead of 195 (purging at once: 165 MB, but
# ingest 10-15% slower; with this setting 7,840-7,874 against 7,891-7,962 events/s, within the noise).
# It must be set before anything imports duckdb; a value already in the environment wins.
os.environ.setdefault("DUCKDB_JE_MALLOC_CONF", "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0")

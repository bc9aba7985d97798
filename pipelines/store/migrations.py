"""Every schema change, in order: named migrations that `Store.migrate` applies once each and records in
`schema_migrations`. Applied migrations are history: never edit one, add the next.

Names by area, so parallel work never collides: 0003-0009 collectors and ingest, 0010-0019 datasets,
0020-0029 training and registry, 0030-0039 publishing and serving, 0040-0049 online measurement.
The columns ingest writes are declared once more, as row classes, in schema.py; tests/test_store.py checks
that the two agree.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_initial", """
        CREATE TABLE suggestions (
            id VARCHAR PRIMARY KEY,          -- the writer's id: Continue completionId, Tabby completion_id
            source VARCHAR NOT NULL,         -- [[sources]] name it was first collected from
            source_kind VARCHAR NOT NULL,    -- continue | tabby
            event_kind VARCHAR NOT NULL,     -- autocomplete | ...
            shown_at TIMESTAMP NOT NULL,     -- UTC
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            repo VARCHAR,                    -- owner/name, lower case
            filepath VARCHAR NOT NULL,
            language VARCHAR NOT NULL,
            accepted BOOLEAN NOT NULL,
            partial BOOLEAN NOT NULL,
            prefix VARCHAR,                  -- raw editor prefix (NULL when it could not be recovered)
            prefix_compiled VARCHAR,         -- the prefix as logged
            prefix_recovery VARCHAR NOT NULL,
            suffix VARCHAR,
            completion VARCHAR,
            model VARCHAR,
            ingested_at TIMESTAMP NOT NULL
        );
        CREATE TABLE commits (
            sha VARCHAR PRIMARY KEY,
            repo VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            parents VARCHAR[] NOT NULL,
            author_name VARCHAR,             -- NULL for an opted-out author (only the sha and time are kept)
            author_email VARCHAR,
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            authored_at TIMESTAMP NOT NULL,
            committed_at TIMESTAMP NOT NULL,
            message VARCHAR,
            opted_out BOOLEAN NOT NULL,
            ingested_at TIMESTAMP NOT NULL
        );
        CREATE TABLE commit_files (
            sha VARCHAR NOT NULL,
            path VARCHAR NOT NULL,
            status VARCHAR NOT NULL,          -- A, M, D, T
            blob VARCHAR,                     -- NULL when deleted or when the content was not kept
            added INTEGER[][] NOT NULL,       -- [[first, last], ...] 1-based line ranges the commit added
            diff VARCHAR NOT NULL,
            PRIMARY KEY (sha, path)
        );
        CREATE TABLE blobs (
            blob VARCHAR PRIMARY KEY,         -- git blob sha of the original; content is scrubbed
            content VARCHAR NOT NULL
        );
        CREATE TABLE cursors (
            source VARCHAR NOT NULL,
            stream VARCHAR NOT NULL,
            "offset" BIGINT NOT NULL,
            head_sha1 VARCHAR NOT NULL,
            head_len INTEGER NOT NULL,
            sha VARCHAR NOT NULL,
            updated_at TIMESTAMP NOT NULL,
            PRIMARY KEY (source, stream)
        );
        CREATE TABLE quarantine (
            source VARCHAR NOT NULL,
            stream VARCHAR NOT NULL,
            "offset" BIGINT NOT NULL,
            length BIGINT NOT NULL,
            line_sha1 VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            excerpt VARCHAR NOT NULL,         -- scrubbed
            quarantined_at TIMESTAMP NOT NULL,
            PRIMARY KEY (source, stream, "offset", line_sha1)
        );
        CREATE TABLE drops (                  -- events not stored, by reason (counted once per batch)
            source VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            count BIGINT NOT NULL,
            PRIMARY KEY (source, reason)
        );
        CREATE TABLE scrubs (                 -- secrets replaced before storage, by kind
            kind VARCHAR PRIMARY KEY,
            count BIGINT NOT NULL
        );
        CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY,
            scope VARCHAR NOT NULL,
            status VARCHAR NOT NULL,          -- running | succeeded | failed | skipped
            stage VARCHAR NOT NULL,           -- the stage it is in or stopped at
            started_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP,
            summary VARCHAR NOT NULL,         -- JSON: counts, timings, metrics, gate decision
            error VARCHAR
        );
    """),
    # Continue Edit-mode and Next Edit outcomes (FORMATS.md §1.3): an accepted or rejected rewrite of a
    # region, the signal for chat-format SFT rows and edit preference pairs.
    ("0002_edit_outcomes", """
        CREATE TABLE edit_outcomes (
            id VARCHAR PRIMARY KEY,           -- nextEditOutcome: completionId; editOutcome: sha1 of its content
            source VARCHAR NOT NULL,
            source_kind VARCHAR NOT NULL,     -- continue
            event_kind VARCHAR NOT NULL,      -- editOutcome | nextEditOutcome
            decided_at TIMESTAMP NOT NULL,    -- UTC
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            repo VARCHAR,
            filepath VARCHAR NOT NULL,
            accepted BOOLEAN NOT NULL,
            instruction VARCHAR,              -- editOutcome: the user's instruction; nextEdit: NULL
            before_text VARCHAR,              -- editOutcome: previousCode; nextEdit: originalEditableRange
            after_text VARCHAR,               -- editOutcome: newCode; nextEdit: completion
            model VARCHAR,
            ingested_at TIMESTAMP NOT NULL
        );
    """),
    ("0003_collectors", """
        -- Continue chat, edit and tool events that carry no accept flag on code (FORMATS.md §1.3).
        CREATE TABLE interactions (
            id VARCHAR PRIMARY KEY,           -- toolUsage: toolCallId; else sha1 of the content
            source VARCHAR NOT NULL,
            source_kind VARCHAR NOT NULL,     -- continue
            event_kind VARCHAR NOT NULL,      -- chatFeedback|chatInteraction|editInteraction|toolUsage|quickEdit
            occurred_at TIMESTAMP NOT NULL,   -- UTC
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            filepath VARCHAR,
            model VARCHAR,
            session_id VARCHAR,
            prompt VARCHAR,
            completion VARCHAR,
            label BOOLEAN,                    -- chatFeedback: thumbs up; toolUsage: the call was approved
            detail VARCHAR,                   -- JSON: the kind's other fields (tool name and arguments, diffs, ...)
            ingested_at TIMESTAMP NOT NULL
        );
        -- Tabby logs a completion and its view/select/dismiss lines separately, possibly in different day
        -- files; both are kept, and `suggestions` rows are derived from them (Store.link_tabby).
        CREATE TABLE tabby_completions (
            id VARCHAR PRIMARY KEY,           -- completion_id
            source VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL,
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            repo VARCHAR,
            filepath VARCHAR NOT NULL,
            language VARCHAR NOT NULL,
            prefix VARCHAR,
            suffix VARCHAR,
            choices VARCHAR[] NOT NULL,
            ingested_at TIMESTAMP NOT NULL
        );
        CREATE TABLE tabby_actions (
            id VARCHAR PRIMARY KEY,           -- sha1 of the event
            completion_id VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,            -- view | select | dismiss
            acted_at TIMESTAMP NOT NULL,
            choice_index INTEGER NOT NULL,
            line_select BOOLEAN NOT NULL      -- a select of kind "line": a partial accept
        );
        -- Counters become keyed rows, so a batch stored twice (a replaced file re-read, a harvest resumed,
        -- one event arriving by file and by HTTP) is counted once.
        DROP TABLE drops;
        CREATE TABLE drops (                  -- events not stored, by reason
            source VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,          -- opted_out | excluded_path | opted_out_commit
            key VARCHAR NOT NULL,             -- sha1 of the dropped event's own key
            PRIMARY KEY (source, reason, key)
        );
        DROP TABLE scrubs;
        CREATE TABLE scrubs (                 -- secrets replaced before storage
            target VARCHAR NOT NULL,          -- the table the scrubbed row went to
            key VARCHAR NOT NULL,             -- that row's key
            kind VARCHAR NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (target, key, kind)
        );
        CREATE TABLE identities (             -- identities that decided an event's developer
            identity VARCHAR NOT NULL,
            source_kind VARCHAR NOT NULL,     -- continue | tabby | git
            developer VARCHAR NOT NULL,       -- what it resolved to when last seen
            mapped BOOLEAN NOT NULL,          -- named by the config ([[developers]], [[teams]], a source's developer)
            PRIMARY KEY (identity, source_kind)
        );
    """),
    # How each source's last collects went: a source that fails is reported and retried with back-off while
    # the others are collected (daemon/jobs.py).
    ("0004_source_health", """
        CREATE TABLE source_health (
            source VARCHAR PRIMARY KEY,
            failures INTEGER NOT NULL,        -- failed collects since the last one that succeeded
            last_error VARCHAR,               -- one line: what failed and why
            failed_at TIMESTAMP,              -- the last failure
            ok_at TIMESTAMP                   -- the last collect that succeeded
        );
    """),
    # Forgetting a developer (pipelines/forget.py): keyed hashes of their identities, so later collects store
    # nothing of theirs; the work a forget left for after its transaction (files), so a kill is finished later;
    # the adapters that saw their rows, retrained without them by the next cycle. Tabby actions get their
    # developer, so they can be removed with the person and not only with their completion.
    ("0005_forget", """
        CREATE TABLE tombstones (
            hash VARCHAR PRIMARY KEY,         -- HMAC-SHA256 of a lower-cased identity, keyed by <state_dir>/forget.key
            forgotten_at TIMESTAMP NOT NULL
        );
        CREATE TABLE forget_jobs (
            id VARCHAR PRIMARY KEY,
            created_at TIMESTAMP NOT NULL,
            done_at TIMESTAMP,
            plan VARCHAR NOT NULL             -- JSON: team runs to purge, counts; never the person's ids
        );
        CREATE TABLE retrain_marks (
            scope VARCHAR NOT NULL,
            version VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            marked_at TIMESTAMP NOT NULL,
            PRIMARY KEY (scope, version)
        );
        ALTER TABLE tabby_actions ADD COLUMN developer VARCHAR;
        UPDATE tabby_actions SET developer = c.developer FROM tabby_completions c WHERE c.id = completion_id;
    """),
    # What became of each accepted suggestion in its developer's later commits (pipelines/datasets/link.py): the
    # evidence a dataset build reads instead of re-reading history, and what `kept`/`rewritten` counts rest on.
    ("0010_suggestion_links", """
        CREATE TABLE suggestion_links (
            suggestion_id VARCHAR PRIMARY KEY,
            status VARCHAR NOT NULL,          -- kept | rewritten | deleted | unknown
            reason VARCHAR NOT NULL,          -- how it was decided, e.g. exact, similar, no_commit_in_window
            repo VARCHAR,                     -- the committed file the suggestion's file maps to
            path VARCHAR,
            sha VARCHAR,                      -- the commit that decided it
            line INTEGER,                     -- 1-based line of the matched (or replacing) text in that file
            similarity DOUBLE,                -- 0-1, suggestion vs the committed text at its place, whitespace ignored
            committed_text VARCHAR,           -- rewritten: what replaced it, as a middle for the logged prefix/suffix
            window_closes_at TIMESTAMP NOT NULL,
            linked_at TIMESTAMP NOT NULL
        );
    """),
    # A run interrupted in training (kill -9, service stop, timeout) is resumed by a later cycle from its
    # checkpoint, in the same run directory; `attempts` counts how often it was started, so a run that
    # fails the same way every time is given up after [train] resume_attempts.
    ("0020_run_attempts", """
        ALTER TABLE runs ADD COLUMN attempts INTEGER DEFAULT 1;
    """),
    # Every completion request the serving gateway answered, collected from its request log
    # (collectors/gateway_log.py): which version served whom and when, for acceptance per version. No code.
    ("0030_gateway_requests", """
        CREATE TABLE gateway_requests (
            id VARCHAR PRIMARY KEY,           -- the completion id the gateway answered with
            received_at TIMESTAMP NOT NULL,   -- UTC, milliseconds: when the request arrived
            developer VARCHAR NOT NULL,       -- the caller's token's owner (canonical id)
            team VARCHAR NOT NULL,
            scope VARCHAR,                    -- what answered: team:NAME | dev:ID; NULL = the base model
            version VARCHAR,                  -- vNNNN; NULL = the base model
            served_name VARCHAR,              -- the version's never-reused name on the backend
            model VARCHAR NOT NULL,           -- the name the editor asked for
            backend VARCHAR NOT NULL,         -- builtin | vllm
            stream BOOLEAN NOT NULL,
            status INTEGER NOT NULL,          -- the HTTP status answered
            latency_ms DOUBLE NOT NULL,
            first_token_ms DOUBLE,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            finish_reason VARCHAR,            -- stop | length | cancelled | error
            error VARCHAR,
            ingested_at TIMESTAMP NOT NULL
        );
    """),
    # Field measurement (pipelines/online/): the version that served each suggestion, and how that was decided.
    ("0040_online", """
        CREATE TABLE suggestion_served (
            suggestion_id VARCHAR PRIMARY KEY,
            scope VARCHAR,                    -- team:NAME | dev:ID | base; NULL when unknown
            version VARCHAR,                  -- vNNNN; NULL for the base model or unknown
            served_by VARCHAR NOT NULL,       -- gateway | timeline | unknown
            attributed_at TIMESTAMP NOT NULL
        );
        CREATE TABLE online_state (           -- small facts the online passes keep between runs
            key VARCHAR PRIMARY KEY,
            value VARCHAR NOT NULL
        );
    """),
    # Token counts of dataset rows (pipelines/datasets/quality.py, TokenCounts): a build tokenizes only the rows
    # no earlier build of the same tokenizer counted, so a night's build does not re-tokenize the whole history
    # (27 of 30 s of a 10k-suggestion build went to tokenizing; bench/nightly_growth.py). Hashes, never texts.
    ("0050_token_counts", """
        CREATE TABLE token_counts (
            tokenizer VARCHAR NOT NULL,       -- BaseTokenizer.fingerprint(): the tokenizer's serialised form, hashed
            text_hash BLOB NOT NULL,          -- blake2b-128 of the rendered row text
            tokens INTEGER NOT NULL
        );
    """),
    # A Continue prefix is logged after the template's header (FORMATS.md 1.5), so prefix_compiled held the raw
    # prefix a second time: ~40% of a suggestion's stored text. New rows whose logged prefix ends with the raw
    # one keep only the header (the logged prefix is prefix_header || prefix, prefix_compiled NULL). Measured with
    # bench/ingest_continue.py: 200k events, a 235 MB store instead of 360 MB; 1M events, 1.15 GB instead of 2.3 GB
    # and the collect in 115-132 s instead of 232-237 s (half the WAL, so half the checkpoints). Older rows keep
    # prefix_compiled; coalesce(prefix_compiled, prefix_header || prefix) reads either.
    ("0060_prefix_header", """
        ALTER TABLE suggestions ADD COLUMN prefix_header VARCHAR;   -- NULL, or what the template put before `prefix`
    """),
]

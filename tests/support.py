"""Helpers for the tests: real git repositories, real Continue logs, configs and the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import git

from daemon.config import render_config

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 10, 1, 9, 0, 0)


@dataclass
class CommitSpec:
    files: dict[str, str | bytes | None]  # path -> new content (None deletes)
    author: tuple[str, str] = ("Alice", "alice@example.com")
    when: datetime = T0
    message: str = "change"


def make_repo(path: Path, commits: list[CommitSpec],
              origin: str | None = "git@github.com:acme/payments.git") -> git.Repo:
    path.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(path, initial_branch="main")
    if origin:
        repo.git.remote("add", "origin", origin)
    for spec in commits:
        commit(repo, spec)
    return repo


def commit(repo: git.Repo, spec: CommitSpec) -> str:
    root = Path(repo.working_tree_dir or ".")
    for rel, content in spec.files.items():
        target = root / rel
        if content is None:
            repo.git.rm("-q", rel)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        repo.git.add(rel)
    stamp = spec.when.strftime("%Y-%m-%dT%H:%M:%S+0000")
    env = {"GIT_AUTHOR_NAME": spec.author[0], "GIT_AUTHOR_EMAIL": spec.author[1], "GIT_AUTHOR_DATE": stamp,
           "GIT_COMMITTER_NAME": spec.author[0], "GIT_COMMITTER_EMAIL": spec.author[1], "GIT_COMMITTER_DATE": stamp}
    repo.git.commit("-q", "--allow-empty", "--no-verify", "-m", spec.message, env=env)
    return repo.head.commit.hexsha


def merge(repo: git.Repo, branch: str, when: datetime, author: tuple[str, str] = ("Alice", "alice@example.com")) -> str:
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S+0000")
    env = {"GIT_AUTHOR_NAME": author[0], "GIT_AUTHOR_EMAIL": author[1], "GIT_AUTHOR_DATE": stamp,
           "GIT_COMMITTER_NAME": author[0], "GIT_COMMITTER_EMAIL": author[1], "GIT_COMMITTER_DATE": stamp}
    repo.git.merge("--no-ff", "-q", "-m", f"Merge {branch}", branch, env=env)
    return repo.head.commit.hexsha


def autocomplete_event(**overrides: Any) -> dict[str, Any]:
    """A Continue 0.2.0 autocomplete line as Continue writes it (FORMATS.md §1.3)."""
    event: dict[str, Any] = {
        "eventName": "autocomplete", "schema": "0.2.0", "timestamp": "2026-10-01T09:00:00.000Z", "userId": "",
        "userAgent": "Visual Studio Code/1.105.1 (Continue/1.2.10)", "selectedProfileId": "local",
        "disable": False, "maxPromptTokens": 1024, "debounceDelay": 350, "maxSuffixPercentage": 0.2,
        "prefixPercentage": 0.3, "transform": True, "multilineCompletions": "auto",
        "slidingWindowPrefixPercentage": 0.75, "slidingWindowSize": 500, "useCache": True, "onlyMyCode": True,
        "useRecentlyEdited": True, "accepted": True, "time": 420,
        "prefix": "def add(a, b):\n", "suffix": "\n",
        "prompt": "<|fim_prefix|>def add(a, b):\n<|fim_suffix|>\n<|fim_middle|>",
        "completion": "    return a + b\n", "modelProvider": "ollama", "modelName": "qwen2.5-coder:1.5b-base",
        "cacheHit": False, "filepath": "file:///home/alice/src/payments/ledger/math.py",
        "gitRepo": "git@github.com:acme/payments", "completionId": str(uuid.uuid4()), "uniqueId": "ab" * 32,
    }
    event.update(overrides)
    return event


BIG_BACKLOG_TOKEN = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A"


def big_backlog(n: int) -> list[Any]:
    """`n` Continue lines of 4.5 KB each (15,500 are 69 MB: over the size that takes scrub workers,
    pipelines/ingest/parallel.py), a planted token in every thousandth completion."""
    body = "".join(f"def step_{i}(x):\n    return x + {i}\n\n" for i in range(150))
    return [autocomplete_event(completionId=f"big-{i:05d}", uniqueId="alice-id", prefix=body + f"# {i}\n",
                               completion=f'    API_TOKEN = "{BIG_BACKLOG_TOKEN}"\n' if i % 1000 == 0 else "    pass\n")
            for i in range(n)]


def continue_log(folder: Path, lines: list[dict[str, Any] | str | bytes], schema: str = "0.2.0",
                 append: bool = False) -> Path:
    """Write (or append) autocomplete lines under folder/dev_data/<schema>/autocomplete.jsonl."""
    return write_lines(folder / "dev_data" / schema / "autocomplete.jsonl", lines, append)


@dataclass
class Setup:
    """A config file on disk with its sources."""

    config: Path
    state_dir: Path
    sources: list[dict[str, Any]] = field(default_factory=list)


def write_config(folder: Path, sources: list[dict[str, Any]], teams: list[dict[str, Any]] | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 developers: list[dict[str, Any]] | None = None) -> Setup:
    folder.mkdir(parents=True, exist_ok=True)
    merged: dict[str, dict[str, Any]] = {"": {"state_dir": "state"}, "api": {"port": 0, "lock_timeout_s": 2.0}}
    for section, values in (overrides or {}).items():
        merged[section] = {**merged.get(section, {}), **values}
    path = folder / "config.toml"
    path.write_text(render_config(merged, sources=sources, teams=teams, developers=developers))
    return Setup(config=path, state_dir=folder / "state", sources=sources)


def collect_site(config: Path) -> tuple[dict[str, Any], Path]:
    """Collect every source of a config into its store in this process: (collect result + "status", store)."""
    from daemon import jobs
    from daemon.config import load_config
    from pipelines.store.db import Store

    cfg = load_config(config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        return {**jobs.collect(store, cfg), "status": jobs.status(store, cfg)}, store.path
    finally:
        store.close()


def run_devtune(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `devtune` entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


def devtune_json(*args: str, **kw: Any) -> Any:
    result = run_devtune(*args, **kw)
    assert result.returncode == 0, f"devtune {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def table_rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
        clock = ("ingested_at", "quarantined_at", "updated_at", "ok_at", "failed_at", "attributed_at")  # wall clocks
        order = ", ".join(f'"{c}"' for c in cols if c not in clock)
        return con.execute(f"SELECT {order} FROM {table} ORDER BY {order}").fetchall()
    finally:
        con.close()


def all_text(db: Path) -> str:
    """Every text value in every table of a store, joined: what a secret scan must not find anything in."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = []
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            for (col, typ) in con.execute(f"SELECT column_name, data_type FROM information_schema.columns "
                                          f"WHERE table_name = '{table}'").fetchall():
                if "VARCHAR" in typ or "[]" in typ:
                    out += [str(v) for (v,) in con.execute(f'SELECT "{col}" FROM {table}').fetchall()]
        return "\n".join(out)
    finally:
        con.close()


def wait_until(check: Any, timeout: float = 30, step: float = 0.3) -> Any:
    """`check()`'s first truthy value, polled every `step` seconds; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def process_running(pid: int) -> bool:
    """Whether `pid` still runs: it exists and is not a zombie left for its parent or init to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def days(n: float) -> timedelta:
    return timedelta(days=n)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None, microsecond=0)


def family_tokenizer(folder: Path, specials: list[str], eos: str) -> Path:
    """A small byte-level BPE tokenizer with one model family's special tokens, saved as a base model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[eos, *specials], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return folder


QWEN = (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"], "<|endoftext|>")
STARCODER = (["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], "<|endoftext|>")


def tabby_suggestion(**overrides: Any) -> dict[str, Any]:
    """A suggestions row as the Tabby collector stores it: a repo-relative path, raw editor prefix/suffix."""
    row: dict[str, Any] = {
        "id": f"cmpl-{uuid.uuid4()}", "source": "tabby", "source_kind": "tabby", "event_kind": "completion",
        "shown_at": T0, "developer": "alice@example.com", "team": "payments", "repo": "acme/payments",
        "filepath": "ledger/math.py", "language": "python", "accepted": True, "partial": False,
        "prefix": "def f(x):\n", "prefix_compiled": "def f(x):\n", "prefix_recovery": "raw", "suffix": "",
        "completion": "    return x\n", "model": "tabby", "ingested_at": T0,
    }
    row.update(overrides)
    return row


def store_suggestions(store: Any, rows: list[dict[str, Any]]) -> None:
    """Insert suggestion rows into a real store (for sources whose collector is not part of this tree)."""
    from collectors.base import Cursor
    from pipelines.store.db import Rows
    from pipelines.store.schema import SuggestionRow

    batch = Rows()
    for row in rows:
        batch.add(SuggestionRow(**row))
    store.apply_batch("tabby", batch, Cursor(stream="events"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


# -- Continue events other than autocomplete (FORMATS.md §1.3) -----------------------------------------------

BASE = {"timestamp": "2026-10-01T09:05:00.000Z", "userId": "", "userAgent": "Visual Studio Code/1.105.1 "
        "(Continue/1.2.10)", "selectedProfileId": "local", "schema": "0.2.0"}


def continue_event(name: str, **overrides: Any) -> dict[str, Any]:
    """A Continue 0.2.0 line of event `name` as Continue writes it."""
    uri = "file:///home/alice/src/payments/ledger/math.py"
    bodies: dict[str, dict[str, Any]] = {
        "editOutcome": {"prompt": "add a docstring", "completion": "def f():\n    \"\"\"F.\"\"\"\n",
                        "modelName": "Claude Sonnet 4", "modelTitle": "Claude Sonnet 4", "modelProvider": "anthropic",
                        "accepted": True, "previousCode": "def f():\n    pass\n",
                        "newCode": "def f():\n    \"\"\"F.\"\"\"\n", "previousCodeLines": 2, "newCodeLines": 2,
                        "lineChange": 0, "filepath": uri},
        "nextEditOutcome": {"timestamp": 1790000000000, "elapsed": 300, "completionOptions": {},
                            "completionId": str(uuid.uuid4()), "gitRepo": "acme/payments", "uniqueId": "ab" * 32,
                            "fileUri": uri, "workspaceDirUri": "file:///home/alice/src/payments",
                            "prompt": "<edit>", "userEdits": "", "userExcerpts": "",
                            "originalEditableRange": "x = 1\n", "completion": "x = 2\n",
                            "cursorPosition": {"line": 1, "character": 0}, "accepted": True,
                            "modelProvider": "ollama", "modelName": "instinct"},
        "chatFeedback": {"prompt": "<user>\nwhy?", "completion": "because", "modelProvider": "ollama",
                         "modelName": "qwen", "modelTitle": "Qwen", "feedback": True, "sessionId": "s-1"},
        "chatInteraction": {"prompt": "<user>\nhi", "completion": "hello", "modelName": "qwen", "modelTitle": "Qwen",
                            "modelProvider": "ollama", "sessionId": "s-1", "tools": ["read_file"],
                            "rules": [{"id": "r1"}]},
        "editInteraction": {"prompt": "rename x", "completion": "y = 1\n", "modelName": "qwen", "modelTitle": "Qwen",
                            "modelProvider": "ollama", "filepath": uri},
        "toolUsage": {"toolCallId": str(uuid.uuid4()), "functionName": "run_terminal_command",
                      "functionParams": {"type": "object"}, "toolCallArgs": "{\"command\": \"ls\"}",
                      "accepted": True, "succeeded": True, "output": [{"name": "out", "content": "a.py"}]},
    }
    event: dict[str, Any] = {"eventName": name, **BASE, **bodies[name]}
    event.update(overrides)
    return event


def write_lines(path: Path, lines: list[dict[str, Any] | str | bytes], append: bool = False) -> Path:
    """Write (or append) JSON Lines: dicts compact, str as given, bytes raw (no newline added)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = []  # joined once: adding to one bytes object copied it whole each time (minutes for 64 MB)
    for line in lines:
        if isinstance(line, dict):
            data.append(json.dumps(line, separators=(",", ":")).encode() + b"\n")
        elif isinstance(line, str):
            data.append(line.encode() + b"\n")
        else:
            data.append(line)
    with path.open("ab" if append else "wb") as f:
        f.write(b"".join(data))
    return path


# -- Tabby events (FORMATS.md §2.2) -------------------------------------------------------------------------

def tabby_completion(cid: str, ts_ms: int, user: str | None = "tabby-u1", prefix: str = "def add(a, b):\n",
                     text: str = "    return a + b\n", filepath: str = "ledger/math.py",
                     legacy: bool = False) -> dict[str, Any]:
    """A Tabby `completion` line: the current shape, or the pre-v0.11 one (user inside the event)."""
    body: dict[str, Any] = {
        "completion_id": cid, "language": "python",
        "prompt": f"<|fim_prefix|>{prefix}<|fim_suffix|>\n<|fim_middle|>",
        "segments": {"prefix": prefix, "suffix": "\n", "git_url": "git@github.com:acme/payments.git",
                     "filepath": filepath},
        "choices": [{"index": 0, "text": text}], "user_agent": "Node.js/20 tabby-agent/1.7 vscode/1.9",
    }
    if legacy:
        body["user"] = user
        del body["user_agent"]
        return {"ts": ts_ms, "event": {"completion": body}}
    return {"user": user, "ts": ts_ms, "event": {"completion": body}}


def tabby_action(kind: str, cid: str, ts_ms: int, user: str | None = "tabby-u1", line: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"completion_id": cid, "choice_index": 0}
    if kind in ("select", "dismiss"):
        body["view_id"] = f"view-{cid[5:]}-at-{ts_ms - 900}"
        body["elapsed"] = 900
    if line:
        body["kind"] = "line"
    return {"user": user, "ts": ts_ms, "event": {kind: body}}


def day_ms(day: str, seconds: float = 0) -> int:
    """Epoch ms of `seconds` after UTC midnight of `day` ("2026-10-01")."""
    return int((datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() + seconds) * 1000)


@contextlib.contextmanager
def local_ray_head(cpus: int) -> Iterator[str]:
    """A Ray head on 127.0.0.1 with its own free ports and temp dir; yields its Jobs API address.

    `ray start --block` keeps the head's processes in one process group, which is ended at the exit (never
    `ray stop`: it ends every Ray on the machine, other users' too). Logical `cpus` may exceed the cores: a
    job reserves them, it does not pin them. The object store is kept at 100 MB: nothing here uses it."""
    from ray.job_submission import JobSubmissionClient

    socks = [socket.socket() for _ in range(9)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    temp = tempfile.mkdtemp(prefix="dt-ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports[0]}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}", f"--ray-client-server-port={ports[2]}",
         f"--dashboard-agent-grpc-port={ports[3]}", f"--dashboard-agent-listen-port={ports[4]}",
         f"--runtime-env-agent-port={ports[5]}", f"--metrics-export-port={ports[6]}",
         f"--node-manager-port={ports[7]}", f"--object-manager-port={ports[8]}", f"--num-cpus={cpus}",
         "--num-gpus=0", "--object-store-memory=100000000", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{ports[1]}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"ray start exited with {proc.returncode}:\n{out}")
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except (ConnectionError, RuntimeError, OSError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"no Jobs API at {address} after 120 s") from None
                time.sleep(0.5)
        yield address
    finally:
        # Every job has ended by now; the head holds nothing worth a graceful stop (`ray start --block` took
        # 30 s to answer SIGTERM), and its workers exit with their raylet.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)

"""Deterministic sample data for the demo and the tests: a team's git repository and Continue logs.

The repository is a small payments service written in one house style (structured logging, Decimal
amounts, guard clauses raising LedgerError, one Entry posted per operation): the kind of convention a
team adapter should pick up and a generic base model does not know. Commits are spread over the last
30 days by three developers and include a merge; the Continue logs of two of them hold accepted and
rejected suggestions taken from that code, compiled prefixes of two template shapes, and two malformed
lines so the demo shows quarantine at work.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import git

DEVELOPERS = (("Alice Moreau", "alice@example.com"), ("Bob Okafor", "bob@example.com"),
              ("Chen Wei", "chen@example.com"))
VERBS = ("create", "refund", "settle", "cancel", "hold", "release", "capture", "void", "reverse", "approve")
NOUNS = ("payment", "invoice", "transfer", "payout", "charge", "fee", "deposit", "withdrawal", "credit",
         "adjustment", "subscription", "dispute")
EXTRA_ARGS = (("reference", "str"), ("currency", "str"), ("merchant_id", "str"), ("note", "str"),
              ("due", "date"), ("batch_id", "int"))

CORE = '''"""Ledger core: accounts, entries and posting."""

from dataclasses import dataclass
from decimal import Decimal

import structlog

log = structlog.get_logger("ledger")


class LedgerError(Exception):
    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.context = context


@dataclass(frozen=True)
class Account:
    id: str
    currency: str
    balance: Decimal


@dataclass(frozen=True)
class Entry:
    account: str
    kind: str
    amount: Decimal
    reference: str = ""


@dataclass(frozen=True)
class Receipt:
    entry: Entry
    balance: Decimal


def post(entry: Entry) -> Receipt:
    log.info("post", account=entry.account, kind=entry.kind, amount=str(entry.amount))
    return Receipt(entry=entry, balance=entry.amount)
'''


@dataclass(frozen=True)
class SampleData:
    repo: Path
    continue_dirs: dict[str, Path]  # developer email -> their Continue folder (holds dev_data/)
    commits: int
    events: int
    malformed_lines: int

    def sources(self, repo_name: str = "repo", relative_to: Path | None = None) -> list[dict[str, Any]]:
        """The [[sources]] that collect this sample: its git repository, then each developer's Continue folder
        (paths relative to `relative_to` when given, as the demo's config, which sits in the state folder)."""
        def path(p: Path) -> str:
            return str(p.relative_to(relative_to) if relative_to is not None else p)

        return [{"kind": "git", "path": path(self.repo), "name": repo_name}] + [
            {"kind": "continue", "path": path(folder), "name": f"continue-{email.split('@')[0]}", "developer": email}
            for email, folder in sorted(self.continue_dirs.items())]


def function_source(rng: random.Random, verb: str, noun: str) -> str:
    name = f"{verb}_{noun}"
    extras = rng.sample(EXTRA_ARGS, rng.randint(0, 2))
    params = ", ".join(["account: Account", "amount: Decimal", *(f"{a}: {t}" for a, t in extras)])
    kwargs = "".join(f", {a}={a if t == 'str' else f'str({a})'}" for a, t in extras)
    condition, problem = rng.choice([('amount <= Decimal("0")', "amount must be positive"),
                                     ("amount > account.balance", "exceeds balance"),
                                     ('account.currency != "EUR"', "needs a EUR account")])
    guard = f'    if {condition}:\n        raise LedgerError("{noun} {problem}", account=account.id)\n'
    reference = next((a for a, _ in extras if a == "reference"), None)
    entry_ref = f", reference={reference}" if reference else ""
    return (
        f"def {name}({params}) -> Receipt:\n"
        f'    """{verb.capitalize()} a {noun} on `account`."""\n'
        f"{guard}"
        f'    log.info("{name}", account=account.id, amount=str(amount){kwargs})\n'
        f'    entry = Entry(account=account.id, kind="{noun}", amount=amount{entry_ref})\n'
        f"    return post(entry)\n"
    )


def module_header(noun: str) -> str:
    return (f'"""{noun.capitalize()}s: every operation posts one ledger entry."""\n\n'
            "from datetime import date\nfrom decimal import Decimal\n\n"
            "from ledger.core import Account, Entry, LedgerError, Receipt, log, post\n")


def make_sample(root: Path, seed: int = 7, n_commits: int = 72, n_events: int = 480,
                end: datetime | None = None, days: int = 30) -> SampleData:
    """Write the sample repository and Continue logs under `root` (idempotent: reused when present)."""
    repo_dir, logs_dir = root / "repo", root / "continue"
    marker = root / "sample.json"
    if marker.is_file():
        meta = json.loads(marker.read_text())
        return SampleData(repo=repo_dir, continue_dirs={k: Path(v) for k, v in meta["continue_dirs"].items()},
                          commits=meta["commits"], events=meta["events"], malformed_lines=meta["malformed_lines"])
    rng = random.Random(seed)
    end = end or datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    start = end - timedelta(days=days)
    files, n_done = _make_repo(repo_dir, rng, n_commits, start, end)
    continue_dirs, n_lines, n_bad = _make_continue_logs(logs_dir, rng, files, n_events, start, end)
    meta = {"continue_dirs": {k: str(v) for k, v in continue_dirs.items()}, "commits": n_done,
            "events": n_lines, "malformed_lines": n_bad}
    marker.write_text(json.dumps(meta, indent=2) + "\n")
    return SampleData(repo=repo_dir, continue_dirs=continue_dirs, commits=n_done, events=n_lines,
                      malformed_lines=n_bad)


def _commit(repo: git.Repo, message: str, who: tuple[str, str], when: datetime) -> None:
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S+0000")
    env = {"GIT_AUTHOR_NAME": who[0], "GIT_AUTHOR_EMAIL": who[1], "GIT_AUTHOR_DATE": stamp,
           "GIT_COMMITTER_NAME": who[0], "GIT_COMMITTER_EMAIL": who[1], "GIT_COMMITTER_DATE": stamp}
    repo.git.commit("-q", "--no-verify", "-m", message, env=env)


def _make_repo(repo_dir: Path, rng: random.Random, n_commits: int, start: datetime,
               end: datetime) -> tuple[dict[str, str], int]:
    repo_dir.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(repo_dir, initial_branch="main")
    repo.git.remote("add", "origin", "git@github.com:acme/payments.git")
    files: dict[str, str] = {"ledger/__init__.py": "", "ledger/core.py": CORE}
    step = (end - start) / (n_commits + 1)
    when = start

    def write_and_commit(paths: list[str], message: str, who: tuple[str, str]) -> None:
        for p in paths:
            (repo_dir / p).parent.mkdir(parents=True, exist_ok=True)
            (repo_dir / p).write_text(files[p])
        repo.git.add(*paths)
        _commit(repo, message, who, when)

    write_and_commit(list(files), "ledger core: accounts, entries, posting", DEVELOPERS[0])
    pairs = [(v, n) for n in NOUNS for v in VERBS]
    rng.shuffle(pairs)
    done = 1
    merge_at = n_commits // 2
    while done < n_commits and pairs:
        when += step
        who = rng.choice(DEVELOPERS)
        if done == merge_at:
            # A feature branch with two commits, merged with a merge commit.
            base = repo.active_branch.name
            repo.git.checkout("-q", "-b", "feature/statements")
            for _ in range(2):
                verb, noun = pairs.pop()
                path = f"ledger/{noun}s.py"
                files[path] = files.get(path) or module_header(noun)
                files[path] += "\n\n" + function_source(rng, verb, noun)
                write_and_commit([path], f"add {verb}_{noun}", who)
                when += step / 3
                done += 1
            repo.git.checkout("-q", base)
            stamp = when.strftime("%Y-%m-%dT%H:%M:%S+0000")
            repo.git.merge("--no-ff", "-q", "-m", "Merge branch 'feature/statements'", "feature/statements",
                           env={"GIT_AUTHOR_NAME": who[0], "GIT_AUTHOR_EMAIL": who[1], "GIT_AUTHOR_DATE": stamp,
                                "GIT_COMMITTER_NAME": who[0], "GIT_COMMITTER_EMAIL": who[1],
                                "GIT_COMMITTER_DATE": stamp})
            done += 1
            continue
        changed = []
        for _ in range(rng.randint(1, 2)):
            if not pairs:
                break
            verb, noun = pairs.pop()
            path = f"ledger/{noun}s.py"
            files[path] = files.get(path) or module_header(noun)
            files[path] += "\n\n" + function_source(rng, verb, noun)
            changed.append(path)
        write_and_commit(sorted(set(changed)), f"add {', '.join(p.split('/')[-1] for p in changed)} operations", who)
        done += 1
    return files, done


def _make_continue_logs(logs_dir: Path, rng: random.Random, files: dict[str, str], n_events: int,
                        start: datetime, end: datetime) -> tuple[dict[str, Path], int, int]:
    developers = {DEVELOPERS[0][1]: logs_dir / "alice", DEVELOPERS[1][1]: logs_dir / "bob"}
    machine_ids = {email: uuid.UUID(int=rng.getrandbits(128)).hex * 2 for email in developers}
    lines: dict[str, list[tuple[datetime, str]]] = {email: [] for email in developers}
    code_files = [p for p, text in files.items() if p.endswith(".py") and text.count("\n") > 20]
    span = (end - start).total_seconds()
    for i in range(n_events):
        email = rng.choice(list(developers))
        path = rng.choice(code_files)
        text_lines = files[path].splitlines(keepends=True)
        # The cursor sits at the start of a line inside a function body; the suggestion is that line.
        candidates = [j for j, ln in enumerate(text_lines) if ln.startswith("    ") and j > 5]
        j = rng.choice(candidates)
        prefix, line, suffix = "".join(text_lines[:j]), text_lines[j], "".join(text_lines[j + 1:])
        accepted = rng.random() < 0.32  # Continue users accept about a third of what they see
        completion = line if accepted else _wrong_line(rng, files, line)
        shown = start + timedelta(seconds=span * (i + 1) / (n_events + 1))
        model = rng.choice(["qwen2.5-coder:1.5b-base", "starcoder2:3b"])
        compiled = prefix if "qwen" in model else f"\n# {path}\n{prefix}"  # FORMATS.md §1.5 shapes
        event = {
            "eventName": "autocomplete", "schema": "0.2.0", "timestamp": shown.isoformat(timespec="milliseconds") + "Z",
            "userId": "", "userAgent": "Visual Studio Code/1.105.1 (Continue/1.2.10)", "selectedProfileId": "local",
            "disable": False, "maxPromptTokens": 1024, "debounceDelay": 350, "maxSuffixPercentage": 0.2,
            "prefixPercentage": 0.3, "transform": True, "multilineCompletions": "auto",
            "slidingWindowPrefixPercentage": 0.75, "slidingWindowSize": 500, "useCache": True,
            "onlyMyCode": True, "useRecentlyEdited": True, "accepted": accepted,
            "time": rng.randint(120, 900), "prefix": compiled, "suffix": suffix or "\n",
            "prompt": f"<|fim_prefix|>{compiled}<|fim_suffix|>{suffix}<|fim_middle|>", "completion": completion,
            "modelProvider": "ollama", "modelName": model, "cacheHit": False,
            "filepath": f"file:///home/{email.split('@')[0]}/src/payments/{path}",
            "gitRepo": "git@github.com:acme/payments", "completionId": str(uuid.UUID(int=rng.getrandbits(128))),
            "uniqueId": machine_ids[email],
        }
        # Rejected lines are written 10 s after display, so file order is not time order (§1.4).
        written = shown + timedelta(seconds=0.5 if accepted else 10)
        lines[email].append((written, json.dumps(event, separators=(",", ":"))))
    bad = 0
    out: dict[str, Path] = {}
    for email, folder in developers.items():
        ordered = [text for _, text in sorted(lines[email])]
        if email == DEVELOPERS[0][1]:
            ordered.insert(len(ordered) // 3, ordered[0][: len(ordered[0]) // 2])  # a line cut short by a crash
            ordered.insert(len(ordered) // 2, ordered[1].replace('"accepted":false', '"accepted":"true"')
                           .replace('"accepted":true', '"accepted":"true"'))  # a string where a bool belongs
            bad = 2
        target = folder / "dev_data" / "0.2.0" / "autocomplete.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(ordered) + "\n")
        out[email] = folder
    return out, sum(len(v) for v in lines.values()) + bad, bad


def _wrong_line(rng: random.Random, files: dict[str, str], right: str) -> str:
    """A plausible but rejected suggestion: a line from elsewhere with the same indentation."""
    indent = right[: len(right) - len(right.lstrip())]
    pool = [ln + "\n" for text in files.values() for ln in text.splitlines()
            if ln.startswith(indent) and ln.strip() and ln + "\n" != right]
    return rng.choice(pool) if pool else indent + "pass\n"

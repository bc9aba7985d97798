"""Secret recall: the scrubber against the labeled examples public secret scanners ship with their rules,
and against the scrubber before this branch, measured in the same run.

    git clone https://github.com/gitleaks/gitleaks /tmp/secsrc/gitleaks        # any checkout of each
    git clone https://github.com/praetorian-inc/noseyparker /tmp/secsrc/noseyparker
    git clone https://github.com/Yelp/detect-secrets /tmp/secsrc/detect-secrets
    python bench/secret_recall.py --gitleaks /tmp/secsrc/gitleaks --noseyparker /tmp/secsrc/noseyparker \\
        --detect-secrets /tmp/secsrc/detect-secrets [--baseline REF] [--mb 20] [--events 20000] [--misses]

Reports, for the scrubber here and the baseline (`pipelines/scrub.py` at REF, default the commit this branch
started from, `git merge-base HEAD main`):
- recall on the positives and the false-positive rate on the negatives, per rule family and per source, and
  overall, twice: under the labeling policy (stand-ins are no secrets, JWT-shaped tokens are, for every source
  alike) and under the sources' own labels (with the corrections secret_sources.py lists), then overall as
  each rule's test labels its examples; and what the policy changed, per reason and source, with how many of
  those examples each scrubber flags (how the examples are read and labeled: bench/secret_sources.py). A
  positive counts as found when every character of its secret lies in a scrubbed span (half a key replaced
  is a leak); where the source does not say which part is the secret, any span in the text counts. A negative
  counts as a false positive when anything in it is scrubbed;
- false positives per 10k lines of ordinary code (the standard library's and installed packages' Python, as
  bench/scrub_fp.py reads them: every hit there is a false positive);
- speed: MB/s of `find_secrets` on that code, and events/s of the suggestion path of ingest
  (`cursor_spans` then `scrub_fields` over header, prefix, suffix and completion, as pipelines/ingest.py
  runs them) on realistic events, in CPU seconds; baseline and candidate alternate on small slices, `--reps`
  times, and the ratio reported is the median of the per-repetition ratios (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import secret_sources  # noqa: E402  (bench/ is on sys.path when this script runs)
from scrub_fp import corpus  # noqa: E402
from secret_sources import Example  # noqa: E402

from pipelines.ingest import scrub as candidate  # noqa: E402

# Rule families: the first whose words occur in a rule's id (lower-cased) names it; the rest are "other vendors".
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("private keys", ("private-key", "private_key", "privatekey", "pem", "pkcs", "ssh", "pgp", "age", "putty",
                      "jks", "keystore")),
    ("jwt", ("jwt",)),
    ("urls and connection strings", ("url", "uri", "basic_auth", "basic-auth", "connection", "jdbc", "odbc",
                                     "mongodb", "postgres", "mysql", "redis", "netrc", "curl", "ldap", "sqlserver")),
    ("generic assignments", ("generic", "keyword", "password", "high_entropy", "credential", "secret-key",
                             "kubernetes", "nuget")),
    ("cloud", ("aws", "gcp", "google", "azure", "alibaba", "digitalocean", "ibm", "softlayer", "cloudant",
               "yandex", "heroku", "linode", "scaleway", "oci", "tencent", "cloudflare", "fly", "netlify",
               "vercel", "openshift", "okta", "auth0", "firebase", "databricks", "snowflake", "planetscale")),
    ("vcs, ci and packages", ("github", "gitlab", "bitbucket", "npm", "pypi", "rubygems", "clojars", "docker",
                              "artifactory", "jfrog", "circleci", "travis", "drone", "jenkins", "teamcity",
                              "atlassian", "jira", "confluence", "sonar", "codecov", "hashicorp", "vault",
                              "terraform", "pulumi", "doppler", "octopus", "harness", "sourcegraph", "snyk",
                              "gitter", "postman", "grafana", "sentry", "new_relic", "newrelic", "dynatrace",
                              "datadog", "launchdarkly", "prefect", "infracost", "nuget", "scalingo")),
    ("chat and mail", ("slack", "discord", "telegram", "teams", "mattermost", "twilio", "sendgrid", "mailchimp",
                       "mailgun", "sendinblue", "messagebird", "twitch", "twitter", "facebook", "linkedin",
                       "intercom", "sendbird", "zendesk", "microsoft", "postmark")),
    ("payments and finance", ("stripe", "square", "paypal", "braintree", "shopify", "coinbase", "plaid",
                              "flutterwave", "gocardless", "kraken", "kucoin", "bittrex", "finicity", "finnhub",
                              "easypost", "shippo", "duffel", "freemius", "etsy")),
    ("ai", ("openai", "anthropic", "huggingface", "cohere", "perplexity", "replicate", "groq", "privateai",
            "deepseek", "mistral", "langsmith", "langchain")),
)


def family(example: Example) -> str:
    if example.identifier:
        return "identifiers (not counted)"
    rule = example.rule.lower()
    for name, words in FAMILIES:
        if any(w in rule for w in words):
            return name
    return "other vendors"


# The formats issue 11 lists as missed, in forms written here (not from any scanner's files).
def issue_examples() -> list[Example]:
    def pos(rule: str, text: str, secret: str | None = None) -> Example:
        return Example("issue-11", rule, text, True, (secret,) if secret else ())

    def neg(rule: str, text: str) -> Example:
        return Example("issue-11", rule, text, False)

    v = "Qm9vZ1e-9vLk2Tn4Xw"
    return [
        pos("generic-comparison", f'if (api_key == "{v}") {{', v),
        pos("generic-comparison", f'if ("{v}" === db_password) return', v),
        pos("generic-walrus", f"db_pass := {v}", v),
        pos("generic-no-operator", f'password "{v}";', v),
        pos("generic-cli-flag", f"curl --x-api-key {v} https://api.example.com", v),
        pos("generic-cli-flag", f"mytool --password={v} --verbose", v),
        pos("generic-objc", f'NSString *password = @"{v}";', v),
        pos("generic-c-array", f'char secret[] = "{v}";', v),
        pos("generic-names", f"smtp_pw = {v}", v),
        pos("generic-names", f'ldap_pass: "{v}"', v),
        pos("generic-names", f"sl_key = {v}", v),
        pos("generic-names", f"ibm-cloud-key: {v}", v),
        pos("generic-spaces", 'password = "correct horse battery staple"', "correct horse battery staple"),
        pos("generic-brackets", 'password = "p4$${<w0rd>}x!"', "p4$${<w0rd>}x!"),
        pos("artifactory", "artifactory_token: "
            "AKCp8jQ8sL3rJ5n1NfGZ2WVY4tkQ8s3Yhq6rDq6pYUGkF5zXRqyN6J2e8oG5a2TpwV8Q6cXDB"),
        pos("discord-bot-token", "MTk4NjIyNDgzNDcxOTI1MjQ4.Gk2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWsR3xQvYb8",
            "MTk4NjIyNDgzNDcxOTI1MjQ4.Gk2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWsR3xQvYb8"),
        pos("npm-authtoken", "//registry.npmjs.org/:_authToken=1f9c3a4e-7b2d-4c8e-9a0f-5d6b7e8f9a0b",
            "1f9c3a4e-7b2d-4c8e-9a0f-5d6b7e8f9a0b"),
        pos("gitlab-runner", "registration-token: GR1348941zX8qLmN4vB7cT2yK9wQp", "GR1348941zX8qLmN4vB7cT2yK9wQp"),
        pos("mailchimp", "mc = MailchimpClient('0f3a9b2c7d4e5f60718293a4b5c6d7e8-us30')",
            "0f3a9b2c7d4e5f60718293a4b5c6d7e8-us30"),
        pos("twilio", "sid = 'AC3f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c'", "AC3f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c"),
        pos("twilio", "key = 'SK3f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c'", "SK3f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c"),
        pos("url-token", "https://hooks.zapier.com/hooks/catch/1234567/abcdEF12/?token=9fK2mQ7xLp4Rt8Vw",
            "9fK2mQ7xLp4Rt8Vw"),
        pos("jwt-unsigned", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhZG1pbiIsImlhdCI6MTUxNjIzOTAyMn0.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhZG1pbiIsImlhdCI6MTUxNjIzOTAyMn0"),
        pos("hex-32", 'client_secret = "0123456789abcdef0123456789abcdef"', "0123456789abcdef0123456789abcdef"),
        neg("near-miss", "AKIAIOSFODNN7EXAMPLE1"),  # one character too long for an AWS key id
        neg("near-miss", "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EXTRA_suffix_x"),
        neg("stripe-publishable", "const stripe = Stripe('pk_live_51HqLyjWDarjtT1zdp7dcXpXzjBj0a5a8');"),
        neg("stripe-publishable", "STRIPE_PUBLISHABLE_KEY=pk_test_TYooMQauvdEDq54NiTphI7jx"),
        neg("generic-names", "token_type = 'bearer'"),
        neg("generic-names", "password_field = form.password"),
    ]


def load_baseline(ref: str) -> ModuleType:
    """The scrubber as it was at `ref` (pipelines/ingest/scrub.py, or pipelines/scrub.py before the stages had
    folders), loaded as its own module."""
    for path in ("pipelines/ingest/scrub.py", "pipelines/scrub.py"):
        shown = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            source = shown.stdout
            break
    else:
        raise SystemExit(f"no scrubber at {ref}")
    spec = importlib.util.spec_from_loader("scrub_baseline", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scrub_baseline"] = module  # dataclasses look their module up by name
    exec(compile(source, f"{ref}:{path}", "exec"), module.__dict__)
    return module


_NAMED = re.compile(r"[\w.\-]+:[ \t]+(?:[|>][-+]?\s+)?(.+)", re.S)


def found(find: Callable[[str], list[Any]], e: Example) -> bool:
    """Whether the scrubber takes one of a positive's secrets whole (every place it occurs), or anything at all
    in a negative."""
    spans = [(s, t) for s, t, _ in find(e.text)]
    if not e.positive:
        return bool(spans)
    covered = set()
    for s, t in spans:
        covered.update(range(s, t))
    located = False
    # A captured `name: value` is also met by its value (gitleaks' kubernetes-secret-yaml captures the key).
    named = [m.group(1) for c in e.secrets if (m := _NAMED.fullmatch(c.strip()))]
    for captured in [*e.secrets, *named]:
        secret = captured.strip("\"'`\\ \t\n")  # the quotes and escapes around it a rule captured
        starts = [i for i in range(len(e.text)) if e.text.startswith(secret, i)] if secret else []
        located = located or bool(starts)
        if starts and all(all(i in covered for i in range(a, a + len(secret))) for a in starts):
            return True
    return bool(spans) and not located  # the source names no secret this text holds: any span counts


def as_policy_labels(e: Example) -> Example:
    """`e` labeled by the labeling policy (bench/secret_sources.py: stand-ins are no secrets, JWT-shaped tokens
    are), so that `found` judges it as such."""
    positive = secret_sources.policy_positive(e)
    secrets = e.secrets or ((e.value,) if positive and e.policy_note and e.value else ())
    return replace(e, positive=positive, secrets=secrets)


def table(examples: list[Example], results: dict[str, list[bool]], title: str) -> None:
    """Recall and false-positive rate per source, per rule family and overall, for each scrubber."""
    names = list(results)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[f"family: {family(e)}"].append(i)
        if not e.identifier:
            groups[f"source: {e.source}"].append(i)
            groups["overall"].append(i)

    def rate(indices: list[int], positive: bool, name: str) -> str:
        chosen = [i for i in indices if examples[i].positive == positive]
        if not chosen:
            return f"{'-':>14}"
        n = sum(results[name][i] for i in chosen)
        return f"{n:>5}/{len(chosen):<4} {n / len(chosen):>5.1%}"

    print(f"{title}\n{'':38}" + "".join(f"{'recall ' + n:>22}" for n in names)
          + "".join(f"{'false pos. ' + n:>22}" for n in names))
    for g in sorted(groups, key=lambda g: (g.startswith("overall"), not g.startswith("source"), g)):
        print(f"{g:38}" + "".join(f"{rate(groups[g], True, n):>22}" for n in names)
              + "".join(f"{rate(groups[g], False, n):>22}" for n in names))


def report(examples: list[Example], modules: dict[str, ModuleType], show_misses: bool) -> None:
    """The tables under the labeling policy and under the sources' labels, and what the policy changed."""
    policy = [as_policy_labels(e) for e in examples]
    results = {name: [found(m.find_secrets, e) for e in policy] for name, m in modules.items()}
    source_results = {name: [found(m.find_secrets, e) for e in examples] for name, m in modules.items()}
    table(policy, results, "under the labeling policy (bench/secret_sources.py: stand-ins are no secrets, "
                           "JWT-shaped tokens are):")
    print()
    table(examples, source_results, "as the sources label them (with the corrections bench/secret_sources.py "
                                    "lists, no policy):")
    # each rule test's own labels, before the corrections (relabeled ones are negatives)
    raw = [replace(e, positive=e.positive and not e.note) for e in examples]
    raw_results = {name: [found(m.find_secrets, e) for e in raw] for name, m in modules.items()}
    row = f"{'overall, as each rule test labels it':38}"
    for positive in (True, False):
        for name in modules:
            chosen = [i for i, e in enumerate(raw) if not e.identifier and e.positive == positive]
            n = sum(raw_results[name][i] for i in chosen)
            row += f"{f'{n:>5}/{len(chosen):<4} {n / len(chosen):>5.1%}':>22}"
    print(row)
    # the policy's stand-ins that their sources call secrets, in neither the positives nor the negatives: the
    # negatives are then the sources' own (the scrubber was written to keep stand-ins, so counting them as
    # negatives it passes would flatter its false-positive rate)
    row = f"{'overall, policy, added negatives left out':38}"
    for positive in (True, False):
        for name in modules:
            chosen = [i for i, e in enumerate(policy) if not e.identifier and e.positive == positive
                      and not (examples[i].positive and examples[i].stand_in)]
            n = sum(results[name][i] for i in chosen)
            row += f"{f'{n:>5}/{len(chosen):<4} {n / len(chosen):>5.1%}':>22}"
    print(row)

    print("\nwhat the policy changed: examples, and how many of them each scrubber flags (now a false positive "
          "where the policy made a positive a negative, a find where it made a negative a positive):")
    changed: Counter[tuple[str, str, str]] = Counter()
    flagged: dict[str, Counter[tuple[str, str, str]]] = {name: Counter() for name in modules}
    for i, (e, p) in enumerate(zip(examples, policy, strict=True)):
        if e.identifier or e.positive == p.positive:
            continue
        key = ("positive -> negative" if e.positive else "negative -> positive", e.stand_in or e.policy_note,
               e.source)
        changed[key] += 1
        for name in modules:
            flagged[name][key] += results[name][i]
    for key, n in sorted(changed.items()):
        print(f"  {key[0]:22} {key[1]:44} {key[2]:15} {n:>4}   "
              + "   ".join(f"{name} {flagged[name][key]:>3}" for name in modules))
    last = list(modules)[-1]
    by_kind: Counter[str] = Counter()
    for i, e in enumerate(policy):
        if not e.positive and not e.identifier and results[last][i]:
            by_kind.update({kind for _, _, kind in modules[last].find_secrets(e.text)})
    print(f"{last}: false positives (policy labels) by the detector that took them: {dict(by_kind.most_common())}")
    if show_misses:
        print(f"\nmissed positives ({last}, policy labels):")
        for i, e in enumerate(policy):
            if e.positive and not e.identifier and not results[last][i]:
                print(f"  {e.source:14} {e.rule:32} {e.text[:150]!r}  secrets={e.secrets!r:.80}  {e.note}")
        print(f"\nflagged negatives ({last}, policy labels):")
        for i, e in enumerate(policy):
            if not e.positive and not e.identifier and results[last][i]:
                print(f"  {e.source:14} {e.rule:32} {e.text[:150]!r}  {e.stand_in}")


def events(n: int, seed: int = 7) -> list[tuple[str, str, str, str]]:
    """(header, prefix, suffix, completion) of realistic suggestions: prefixes of 0.5-2 KB and suffixes of
    0.1-0.6 KB of real Python, completions of 20-200 characters, a planted token in 1% (as
    bench/ingest_continue.py writes them)."""
    rng = random.Random(seed)
    files = [t for _, t in corpus(8.0) if len(t) > 4000]
    out = []
    for i in range(n):
        text = rng.choice(files)
        pos = rng.randint(2100, len(text) - 700)
        prefix = text[pos - rng.randint(500, 2000):pos]
        completion = text[pos:pos + rng.randint(20, 200)]
        if i % 100 == 0:
            completion = f'API_TOKEN = "ghp_{rng.getrandbits(128):032x}abcd"\n'
        header = "" if i % 2 else "\n# Path: other/util.py\n# x = 1\n# app/mod.py\n"
        out.append((header, prefix, text[pos:pos + rng.randint(100, 600)], completion))
    return out


def scrub_events(module: ModuleType, batch: list[tuple[str, str, str, str]]) -> float:
    counts: Counter[str] = Counter()
    started = time.process_time()
    for header, prefix, suffix, completion in batch:
        at_prefix, at_completion, at_suffix = module.cursor_spans(prefix, [completion], suffix)
        module.scrub_fields([header, prefix, suffix, completion], counts,
                            [[], at_prefix, at_suffix, at_completion])
    return time.process_time() - started


def scan_files(module: ModuleType, files: list[tuple[Path, str]]) -> float:
    started = time.process_time()
    for _, text in files:
        module.find_secrets(text)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gitleaks", type=Path, help="a gitleaks checkout")
    parser.add_argument("--noseyparker", type=Path, help="a Nosey Parker checkout")
    parser.add_argument("--detect-secrets", type=Path, help="a detect-secrets checkout")
    parser.add_argument("--baseline", default=None, help="git ref of the scrubber to compare with "
                        "(default: git merge-base HEAD main)")
    parser.add_argument("--mb", type=float, default=20.0, help="MB of ordinary code for false positives/speed")
    parser.add_argument("--events", type=int, default=20_000, help="suggestions for events/s")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--misses", action="store_true", help="list the candidate's misses and false positives")
    args = parser.parse_args()
    warnings.simplefilter("ignore", FutureWarning)  # the sources' regexes read in Python ("nested set")

    examples: list[Example] = []
    if args.gitleaks:
        g, skipped = secret_sources.gitleaks(args.gitleaks)
        print(f"gitleaks: {len(g)} examples ({skipped} tps/fps statements not evaluated)")
        examples += g
    if args.noseyparker:
        examples += secret_sources.noseyparker(args.noseyparker)
    if args.detect_secrets:
        examples += secret_sources.detect_secrets(args.detect_secrets)
    examples += issue_examples()
    examples = [e for e in examples if e.text.strip()]
    examples, conflicts = secret_sources.dedupe(examples)
    examples = secret_sources.apply_policy(examples)
    why = Counter(e.note.split(" ", 2)[1] if " rule " in e.note or " plugin " in e.note else "comment"
                  for e in examples if e.note)
    print(f"{len(examples)} examples: {sum(e.positive and not e.identifier for e in examples)} positives, "
          f"{sum(not e.positive for e in examples)} negatives, {sum(e.identifier for e in examples)} identifiers; "
          f"negatives relabeled positive: {why.get('comment', 0)} by a comment in the source, "
          f"{sum(why.values()) - why.get('comment', 0)} because another rule of the scanner flags them; "
          f"{conflicts} texts labeled both ways counted as positives")

    ref = args.baseline or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, check=True,
                                          capture_output=True, text=True).stdout.strip()
    baseline = load_baseline(ref)
    modules = {"before": baseline, "after": candidate}
    print(f"\nbefore = pipelines/scrub.py at {ref[:10]}, after = this tree\n")
    report(examples, modules, args.misses)

    files = corpus(args.mb)
    lines = sum(t.count("\n") for _, t in files)
    mb = sum(len(t) for _, t in files) / 1e6
    print(f"\nordinary code: {mb:.1f} MB, {len(files):,} files, {lines:,} lines")
    for name, m in modules.items():
        kinds: Counter[str] = Counter(k for _, t in files for _, _, k in m.find_secrets(t))
        print(f"  {name:6} false positives: {sum(kinds.values()):,} = {sum(kinds.values()) / lines * 1e4:.2f} "
              f"per 10k lines; by kind {dict(kinds.most_common())}")

    # CPU seconds of this process, the two scrubbers alternating on slices of 500 events and 50 files: the other
    # jobs on a shared machine move wall time by +-30% between runs, CPU time by a few percent.
    batch = events(args.events)
    file_s: dict[str, list[float]] = defaultdict(list)
    event_s: dict[str, list[float]] = defaultdict(list)
    for rep in range(args.reps):
        order = list(modules.items()) if rep % 2 == 0 else list(reversed(modules.items()))
        totals: Counter[str] = Counter()
        for k in range(max(-(-len(batch) // 500), -(-len(files) // 50))):
            for name, m in order:
                totals[f"events {name}"] += scrub_events(m, batch[k * 500:(k + 1) * 500])
                totals[f"files {name}"] += scan_files(m, files[k * 50:(k + 1) * 50])
        for name in modules:
            file_s[name].append(totals[f"files {name}"])
            event_s[name].append(totals[f"events {name}"])
    print("\nspeed, CPU time (median of per-repetition ratios, after / before):")
    for name in modules:
        print(f"  {name:6} find_secrets {mb / statistics.median(file_s[name]):6.1f} MB/s   "
              f"suggestions {len(batch) / statistics.median(event_s[name]):8,.0f} events/s")
    file_ratio = statistics.median(b / a for a, b in zip(file_s["after"], file_s["before"], strict=True))
    event_ratio = statistics.median(b / a for a, b in zip(event_s["after"], event_s["before"], strict=True))
    print(f"  ratio  find_secrets {file_ratio:.2f}x   suggestions {event_ratio:.2f}x   (>1: after is faster)")


if __name__ == "__main__":
    main()

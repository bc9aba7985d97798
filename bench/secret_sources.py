"""Labeled secret examples, read from the checkouts of public secret scanners (for bench/secret_recall.py).

Each scanner ships examples next to its rules, to test them: lines that must be found (positives) and lines
that must not (negatives). They are read here from a checkout, as the scanner's own files hold them, and never
copied into this repository:

- gitleaks (`cmd/generate/config/rules/*.go`): every rule function builds `tps` and `fps` lists. They are
  evaluated by a small interpreter for the Go subset those files use (string literals, `+`, `[]string{}`,
  `append`, `fmt.Sprintf`, local variables), with `secrets.NewSecret(regex)` drawing a string from the regex
  (seeded per rule, so a run is repeatable) and `utils.GenerateSampleSecrets(id, secret)` expanded with the
  templates read from `cmd/generate/config/utils/generate.go`: four templates per call, taken in turn, so that
  every template shows up and the ~250 generated calls weigh about as much as the hand-written examples
  (all ~25 per call would make these assignments 85% of the positives). The secret a generated example holds
  is known; for a hand-written one it is the rule's secret group in `config/gitleaks.toml`, where the regex
  runs in Python.
- Nosey Parker (`crates/noseyparker/data/default/builtin/rules/*.yml`): `examples` and `negative_examples`
  of every rule; the secrets are the groups the rule pattern captures, where it runs in Python (a rule that
  captures a user and a password is met when the password is scrubbed).
- detect-secrets (`tests/plugins/*_test.py`): `@pytest.mark.parametrize` lists of (text, should_flag), and
  the keyword plugin's `*_TEST_CASES` tables of (line, expected secret), evaluated from the AST (literals,
  `str.format`, `+`, `%` and the module's own constants; nothing is imported or run). Public IP addresses
  (`ip_public_test.py`) are left out: an address is not a credential and the scrubber does not remove them.

Labels are the scanner's, corrected where a rule's test says "not this rule's format" rather than "not a
secret", since the scrubber is judged as one whole rule set:
- a negative whose comment in the source says the rule misses it (gitleaks: "false negative", detect-secrets
  and Nosey Parker: "FIXME", "should"/"would be nice to detect"/"would be nice if") is a positive: the
  scanner's authors say it is a secret their pattern does not reach (a Nosey Parker comment above
  `negative_examples:` speaks for the whole list: "FIXME: extend this rule so these examples get matched");
- a negative of one rule that another rule of the same scanner flags is a positive (`nonMatchingToken :=
  "i4azeplb1a2j8cxa"` is a negative of gitleaks' settlemint rule, and its generic-api-key rule flags it).
  gitleaks' rules run here with their entropy thresholds, keywords and allowlists (paths aside), Nosey
  Parker's patterns as they are; detect-secrets runs itself (`scan_file` on the line alone as a `.txt` file,
  every plugin with its default filters) when it is installed (the `bench` extra), on the negatives of its
  parametrized tests and of its keyword tables alike (a table's file type decides there, `password = VALUE`
  is a secret in a `.conf` file and not in a `.cpp` one, and the scrubber sees no file names); rules whose
  regex Python cannot read are left out. The flagging rule's kind carries over: a negative that only an
  identifier rule finds (Nosey Parker's np.s3.1 flags np.s3.2's bucket URLs) is an identifier;
- the same text labeled both ways (detect-secrets' keyword plugin flags `password = VALUE` in a `.conf` file
  and not in a `.cpp` file; the scrubber sees no file names) counts once, as a positive;
- the positives of rules for identifiers rather than credentials (Nosey Parker's rules in its "identifier"
  category and not its "secret" one: S3 bucket names, ARNs, OAuth client ids; gitleaks' `*-client-id` and
  `*-access-id` rules) are kept apart as `identifier` examples: reported, not counted in recall.

Those are the sources' labels. Where the sources contradict each other on the same kind of value, one labeling
policy decides, applied to every example of every source whichever label its source gave it (`apply_policy`;
bench/secret_recall.py reports both labelings, and what the policy changed): a stand-in is not a secret (filler,
an alphabet run, a word that says so, a value that names what it stands for, a reference, a key public by
design: `stand_in` lists them), and a JWT-shaped token is one, whether or not its parts decode. The policy
judges the credential an example holds: the part its source names (of a rule that captures a user, a password
and a host, the password), else what the rule that relabeled it, or detect-secrets, reports.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import math
import random
import re
import sre_constants
import sre_parse
import string
import tempfile
import tomllib
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Example:
    """One labeled text: `secrets` are the parts one of which must be scrubbed whole, where the source says
    which (a rule that captures a user and a password is met by the password); for a positive without any,
    any span found in the text counts."""

    source: str
    rule: str
    text: str
    positive: bool
    secrets: tuple[str, ...] = ()
    note: str = ""  # why the label differs from the source's, when it does
    identifier: bool = False  # a positive of a rule for identifiers (not counted in recall)
    value: str = ""  # the credential the labeling policy judges (see `apply_policy`)
    stand_in: str = ""  # why the labeling policy says this is no secret ("" when it is one)
    policy_note: str = ""  # why the labeling policy says a negative is a secret


def policy_positive(e: Example) -> bool:
    """The label under the labeling policy (see `apply_policy`)."""
    return (e.positive or bool(e.policy_note)) and not e.stand_in


# Comments in a negatives list that say the line is a secret the rule misses.
_MISSED = re.compile(r"false negative|fixme|should (?:be )?(?:detect|match|flag|catch)|would be nice (?:to detect|if)",
                     re.I)


# ---------------------------------------------------------------- gitleaks: a Go subset interpreter


_GO_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\n]+)
  | (?P<comment>//[^\n]*|/\*[\s\S]*?\*/)
  | (?P<raw>`[^`]*`)
  | (?P<str>"(?:\\.|[^"\\\n])*")
  | (?P<rune>'(?:\\.|[^'\\\n])+')
  | (?P<num>\d+)
  | (?P<name>[A-Za-z_]\w*)
  | (?P<op>:=|\.\.\.|&&|\|\||==|!=|[-+*/%=(){}\[\],.:;!<>&|])
""", re.X)


def _go_tokens(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(src):
        m = _GO_TOKEN.match(src, pos)
        if m is None:
            out.append(("op", src[pos]))
            pos += 1
            continue
        kind = m.lastgroup or "op"
        if kind != "space":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def _go_string(token: str) -> str:
    if token.startswith("`"):
        return token[1:-1].replace("\r", "")
    return ast.literal_eval(token)  # Go's interpreted escapes (\n, \t, \", \\, \xNN, \uNNNN) read as Python's


class _Unsupported(Exception):
    pass


@dataclass(frozen=True)
class _Item:
    text: str
    secret: str | None = None
    comment: str = ""


class _GoRule:
    """Evaluates the statements of one rule function that build `tps` and `fps`."""

    def __init__(self, tokens: list[tuple[str, str]], rule_id: str, templates: list[str],
                 helpers: dict[str, str]):
        self.t = tokens
        self.i = 0
        self.rng = random.Random(zlib.crc32(rule_id.encode()))
        self.templates = templates
        self.turn = zlib.crc32(rule_id.encode()) % max(1, len(templates))
        self.vars: dict[str, Any] = {}
        self.helpers = helpers  # package-level funcs returning a regex-made secret: name -> "regex"
        self.comment = ""
        self.skipped = 0

    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i
        seen = -1
        while j < len(self.t):
            if self.t[j][0] != "comment":
                seen += 1
                if seen == k:
                    return self.t[j]
            j += 1
        return ("eof", "")

    def next(self) -> tuple[str, str]:
        while self.i < len(self.t) and self.t[self.i][0] == "comment":
            self.comment = self.t[self.i][1]
            self.i += 1
        if self.i >= len(self.t):
            raise _Unsupported("end of input")
        tok = self.t[self.i]
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        tok = self.next()
        if tok[1] != value:
            raise _Unsupported(f"expected {value!r}, got {tok[1]!r}")

    def run(self) -> dict[str, list[_Item]]:
        while self.i < len(self.t):
            kind, value = self.peek()
            if kind == "eof":
                break
            if kind == "name" and self.peek(1)[1] in (":=", "="):
                start = self.i
                try:
                    self.next()
                    self.next()
                    self.vars[value] = self.expr()
                except (_Unsupported, ValueError, SyntaxError, IndexError):
                    self.skipped += value in ("tps", "fps")
                    self.i = start + 1
                continue
            if kind == "name" and value == "var" and self.peek(1)[0] == "name" and self.peek(2)[1] == "=":
                self.next()
                name = self.next()[1]
                self.next()
                with contextlib.suppress(_Unsupported, ValueError, SyntaxError, IndexError):
                    self.vars[name] = self.expr()
                continue
            self.next()
        return {k: v for k, v in self.vars.items() if k in ("tps", "fps") and isinstance(v, list)}

    def expr(self) -> Any:
        value = self.primary()
        while self.peek()[1] == "+":
            self.next()
            right = self.primary()
            if not (isinstance(value, _Item) and isinstance(right, _Item)):
                raise _Unsupported("+ of non-strings")
            value = _Item(value.text + right.text)
        return value

    def primary(self) -> Any:
        kind, value = self.next()
        comment = self.comment
        if kind in ("str", "raw"):
            return _Item(_go_string(value), comment=comment)
        if kind == "num":
            return int(value)
        if value == "(":
            inner = self.expr()
            self.expect(")")
            return inner
        if value == "[":
            self.expect("]")
            self.expect("string")
            return self.items(keyed=False)
        if value == "map":
            for v in ("[", "string", "]", "string"):
                self.expect(v)
            return self.items(keyed=True)
        if kind != "name":
            raise _Unsupported(value)
        name = value
        while self.peek()[1] == "." and self.peek(1)[0] == "name":
            self.next()
            name += "." + self.next()[1]
        if self.peek()[1] != "(":
            if name in self.vars:
                return self.vars[name]
            raise _Unsupported(name)
        self.next()
        args: list[Any] = []
        spread = False
        while self.peek()[1] != ")":
            args.append(self.expr())
            if self.peek()[1] == "...":
                self.next()
                spread = True
            if self.peek()[1] == ",":
                self.next()
        self.expect(")")
        return self.call(name, args, spread, comment)

    def items(self, keyed: bool) -> list[_Item]:
        self.expect("{")
        out: list[_Item] = []
        while self.peek()[1] != "}":
            before = self.i
            item = self.expr()
            if keyed:
                self.expect(":")
                item = self.expr()
            # The comment that applies is the last one before the element (a section comment or its own).
            comment = "".join(tok for kind, tok in self.t[before:self.i] if kind == "comment") or self.comment
            if isinstance(item, _Item):
                out.append(_Item(item.text, item.secret, comment))
            elif isinstance(item, list):
                out += item
            if self.peek()[1] == ",":
                self.next()
        self.expect("}")
        return out

    def call(self, name: str, args: list[Any], spread: bool, comment: str) -> Any:
        text = [a.text if isinstance(a, _Item) else a for a in args]
        simple = {"utils.Numeric": "[0-9]{%s}", "utils.Hex": "[a-f0-9]{%s}", "utils.AlphaNumeric": "[a-z0-9]{%s}",
                  "utils.AlphaNumericExtendedShort": "[a-z0-9_-]{%s}",
                  "utils.AlphaNumericExtended": "[a-z0-9=_\\-]{%s}",
                  "utils.AlphaNumericExtendedLong": "[a-z0-9\\/=_\\+\\-]{%s}"}
        if name in simple:
            return _Item(simple[name] % text[0])
        if name == "utils.Hex8_4_4_4_12":
            return _Item("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
        if name in ("secrets.NewSecret", "newPlausibleSecret"):
            return _Item(generate(text[0], self.rng, plausible=name == "newPlausibleSecret"))
        if name in self.helpers:
            return _Item(generate(self.helpers[name], self.rng))
        if name == "utils.GenerateSampleSecrets":
            identifier, secret = text
            out = []
            for k in range(4):
                template = self.templates[(self.turn + k) % len(self.templates)]
                out.append(_Item(template.replace("{i}", identifier).replace("{I}", identifier.upper())
                                 .replace("{s}", secret), secret, comment))
            self.turn = (self.turn + 4) % len(self.templates)
            return out
        if name == "utils.GenerateSampleSecret":
            return _Item(f'{text[0]}_api_token = "{text[1]}"', text[1], comment)
        if name == "fmt.Sprintf":
            return _Item(_sprintf(text[0], text[1:]), comment=comment)
        if name == "strings.Repeat":
            return _Item(text[0] * text[1])
        if name in ("strings.ToUpper", "strings.ToLower"):
            return _Item(text[0].upper() if name.endswith("Upper") else text[0].lower())
        if name == "append":
            base = list(args[0])
            for a in args[1:]:
                base += a if isinstance(a, list) else [a]
            return base
        raise _Unsupported(name)


def _sprintf(fmt: str, args: list[Any]) -> str:
    values = iter(args)
    return re.sub(r"%[sdvq%]", lambda m: "%" if m.group() == "%%" else
                  (f'"{next(values)}"' if m.group() == "%q" else str(next(values))), fmt)


def generate(pattern: str, rng: random.Random, plausible: bool = False) -> str:
    """A string the regex matches, drawn at random (the role of gitleaks' `secrets.NewSecret`)."""
    parsed = sre_parse.parse(pattern.replace("(?i)", ""))
    for _ in range(50):
        out = "".join(_draw(parsed, rng))
        if not plausible or re.search("[1-9]", out):
            return out
    return out


_CATEGORY = {sre_constants.CATEGORY_DIGIT: "0123456789",
             sre_constants.CATEGORY_WORD: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_",
             sre_constants.CATEGORY_SPACE: " "}


def _draw(parsed: Any, rng: random.Random) -> Iterator[str]:
    for op, arg in parsed:
        if op is sre_constants.LITERAL:
            yield chr(arg)
        elif op is sre_constants.IN:
            chars: list[str] = []
            for kind, value in arg:
                if kind is sre_constants.LITERAL:
                    chars.append(chr(value))
                elif kind is sre_constants.RANGE:
                    chars += [chr(c) for c in range(value[0], value[1] + 1)]
                elif kind is sre_constants.CATEGORY:
                    chars += _CATEGORY.get(value, "a")
                elif kind is sre_constants.NEGATE:
                    raise _Unsupported("negated set")
            yield rng.choice(chars)
        elif op is sre_constants.ANY:
            yield rng.choice("abcdefghijklmnopqrstuvwxyz0123456789")
        elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            low, high, sub = arg
            high = low + 1 if high is sre_constants.MAXREPEAT else high
            for _ in range(rng.randint(low, max(low, high))):
                yield from _draw(sub, rng)
        elif op is sre_constants.SUBPATTERN:
            yield from _draw(arg[-1], rng)
        elif op is sre_constants.BRANCH:
            yield from _draw(rng.choice(arg[1]), rng)
        elif op is sre_constants.CATEGORY:
            yield rng.choice(_CATEGORY.get(arg, "a"))
        elif op in (sre_constants.AT, sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            continue
        else:
            raise _Unsupported(str(op))


def python_regex(pattern: str) -> re.Pattern[str] | None:
    """A Go/Rust regex as Python reads it, or None: inline flags after the start become a scoped group, and
    `\\z` is `\\Z`."""
    pattern = pattern.replace(r"\z", r"\Z")
    m = re.search(r"\(\?([a-z]+)\)", pattern)
    if m and m.start() > 0:
        pattern = f"{pattern[:m.start()]}(?{m.group(1)}:{pattern[m.end():]})"
    try:
        return re.compile(pattern)
    except (re.error, OverflowError):
        return None


def secret_in(text: str, regex: re.Pattern[str] | None, group: int | None, every: bool = False) -> tuple[str, ...]:
    """What the rule's regex takes as the secret in `text`: gitleaks' secret group, else the first group, else
    the whole match; with `every`, each group it captures (Nosey Parker's rules capture a user and a password,
    a host and a key)."""
    if regex is None:
        return ()
    m = regex.search(text)
    if m is None:
        return ()
    groups = [g for g in range(1, (regex.groups or 0) + 1) if m.group(g)]
    if every and groups:
        return tuple(m.group(g) for g in groups)
    for g in ([group] if group else []) + groups:
        if g <= (regex.groups or 0) and m.group(g):
            return (m.group(g),)
    return (m.group(0),)


_GITLEAKS_IDENTIFIER = re.compile(r"-(?:client|access)-id$")


def gitleaks(root: Path) -> tuple[list[Example], int]:
    """The examples of every gitleaks rule, and how many tps/fps statements could not be evaluated."""
    rules_dir = root / "cmd/generate/config/rules"
    generate_go = (root / "cmd/generate/config/utils/generate.go").read_text()
    body = generate_go[generate_go.index("samples := map[string]string{") + len("samples := map[string]string"):]
    templates = [i.text for i in _GoRule(_go_tokens(body), "templates", [], {}).items(keyed=True)]
    config = tomllib.loads((root / "config/gitleaks.toml").read_text())
    compiled = {r["id"]: r for r in config["rules"]}
    full_set = _GitleaksRules(config)
    examples: list[Example] = []
    skipped = 0
    for path in sorted(rules_dir.glob("*.go")):
        src = path.read_text()
        helpers = dict(re.findall(r'func (\w+)\(\) string \{\s*return secrets\.NewSecret\(`([^`]*)`\)', src))
        for func in re.split(r"\nfunc ", src)[1:]:
            rule_id = re.search(r'RuleID:\s*"([^"]+)"', func)
            if rule_id is None:
                continue
            rid = rule_id.group(1)
            interp = _GoRule(_go_tokens(func), rid, templates, helpers)
            found = interp.run()
            skipped += interp.skipped
            spec = compiled.get(rid, {})
            regex = python_regex(spec.get("regex", "")) if spec.get("regex") else None
            identifier = _GITLEAKS_IDENTIFIER.search(rid) is not None
            for label, items in (("tps", found.get("tps", [])), ("fps", found.get("fps", []))):
                for item in items:
                    positive = label == "tps"
                    note = value = ""
                    flagged_by_identifier = False
                    if not positive and _MISSED.search(item.comment):
                        positive, note = True, f"gitleaks comment: {item.comment.strip()[:60]}"
                    elif not positive and (other := full_set.flags(item.text, rid)):
                        positive, note = True, f"gitleaks rule {other[0]} flags it"
                        value = other[1]
                        flagged_by_identifier = _GITLEAKS_IDENTIFIER.search(other[0]) is not None
                    secrets = (item.secret,) if item.secret else ()
                    if positive and not secrets:
                        secrets = secret_in(item.text, regex, spec.get("secretGroup"))
                    examples.append(Example("gitleaks", rid, item.text, positive, secrets, note,
                                            positive and (identifier if not note else flagged_by_identifier),
                                            value=value))
    return examples, skipped


class _GitleaksRules:
    """gitleaks' rule set as its detector applies it: keywords, regex, secret group, entropy, allowlists."""

    def __init__(self, config: dict[str, Any]):
        self.rules = []
        for spec in config["rules"]:
            regex = python_regex(spec["regex"]) if spec.get("regex") else None
            if regex is not None:
                self.rules.append((spec, regex, [self._allowlist(a) for a in spec.get("allowlists", [])]))
        self.common = self._allowlist(config.get("allowlist", {}))

    @staticmethod
    def _allowlist(spec: dict[str, Any]) -> tuple[str, str, list[re.Pattern[str]], list[str], bool]:
        regexes = [r for r in (python_regex(p) for p in spec.get("regexes", [])) if r is not None]
        return (spec.get("condition", "OR"), spec.get("regexTarget", "secret"), regexes,
                [w.lower() for w in spec.get("stopwords", [])], bool(spec.get("paths")))

    @staticmethod
    def _allows(allow: tuple[str, str, list[re.Pattern[str]], list[str], bool], secret: str, match: str,
                line: str) -> bool:
        condition, target, regexes, stopwords, has_paths = allow
        subject = {"match": match, "line": line}.get(target, secret)
        checks = []
        if regexes:
            checks.append(any(r.search(subject) for r in regexes))
        if stopwords:
            checks.append(any(w in secret.lower() for w in stopwords))
        if has_paths:
            checks.append(False)  # no file path here
        if not checks:
            return False
        return all(checks) if condition == "AND" else any(checks)

    def flags(self, text: str, own: str) -> tuple[str, str] | None:
        """The id of a rule other than `own` that reports a finding in `text`, and the secret it reports, or
        None."""
        lower = text.lower()
        for spec, regex, allows in self.rules:
            if spec["id"] == own or (spec.get("keywords") and not any(k in lower for k in spec["keywords"])):
                continue
            for m in regex.finditer(text):
                group = spec.get("secretGroup") or (1 if regex.groups else 0)
                secret = m.group(group) if group <= regex.groups and m.group(group) else m.group(0)
                if spec.get("entropy") and _entropy(secret) < spec["entropy"]:
                    continue
                line = text[text.rfind("\n", 0, m.start()) + 1:(text.find("\n", m.end()) + 1 or len(text) + 1) - 1]
                if any(self._allows(a, secret, m.group(0), line) for a in [*allows, self.common]):
                    continue
                return str(spec["id"]), secret
        return None


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values()) if text else 0.0


# ---------------------------------------------------------------- Nosey Parker: YAML


def noseyparker(root: Path) -> list[Example]:
    import yaml

    rules_dir = root / "crates/noseyparker/data/default/builtin/rules"
    files = [(path.read_text(), yaml.safe_load(path.read_text()).get("rules") or [])
             for path in sorted(rules_dir.glob("*.yml"))]
    patterns = [(rule["id"], python_regex(rule["pattern"]), _np_identifier(rule))
                for _, rules in files for rule in rules]
    examples: list[Example] = []
    for raw, rules in files:
        missed = _commented_negatives(raw)
        for rule in rules:
            regex = python_regex(rule["pattern"])
            identifier = _np_identifier(rule)
            for text in rule.get("examples") or []:
                examples.append(Example("noseyparker", rule["id"], text, True, secret_in(text, regex, None, every=True),
                                        identifier=identifier))
            for text in rule.get("negative_examples") or []:
                other = next(((rid, r, ident) for rid, r, ident in patterns
                              if rid != rule["id"] and r is not None and r.search(text)), None)
                if text in missed:
                    examples.append(Example("noseyparker", rule["id"], text, True, (),
                                            "Nosey Parker comment: FIXME, the pattern should detect it",
                                            value=text))  # no part is named: the policy judges the whole text
                elif other is not None:
                    # the flagging rule's kind decides: a negative that an identifier rule finds is an identifier
                    found = secret_in(text, other[1], None, every=True)
                    examples.append(Example("noseyparker", rule["id"], text, True, (),
                                            f"Nosey Parker rule {other[0]} flags it", other[2],
                                            value=_credential_part(text, found)))
                else:
                    examples.append(Example("noseyparker", rule["id"], text, False))
    return examples


def _np_identifier(rule: dict[str, Any]) -> bool:
    """Whether a Nosey Parker rule finds identifiers (its "identifier" category, not its "secret" one)."""
    categories = rule.get("categories") or []
    return "identifier" in categories and "secret" not in categories


def _commented_negatives(raw: str) -> set[str]:
    """Negative examples listed under a comment that says the rule should find them: the item after the comment,
    or every item of the list when the comment stands above `negative_examples:` (`# FIXME: extend this rule so
    these examples get matched`); an item may span lines (`- |`)."""
    import textwrap

    import yaml

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    def block(start: int, list_key: bool) -> list[str]:
        """The lines of the item (or the keyed list) at `start`: it, then blank lines and deeper-indented ones
        (a list's further items at the key's own indent too)."""
        out = [lines[start]]
        for follow in lines[start + 1:]:
            if follow.strip() and indent(follow) <= indent(lines[start]) and not (
                    list_key and indent(follow) == indent(lines[start]) and follow.lstrip().startswith("- ")):
                break
            out.append(follow)
        return out

    out: set[str] = set()
    lines = raw.splitlines()
    for n, line in enumerate(lines):
        if not (line.lstrip().startswith("#") and _MISSED.search(line)):
            continue
        k = n + 1
        while k < len(lines) and lines[k].lstrip().startswith("#"):
            k += 1
        if k == len(lines):
            continue
        stripped = lines[k].strip()
        if stripped == "negative_examples:":
            items = block(k, True)
        elif stripped.startswith("- "):
            items = block(k, False)
        else:
            continue
        try:
            loaded = yaml.safe_load(textwrap.dedent("\n".join(items) + "\n"))
        except yaml.YAMLError:
            continue
        values = loaded.get("negative_examples") if isinstance(loaded, dict) else loaded
        out.update(v for v in values or [] if isinstance(v, str))
    return out


# ---------------------------------------------------------------- detect-secrets: parametrize tables, by AST


class _Eval:
    """Evaluates literal expressions of a test module: constants, str.format, +, %, tuples and lists."""

    def __init__(self) -> None:
        self.names: dict[str, Any] = {}

    def __call__(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Tuple, ast.List)):
            return [self(e) for e in node.elts]
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.id]
            raise _Unsupported(node.id)
        if isinstance(node, ast.BinOp):
            left, right = self(node.left), self(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Mod):
                return left % (tuple(right) if isinstance(right, list) else right)
            if isinstance(node.op, ast.Mult):
                return left * right
        if isinstance(node, ast.JoinedStr):
            parts = []
            for v in node.values:
                parts.append(str(self(v.value)) if isinstance(v, ast.FormattedValue) else self(v))
            return "".join(parts)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "format"):
            base = self(node.func.value)
            return base.format(*[self(a) for a in node.args], **{k.arg: self(k.value) for k in node.keywords})
        raise _Unsupported(type(node).__name__)


def detect_secrets(root: Path) -> list[Example]:
    examples: list[Example] = []
    for path in sorted((root / "tests/plugins").glob("*_test.py")):
        if path.name in ("ip_public_test.py", "base_test.py"):
            continue  # public IP addresses are not credentials; base_test holds no payloads
        rule = path.stem.removesuffix("_test")
        tree = ast.parse(path.read_text())
        ev = _Eval()
        source_lines = path.read_text().splitlines()
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                elements = stmt.value.elts if isinstance(stmt.value, ast.List) else [stmt.value]
                values = []
                for element in elements:  # one by one: a table keeps its cases that evaluate
                    with contextlib.suppress(_Unsupported, TypeError, KeyError, IndexError, ValueError, AttributeError):
                        values.append(ev(element))
                if values:
                    ev.names[stmt.targets[0].id] = values if isinstance(stmt.value, ast.List) else values[0]
        for name, value in ev.names.items():
            if name.endswith("_TEST_CASES") and isinstance(value, list):
                for case in value:
                    if isinstance(case, list) and len(case) == 2 and isinstance(case[0], str):
                        line, expected = case
                        if expected is None and (other := _detect_secrets_flags(line)):
                            # a table's file type decides (quotes required in C, Python); the scrubber sees none
                            examples.append(Example("detect-secrets", rule, line, True, (),
                                                    f"detect-secrets plugin {other[0]} flags it", value=other[1]))
                            continue
                        examples.append(Example("detect-secrets", rule, line, expected is not None,
                                                (expected,) if expected else ()))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "parametrize"
                    and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)):
                continue
            names = [n.strip() for n in str(node.args[0].value).split(",")]
            if names[1:] != ["should_flag"]:
                continue  # (the high-entropy plugin's `format, should_be_caught` are templates, not lines)
            values = node.args[1]
            if not isinstance(values, (ast.List, ast.Tuple)):
                continue
            for element in values.elts:
                try:
                    payload, flag = ev(element)
                except (_Unsupported, TypeError, KeyError, IndexError, ValueError):
                    continue
                if not isinstance(payload, str) or not isinstance(flag, bool):
                    continue
                note = value = ""
                if not flag:
                    before = "\n".join(source_lines[max(0, element.lineno - 3):element.lineno])
                    if _MISSED.search(before):
                        flag, note = True, "detect-secrets comment: should be detected"
                    elif other := _detect_secrets_flags(payload):
                        flag, note, value = True, f"detect-secrets plugin {other[0]} flags it", other[1]
                elif reported := _detect_secrets_flags(payload):
                    value = reported[1]  # the test names no secret: what detect-secrets reports
                examples.append(Example("detect-secrets", rule, payload, flag, (), note, value=value))
    return examples


@functools.cache
def _detect_secrets_flags(line: str) -> tuple[str, str] | None:
    """The type and value of the first secret detect-secrets reports in `line` as a file of its own, with every
    plugin and its default filters, or None (also when detect-secrets is not installed). (`scan_line`, its
    one-string mode, turns the entropy limits off and reports "foo".)"""
    try:
        from detect_secrets import SecretsCollection
        from detect_secrets.settings import default_settings
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp, default_settings():
        path = Path(tmp) / "line.txt"
        path.write_text(line + "\n")
        collection = SecretsCollection()
        collection.scan_file(str(path))
        for _, secret in collection:
            return str(secret.type), str(secret.secret_value or "")
    return None


def dedupe(examples: list[Example]) -> tuple[list[Example], int]:
    """One example per (source, text); a text labeled both ways is a positive. Returns the count of such."""
    by_text: dict[tuple[str, str], Example] = {}
    conflicts = 0
    for e in examples:
        key = (e.source, e.text)
        seen = by_text.get(key)
        if seen is None:
            by_text[key] = e
        elif seen.positive != e.positive:
            conflicts += 1
            by_text[key] = seen if seen.positive else e
    return list(by_text.values()), conflicts


# ---------------------------------------------------------------- the labeling policy, for every source alike

# The sources contradict each other on the same kinds of value:
# - stand-ins: detect-secrets' tests list `AKCxxxxxxxxxx`, `SKxxxx...` and `AKIAZZZZZZZZZZZZZZZZ` as secrets, Nosey
#   Parker's `postgresql://user:secret@localhost` and `00QCjAl4MlV-WPXM-ABCDEFGHIJKL-0HmjFx-vbGua`, gitleaks'
#   `sk-ant-api03-abc123xyz-...-klmnopqrstuvwx-...`; gitleaks' tests list `ghp_xxxx...`-like values and
#   `GR134894112312312312312312312` as negatives, and its global allowlist drops values of one repeated letter and
#   references (`$VAR`, `${VAR}`, `%VAR%`, `{{ x }}`), as detect-secrets' filters drop `{x}`, `<x>`, `${x}`,
#   alphabet sequences and values holding "fake";
# - keys public by design: gitleaks' rules call Flutterwave's `FLWPUBK_TEST-...` and Lob's `test_pub_...` secrets,
#   Nosey Parker's Mapbox `pk.eyJ...`, while the issue's lines and gitleaks' generic rule's tests
#   (`public_key = "..."`, `publicToken = "..."`) call public keys none;
# - JWT-shaped tokens whose parts do not decode: secrets in gitleaks' and Nosey Parker's tests (`eyJhbGciOieeei...`,
#   a header with a character changed), negatives in detect-secrets' (`eyJhbasdGciOiJIU...`, a header cut short).
# One policy decides them, applied to every example of every source, whichever label the source gave it:
# a stand-in (below) is not a secret, and a JWT-shaped token is one, whether or not its parts decode (a copy
# that lost a character still carries a signed payload).
_FILLER_RUN = re.compile(r"[xX*#•]{5}")  # the characters people type to hide a value or mark one to fill in
_RUN = re.compile(r"(.)\1{4,}")  # five or more of one character
_SEQUENCE = re.compile("|".join(alphabet[i:i + 7] for alphabet in (string.ascii_lowercase, string.ascii_uppercase)
                                for i in range(20)))
_SAYS_SO = re.compile("|".join(f"{w}|{w.upper()}|{w.capitalize()}" for w in (
    "example", "sample", "dummy", "fake", "placeholder", "changeme", "change_me", "redacted", "your", "insert")))
_NAMES_ITSELF = re.compile(r"passw(?:or)?d|secret|token", re.I)
_STAND_IN_WORDS = frozenset({"test", "foo", "bar", "baz", "qux", "foobar", "changeme"})
_REFERENCE = re.compile(r"\$[A-Za-z_]\w*|\$\{.*\}|\$\(.*\)|%[A-Za-z_][\w.]*%|#\{.*\}|\{\{.*\}\}|<[^<>]+>"
                        r"|\{[A-Za-z_][\w.]*\}|@[A-Za-z_]\w*@")  # the whole value
_PUBLISHABLE = ("pk_live_", "pk_test_", "FLWPUBK", "pk.eyJ", "live_pub_", "test_pub_")
_JWT_SHAPE = re.compile(r"\bey[A-Za-z0-9_-]{12,}\.ey[A-Za-z0-9_-]{12,}")  # gitleaks' and Nosey Parker's shape
_NAMED_VALUE = re.compile(r"[\w.\-]+:[ \t]+(?:[|>][-+]?\s+)?(.+)", re.S)


def stand_in(value: str) -> str:
    """Why `value` stands in for a credential rather than being one, or "" when it may be one:
    - filler: one character makes half or more of its letters and digits (`AKCxxxxxxxxxx`, `aaaa...end`,
      `xoxa-2-511111111-31111111111-...`), or runs of five or more of one character do (`aaaa...sssss...ddddd`),
      or it holds five x, X, *, # or • in a row (`xoxb-0000000000-...-xxxx`, `######`); a random token holds
      none of these (five x in a row: odds under 1e-6 in 32 base62 characters);
    - seven letters in alphabet order, in one case (`ABCDEFGHIJKL`, `klmnopqrstuvwx`);
    - a word that says so, in one case (example, sample, dummy, fake, placeholder, changeme, redacted, your,
      insert: `EXAMPLEKEY`, `FakeValues99`, `insert_key_here`), or an ellipsis (a value shown cut short);
    - it names what it stands for and holds no digit (`myPassword`, `SOME_PASSWORD`, `smtp_password`,
      `TestSourcePassword`, `secret`), or it is test, foo, bar, baz, qux, foobar or changeme;
    - a reference, not a value (`$Password`, `${{ secrets.x }}`, `%nothing%`, `#{datastore['X']}`, `<password>`);
    - a key public by design (Stripe `pk_live_`/`pk_test_`, Flutterwave `FLWPUBK`, Mapbox `pk.`, Lob `*_pub_`).
    Digit runs, alphabets in mixed case and repeated groups are left as values: real ids hold digit runs, and
    this project's privacy tests plant such fakes as secrets (`123456789:AA...`, `xoxb-1234567890-...-AbCdEfGh...`,
    `ghp_` + `Zx9` * 12, `4f9a0c7e` * 8). A token
    that starts like one format and is too long or too short for it is none of these: the policy says nothing
    about it, and it keeps its source's label."""
    named = _NAMED_VALUE.fullmatch(value.strip())
    v = (named.group(1) if named else value).strip("\"'`\\ \t\r\n:=,;")
    if not v:
        return ""
    if v.startswith(_PUBLISHABLE):
        return "public by design"
    if _REFERENCE.fullmatch(v):
        return "a reference"
    alnum = [c for c in v if c.isalnum()]
    if len(alnum) >= 6 and max(map(alnum.count, set(alnum))) * 2 >= len(alnum):
        return "filler"
    if sum(len(m.group()) for m in _RUN.finditer(v)) * 2 >= len(v) >= 8:
        return "filler"
    if _FILLER_RUN.search(v):
        return "filler"
    if _SEQUENCE.search(v):
        return "a sequence"
    if _SAYS_SO.search(v) or "..." in v or "…" in v:
        return "says so"
    if v.lower() in _STAND_IN_WORDS or (_NAMES_ITSELF.search(v) and not any(c.isdigit() for c in v)):
        return "names itself"
    return ""


def _credential_part(text: str, secrets: tuple[str, ...]) -> str:
    """The part of a match that is the credential: of a rule that captures several (a user and a password,
    then a host; a client id and its secret), the last one that is not a URL's host (after "@")."""
    for secret in reversed(secrets):
        at = text.find(secret)
        if at <= 0 or text[at - 1] != "@":
            return secret
    return secrets[-1] if secrets else ""


def apply_policy(examples: list[Example]) -> list[Example]:
    """Each example with the labeling policy's verdict: `stand_in` says why it is no secret, `policy_note` why a
    negative is one (see `policy_positive`). The policy judges the credential: the part the source names (of
    several, `_credential_part`), else what the rule that relabeled it or detect-secrets reports."""
    out = []
    for e in examples:
        value = _credential_part(e.text, e.secrets) if e.secrets else e.value
        policy_note = ""
        if not e.positive and (m := _JWT_SHAPE.search(e.text)) is not None:
            value = value or m.group()
            policy_note = "policy: a JWT-shaped token, decoded or not"
        out.append(replace(e, value=value, stand_in=stand_in(value) if value else "", policy_note=policy_note))
    return out

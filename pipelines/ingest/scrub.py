"""Secrets out of text before it is stored: every credential becomes a typed placeholder.

Applied to every text field (prefixes, suffixes, completions, prompts, messages, diffs, file contents, tool
arguments, quarantine excerpts) on the way into DuckDB, so nothing downstream (datasets, adapters) can see
a secret. Each match becomes `<SECRET:kind>`; the kinds are counted and shown by `devtune status`.

Three detectors, in priority order (a span found by an earlier one wins over an overlapping later one):
1. credential formats (RULES): fixed prefixes and exact lengths, ported from the rule sets of gitleaks and
   Nosey Parker (their ids are named next to each group), plus headers, URLs and command lines that carry a
   credential;
2. values given to secret-sounding names, in the forms code, configuration and shells write them
   (`password = "..."`, `"apiKey": "..."`, `DB_PASSWORD=...`, `--api-key VALUE`, `if (token == "...")`,
   `<password>...</password>`, `key="Password" value="..."`);
3. a high-entropy detector for unknown formats, restricted to string literals and assignment values,
   where secrets live, so hashes and identifiers in ordinary code are left alone.
Measured with bench/secret_recall.py against the examples those scanners ship with their rules, and with
bench/scrub_fp.py on ordinary code (bench/README.md has the numbers).

What is deliberately kept: placeholders (`ghp_xxxx...`, `<your-key>`, `${TOKEN}`, `changeme`), the example
values vendors publish in their documentation, keys that are public by design (Stripe `pk_live_`, Mapbox
`pk.`), and identifiers (user names, client ids, hosts). A false positive costs one literal in a training row,
a false negative leaks a credential, so every rule leans to scrubbing where a value could be either.

Speed matters: every autocomplete event carries 1-3 KB of code, and ingest must keep up with DuckDB's own
JSON reader. A regex that can start anywhere costs 5-13 MB/s in Python's engine; a literal substring search
costs GB/s (measured, bench/README.md). So one Aho-Corasick pass finds every format's literal prefix and
every secret-sounding keyword at once, each format pattern is then matched only where its prefix is,
assignments are matched in place from their keyword, and the entropy scan starts on a quote or `=`.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import fnmatch
import functools
import itertools
import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from re import _parser  # type: ignore[attr-defined]  # a pattern's shortest match (getwidth)
from typing import Any, Generic, TypeVar
from urllib.parse import unquote

from ahocorasick_rs import AhoCorasick, BytesAhoCorasick, Implementation


@dataclass(frozen=True)
class Rule:
    """A credential format: its kind, its pattern, and literals one of which must occur for it to match.

    An anchored rule's pattern starts `back` characters before its marker (0 for a prefix; 4 for Azure's `Q~`,
    32 for Mailchimp's `-us`) and is matched only there; the others (a marker at a varying distance from the
    start, like Telegram's `:A`) search the whole text when one of their markers occurs."""

    kind: str
    pattern: re.Pattern[str]
    markers: tuple[str, ...]
    lower: bool = False  # markers are found in the lower-cased text (for case-insensitive patterns)
    anchored: bool = True
    back: int = 0  # an anchored pattern starts this many characters before its marker
    check: bool = False  # the value must read as a credential (not a word, a variable or a placeholder)


def _rule(kind: str, pattern: str, *markers: str, lower: bool = False, anchored: bool = True, back: int = 0,
          check: bool = False) -> Rule:
    return Rule(kind, re.compile(pattern), markers, lower, anchored, back, check)


# A token ends where its alphabet does: one character more (a near-miss of the format) is not this format.
_END = r"(?![A-Za-z0-9_\-])"
_HEX8_4_4_4_12 = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

# The group named "s" is what gets replaced; without one the whole match is. Lengths are the vendors' exact
# ones where gitleaks or Nosey Parker pin them (`{36}`, not `{30,}`): a token one character longer or with a
# suffix is a near-miss their tests list as not a secret.
RULES: tuple[Rule, ...] = (
    # A key block cut short (a prefix ending inside it) runs to the end of the text; a block with an END line
    # needs 40+ characters of body (gitleaks: `-----BEGIN PRIVATE KEY-----\nanything\n-----END...` is a doc).
    _rule("private_key", r"-----BEGIN[ A-Z0-9_]{0,100}PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]{40,}?"
                         r"-----END[ A-Z0-9_]{0,100}PRIVATE KEY(?: BLOCK)?-----|(?![\s\S]*-----END)[\s\S]*\Z)",
          "-----BEGIN"),
    # PuTTY's .ppk: the lines after "Private-Lines: N" (a .ppk file has no blank line, see FileScrubber).
    _rule("private_key", r"PuTTY-User-Key-File-\d: [^\n]*\n(?:[^\n]+\n){0,40}?Private-Lines: \d+\n"
                         r"(?P<s>(?:[A-Za-z0-9+/=]+\n?)+)", "PuTTY-User-Key-File-"),
    _rule("private_key", r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}" + _END, "AGE-SECRET-KEY-1"),
    # cloud providers (gitleaks aws-*, gcp-*, azure-*, alibaba-*, digitalocean-*, ...; Nosey Parker np.aws.*, ...)
    # Access key ids only: AIDA, AROA, AGPA... name users, roles and groups (identifiers, as in moto's fixtures).
    _rule("aws_access_key", r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])",
          "A3T", "AKIA", "ASIA", "ABIA", "ACCA"),
    _rule("aws_bedrock_key", r"\bABSK[A-Za-z0-9+/]{109,269}={0,2}" + _END, "ABSK"),
    _rule("aws_bedrock_key", r"bedrock-api-key-YmVkcm9jay5hbWF6b25hd3MuY29t[A-Za-z0-9+/=%-]*", "bedrock-api-key-"),
    _rule("aws_mws_token", r"amzn\.mws\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "amzn.mws."),
    _rule("google_api_key", r"\bAIza[0-9A-Za-z_\-]{35}" + _END, "AIza"),
    _rule("google_oauth_secret", r"\bGOCSPX-[0-9A-Za-z_\-]{28}" + _END, "GOCSPX-"),
    _rule("google_oauth_token", r"\bya29\.[0-9A-Za-z_\-]{30,}", "ya29."),
    _rule("azure_storage_key", r"(?i)AccountKey=(?P<s>[A-Za-z0-9+/]{80,}={0,2})", "accountkey=", lower=True),
    _rule("azure_storage_key", r"(?i)SharedAccessKey=(?P<s>[A-Za-z0-9+/]{40,}={0,2})", "sharedaccesskey=",
          lower=True),
    _rule("azure_sas_token", r"(?<=[?&])sig=(?P<s>[A-Za-z0-9%+/]{30,}={0,2})", "sig="),
    _rule("azure_app_config", r"(?i);Secret=(?P<s>[A-Za-z0-9+/]{40,}={0,2})", ";secret=", lower=True),
    # Azure AD client secrets: 3 characters, a digit, "Q~", 31-34 more (gitleaks azure-ad-client-secret).
    _rule("azure_client_secret", r"(?<![A-Za-z0-9_~.-])[a-zA-Z0-9_~.]{3}\dQ~[a-zA-Z0-9_~.-]{31,34}"
                                 r"(?![A-Za-z0-9_~.-])", "Q~", back=4),
    # Azure DevOps personal access tokens: 52 base32 characters, or 84 ending in "AZDO" and 4 more (np.azure.4).
    _rule("azure_devops_token", r"\b[A-Za-z0-9]{76}AZDO[A-Za-z0-9]{4}\b", "AZDO", back=76),
    _rule("digitalocean_token", r"\bdo[pro]_v1_[a-f0-9]{64}\b", "_v1_", back=3),
    _rule("alibaba_access_key", r"\bLTAI[A-Za-z0-9]{12,20}" + _END, "LTAI"),
    _rule("heroku_key", r"\bHRKU-AA[0-9a-zA-Z_-]{58}" + _END, "HRKU-AA"),
    _rule("cloudflare_key", r"\bv1\.0-[a-f0-9]{24}-[a-f0-9]{146}" + _END, "v1.0-"),
    _rule("flyio_token", r"\b(?:fo1_[\w-]{43}|fm[12][ar]?_[A-Za-z0-9+/]{100,}={0,3})(?![\w+/=-])",
          "fo1_", "fm1a_", "fm1r_", "fm2_"),
    _rule("databricks_token", r"\bdapi[a-f0-9]{32}(?:-\d)?" + _END, "dapi"),
    _rule("doppler_token", r"\bdp\.(?:pt|st|sa|ct|scim|audit)\.(?:[a-z0-9_-]{2,35}\.)?[A-Za-z0-9]{40,44}" + _END,
          "dp."),
    _rule("dynatrace_token", r"\bdt0c01\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{64}" + _END, "dt0c01."),
    _rule("hashicorp_token", r"\b[A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9\-_=]{60,70}" + _END, ".atlasv1.", back=14),
    _rule("vault_token", r"\bhv[sbr]\.[\w-]{24,300}" + _END, "hvs.", "hvb.", "hvr."),
    _rule("openshift_token", r"\bsha256~[\w-]{43}" + _END, "sha256~"),
    _rule("planetscale_token", r"\bpscale_(?:tkn|oauth|pw)_[\w=.\-]{32,64}" + _END, "pscale_"),
    _rule("okta_token", r"(?i)\bSSWS[ \t]+(?P<s>00[\w-]{40})" + _END, "ssws", lower=True),
    _rule("ibm_cos_key", r"(?i)\bcos_hmac_keys(?:(?!\n\n)[\s\S]){0,100}?secret_access_key[\"']?\s*[:=]\s*[\"']?"
                         r"(?P<s>[a-f0-9]{48})",
          "cos_hmac_keys", lower=True),
    # version control, CI and package registries (gitleaks github-*, gitlab-*, npm-*, pypi-*, ...)
    _rule("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})" + _END,
          "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    _rule("gitlab_token", r"\b(?:glpat-[\w-]{20}|glpat-[\w-]{27,300}\.[0-9a-z]{2}[0-9a-z]{7}"
                          r"|glrt-[\w-]{20}|glrt-t\d_[\w-]{27,300}\.[0-9a-z]{2}[0-9a-z]{7}"
                          r"|gldt-[\w-]{20}|glffct-[\w-]{20}|glft-[\w-]{20}|glsoat-[\w-]{20,50}|glimt-[\w-]{25}"
                          r"|glptt-[\w-]{40}|glagent-[\w-]{50,1024}|gloas-[\w-]{64}"
                          r"|glcbt-(?:[0-9a-zA-Z]{1,5}_)?[\w-]{20}|GR1348941[\w-]{20,50})" + _END,
          "glpat-", "glrt-", "gldt-", "glffct-", "glft-", "glsoat-", "glimt-", "glptt-", "glagent-", "gloas-",
          "glcbt-", "GR1348941"),
    _rule("gitlab_token", r"_gitlab_session=[0-9a-z]{32}" + _END, "_gitlab_session="),
    _rule("bitbucket_token", r"\bATBB[A-Za-z0-9_=.\-]{24,}", "ATBB"),
    _rule("atlassian_token", r"\bATATT3[A-Za-z0-9_=.\-]{24,}", "ATATT3"),
    _rule("circleci_token", r"\bCCIPAT_[A-Za-z0-9_]{20,}", "CCIPAT_"),
    _rule("npm_token", r"\bnpm_[A-Za-z0-9]{36}" + _END, "npm_"),
    # `//registry.npmjs.org/:_authToken=...` in .npmrc: any value (a token, a UUID, an env reference is kept).
    _rule("npm_token", r"_auth(?:Token)?[ \t]*=[ \t]*(?P<s>[^\s\"'$][^\s\"']{7,})", "_auth", check=True),
    _rule("pypi_token", r"\bpypi-AgE[A-Za-z0-9_\-]{50,}", "pypi-AgE"),
    _rule("nuget_key", r"\boy2[a-z0-9]{43}" + _END, "oy2"),
    _rule("docker_token", r"\bdckr_pat_[A-Za-z0-9_\-]{20,}", "dckr_pat_"),
    _rule("rubygems_token", r"\brubygems_[a-f0-9]{48}" + _END, "rubygems_"),
    _rule("clojars_token", r"(?i)\bCLOJARS_[a-z0-9]{60}" + _END, "clojars_", lower=True),
    _rule("cratesio_token", r"\bcio[a-zA-Z0-9]{32}" + _END, "cio"),
    # JFrog Artifactory API keys and reference tokens (gitleaks artifactory-*: exact lengths).
    _rule("artifactory_token", r"\b(?:AKCp[A-Za-z0-9]{69}|cmVmd[A-Za-z0-9]{59})" + _END, "AKCp", "cmVmd"),
    _rule("sonar_token", r"\bsq[pua]_[a-f0-9]{40}" + _END, "sqp_", "squ_", "sqa_"),
    _rule("sourcegraph_token", r"\bsgp_(?:[a-fA-F0-9]{16}_|local_)?[a-fA-F0-9]{40}" + _END, "sgp_"),
    _rule("pulumi_token", r"\bpul-[a-f0-9]{40}" + _END, "pul-"),
    _rule("octopus_key", r"\bAPI-[A-Z0-9]{26}" + _END, "API-"),
    _rule("harness_token", r"\b(?:pat|sat)\.[\w-]{22}\.[a-zA-Z0-9]{24}\.[a-zA-Z0-9]{20}" + _END, "pat.", "sat."),
    _rule("infracost_token", r"\bico-[a-zA-Z0-9]{32}" + _END, "ico-"),
    _rule("prefect_token", r"\bpnu_[a-zA-Z0-9]{36}" + _END, "pnu_"),
    _rule("readme_token", r"\brdme_[a-z0-9]{70}" + _END, "rdme_"),
    _rule("scalingo_token", r"\btk-us-[\w-]{48}" + _END, "tk-us-"),
    _rule("sentry_token", r"\bsntrys_eyJ[a-zA-Z0-9+/=_]{60,400}|\bsntryu_[a-f0-9]{64}" + _END, "sntrys_", "sntryu_"),
    _rule("grafana_token", r"\b(?:glc_[A-Za-z0-9+/]{32,400}={0,3}|glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}"
                           r"|eyJrIjoi[A-Za-z0-9+/]{50,400}={0,3})(?![\w+/=-])", "glc_", "glsa_", "eyJrIjoi"),
    _rule("postman_token", r"\bPMAK-[a-f0-9]{24}-[a-f0-9]{34}" + _END, "PMAK-"),
    _rule("linear_token", r"\blin_api_[A-Za-z0-9]{40}" + _END, "lin_api_"),
    _rule("onepassword_token", r"\bA3-[A-Z0-9]{6}-(?:[A-Z0-9]{11}|[A-Z0-9]{6}-[A-Z0-9]{5})-[A-Z0-9]{5}-[A-Z0-9]{5}"
                               r"-[A-Z0-9]{5}" + _END + r"|\bops_eyJ[a-zA-Z0-9+/]{250,}={0,3}", "A3-", "ops_eyJ"),
    _rule("settlemint_token", r"\bsm_(?:aat|pat|sat)_[a-zA-Z0-9]{16}" + _END, "sm_aat_", "sm_pat_", "sm_sat_"),
    _rule("notion_token", r"\bntn_[0-9]{11}[A-Za-z0-9]{35}" + _END, "ntn_"),
    _rule("newrelic_key", r"\b(?:NRAK-[A-Z0-9]{27}|NRAA-[a-f0-9]{27}|NRII-[\w-]{32}|NRJS-[a-f0-9]{19}"
                          r"|NRRA-[a-f0-9]{42})" + _END, "NRAK-", "NRAA-", "NRII-", "NRJS-", "NRRA-"),
    # A license key: 6 letters or digits, 30 hex digits, "NRAL" (Nosey Parker np.newrelic.1).
    _rule("newrelic_key", r"\b[a-zA-Z0-9]{6}[a-fA-F0-9]{30}NRAL" + _END, "NRAL", back=36),
    _rule("dependency_track_key", r"\bodt_[A-Za-z0-9]{32,40}" + _END, "odt_"),
    _rule("jenkins_crumb", r"Jenkins-Crumb:[ \t]*(?P<s>[0-9a-f]{32,64})" + _END, "Jenkins-Crumb"),
    # The first admin's password, as a new Jenkins prints it to its log (Nosey Parker np.jenkins.2).
    _rule("jenkins_password", r"Please use the following password to proceed to installation:(?:\r?\n){2}"
                              r"(?P<s>[a-f0-9]{32})" + _END, "Please use the following password"),
    # SonarQube's login token and Code Climate's reporter id, named by their tools' own settings (Nosey Parker
    # np.sonarqube.1, np.codeclimate.1).
    _rule("sonar_token", r"(?i)sonar.{0,5}login.{0,5}\s*\b(?P<s>[a-f0-9]{40})" + _END, "sonar", lower=True),
    _rule("codeclimate_token", r"(?:CODECLIMATE_REPO_TOKEN|CC_TEST_REPORTER_ID)\s*[:=]\s*(?P<s>[a-f0-9]{64})" + _END,
          "CODECLIMATE_REPO_TOKEN", "CC_TEST_REPORTER_ID"),
    _rule("adafruit_key", r"\baio_[a-zA-Z0-9]{28}" + _END, "aio_"),
    _rule("jina_key", r"\bjina_[a-zA-Z0-9]{60}" + _END, "jina_"),
    # A TrueNAS API key in a JSON-RPC login call: the key's id, "-", 64 letters and digits (np.truenas.1).
    _rule("truenas_key", r'"params"\s*:\s*\[\s*"(?P<s>\d+-[a-zA-Z0-9]{64})"\s*\]', '"params"'),
    # chat apps and mail (gitleaks slack-*, discord-*, telegram-*, twilio-*, sendgrid-*, mailchimp-*, ...)
    _rule("slack_token", r"\b(?:xoxb-[0-9]{10,13}-[0-9]{10,13}[a-zA-Z0-9-]*|xoxb-[0-9]{8,14}-[a-zA-Z0-9]{18,26}"
                         r"|xox[pe](?:-[0-9]{10,13}){3}-[a-zA-Z0-9-]{28,34}|xox[os]-\d+-\d+-\d+-[a-fA-F\d]+"
                         r"|xox[ar]-(?:\d-)?[0-9a-zA-Z]{8,48}(?:-[0-9a-zA-Z]+)*|xoxe\.xox[bp]-\d-[A-Za-z0-9]{163,166}"
                         r"|xoxe-\d-[A-Za-z0-9]{146}|xapp-\d-[A-Z0-9]+-\d+-[a-z0-9]+)" + _END,
          "xoxb-", "xoxp-", "xoxe-", "xoxo-", "xoxs-", "xoxa-", "xoxr-", "xoxe.", "xapp-"),
    _rule("slack_webhook", r"(?:https?://)?hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_+-]{20,}",
          "hooks.slack.com", anchored=False),
    _rule("discord_webhook", r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[\w-]{30,}",
          "/api/webhooks/", anchored=False),
    _rule("teams_webhook", r"https://[A-Za-z0-9.\-]+\.webhook\.office\.com/webhookb2/[A-Za-z0-9@/\-]{40,}",
          "webhook.office.com", anchored=False),
    _rule("teams_webhook", r"https://outlook\.office(?:365)?\.com/webhook/[A-Za-z0-9@/\-]{40,}", "outlook.office",
          anchored=False),
    # A bot token is its id, ":A" and 34 more (35 after the colon; gitleaks telegram-bot-api-token; Nosey
    # Parker's examples hold 34 and 36). The id can follow a word (`bot110201543:AA...` in a URL path).
    # (A digit first, then the look-behind: a pattern starting with a character set is scanned at 330 MB/s, one
    # starting with a look-behind at 68.)
    _rule("telegram_token", r"[0-9](?<![0-9][0-9])[0-9]{4,15}:A[A-Za-z0-9_\-]{33,35}" + _END, ":A", anchored=False),
    # The marker takes the first hex digit too: "AC" alone occurred on most events (ACCESS, STACK), "AC0"-"ACf"
    # on 1 in 50.
    _rule("twilio_key", r"SK[0-9a-fA-F]{32}" + _END, *(f"SK{c}" for c in "0123456789abcdefABCDEF")),
    _rule("twilio_key", r"AC[0-9a-f]{32}" + _END, *(f"AC{c}" for c in "0123456789abcdef")),
    _rule("sendgrid_key", r"\bSG\.(?:[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}|[A-Za-z0-9=_\-.]{66})" + _END, "SG."),
    _rule("sendinblue_key", r"\bxkeysib-[a-f0-9]{64}-[A-Za-z0-9]{16}" + _END, "xkeysib-"),
    _rule("mailchimp_key", r"\b[0-9a-f]{32}-us[0-9]{1,2}" + _END, "-us", back=32),
    _rule("mailgun_key", r"\bkey-[0-9a-f]{32}" + _END, "key-"),
    _rule("twitch_stream_key", r"\blive_[0-9]{6,12}_[A-Za-z0-9]{30}" + _END, "live_"),
    _rule("facebook_token", r"\bEAA[MC][A-Za-z0-9]{100,}" + _END, "EAAM", "EAAC"),
    # An app access token: the app's id (15-16 digits), "|" ("%7C" in a URL), the app's secret or client token
    # (gitleaks facebook-access-token). Marked by the id's last digit and the bar: "|" alone occurs on most events
    # (`a | b`, `str | None`), a digit right before it on few; matched there, back to the id's first digit.
    *(_rule("facebook_token", rf"(?<![0-9])[0-9]{{{n}}}(?:\||%7[Cc])[0-9A-Za-z_\-]{{27,40}}" + _END,
            *(f"{d}{bar}" for d in "0123456789" for bar in ("|", "%7C", "%7c")), back=n - 1) for n in (15, 16)),
    # A bot token: the bot's id (a 17-20 digit number) in base64, a 6-character timestamp, an HMAC. The id's
    # first three digits (100-999) give its first four characters: 900 markers (the DFA below costs the same
    # per byte with them; scanning for the ".xxxxxx." middle instead cost 1.5 us per text, 8 us per event).
    _rule("discord_bot_token", r"(?<![A-Za-z0-9_-])[MNO][A-Za-z0-9_-]{23,25}\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27,38}"
                               + _END, *sorted({base64.b64encode(str(n).encode()).decode() for n in range(100, 1000)})),
    # payments (gitleaks stripe-*, square-*, shopify-*, ...); publishable keys (pk_live_) are public by design
    _rule("stripe_key", r"\b(?:sk|rk)_(?:live|test|prod)_[A-Za-z0-9]{10,99}" + _END + r"|\bwhsec_[A-Za-z0-9]{24,}\b",
          "sk_live_", "sk_test_", "sk_prod_", "rk_live_", "rk_test_", "rk_prod_", "whsec_"),
    _rule("square_token", r"\bsq0(?:atp|csp|idp)-[A-Za-z0-9_\-]{22,60}" + _END + r"|\bEAAA[A-Za-z0-9_\-+=]{60}\b",
          "sq0", "EAAA"),
    _rule("paypal_braintree_token", r"\baccess_token\$(?:production|sandbox)\$[a-z0-9]{16}\$[a-f0-9]{32}",
          "access_token$"),
    _rule("shopify_token", r"\bshp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}" + _END, "shpat_", "shpss_", "shpca_", "shppa_"),
    _rule("flutterwave_key", r"\bFLWSECK_TEST-[a-h0-9]{32}-X|\bFLWSECK_TEST-[a-h0-9]{12}" + _END, "FLWSECK_TEST-"),
    _rule("shippo_token", r"\bshippo_(?:live|test)_[a-fA-F0-9]{40}" + _END, "shippo_"),
    _rule("duffel_token", r"\bduffel_(?:test|live)_[A-Za-z0-9_\-=]{43}" + _END, "duffel_"),
    _rule("easypost_token", r"\bEZ[AT]K[A-Za-z0-9]{54}" + _END, "EZAK", "EZTK"),
    _rule("plaid_token", r"\baccess-(?:sandbox|development|production)-" + _HEX8_4_4_4_12, "access-"),
    # A session id: the org id, "!" and the session's secret.
    _rule("salesforce_token", r"\b00D[a-zA-Z0-9]{12}![a-zA-Z0-9._]{80,}", "00D"),
    # AI and other APIs
    # Every kind holds "T3BlbkFJ" ("OpenAI" in base64) between its halves (gitleaks openai-api-key, detect-secrets
    # openai): `sk-proj-` and 48 characters without it is detect-secrets' own near-miss negative.
    _rule("openai_key", r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}T3BlbkFJ[A-Za-z0-9_\-]{20,}", "sk-"),
    _rule("anthropic_key", r"\bsk-ant-[a-z]{3,6}\d\d-[A-Za-z0-9_\-]{40,}", "sk-ant-"),
    _rule("huggingface_token", r"\b(?:hf_|api_org_)[A-Za-z]{34}" + _END, "hf_", "api_org_"),
    _rule("perplexity_key", r"\bpplx-[a-zA-Z0-9]{48}" + _END, "pplx-"),
    _rule("groq_key", r"\bgsk_[a-zA-Z0-9]{52}" + _END, "gsk_"),
    _rule("replicate_token", r"\br8_[a-zA-Z0-9]{37}" + _END, "r8_"),
    _rule("langsmith_key", r"\blsv2_(?:pt|sk)_[a-f0-9]{32}_[a-f0-9]{10}" + _END, "lsv2_"),
    _rule("tavily_key", r"\btvly-(?:dev-)?[a-zA-Z0-9]{32}" + _END, "tvly-"),
    _rule("thingsboard_token", r"thingsboard\.cloud/api/v1/(?P<s>[a-z0-9]{20})/", "thingsboard.cloud/api/v1/"),
    _rule("adobe_secret", r"\bp8e-[A-Za-z0-9]{32}" + _END, "p8e-"),
    _rule("softlayer_key", r"(?i)api\.softlayer\.com/(?:soap|rest)/v3(?:\.1)?/(?P<s>[a-z0-9]{64})" + _END,
          "api.softlayer.com/", lower=True),
    # A PEM block in base64 ("-----BEGIN " encodes as "LS0tLS1CRUdJTi"): a private key only (see _kept).
    _rule("private_key", r"\bLS0tLS1CRUdJTi[A-Za-z0-9+/]{20,}={0,2}", "LS0tLS1CRUdJTi"),
    # HashiCorp Vault unseal keys, as `vault operator init` prints them and `vault operator unseal` takes them.
    _rule("vault_unseal_key", r"(?i)(?:unseal key \d+:|operator unseal)[ \t]+(?P<s>[A-Za-z0-9+/]{43,44}={0,2})" + _END,
          "unseal key", "operator unseal", lower=True),
    _rule("intra42_secret", r"\bs-s4t2(?:ud|af)-[a-f0-9]{64}" + _END, "s-s4t2"),
    _rule("mapbox_token", r"\b[st]k\.eyJ[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,}" + _END, "sk.eyJ", "tk.eyJ"),
    # Sidekiq Enterprise and Pro: Bundler's credentials for their gem servers, in an environment variable.
    _rule("sidekiq_credentials", r"(?i)BUNDLE_(?:ENTERPRISE|GEMS)__CONTRIBSYS__COM[\"']?[ \t]*[:=][ \t]*[\"']?"
                                 r"(?P<s>[a-f0-9]{8}:[a-f0-9]{8})", "bundle_enterprise__contribsys",
          "bundle_gems__contribsys", lower=True),
    # .NET: new NetworkCredential("user", "password"), new DirectoryEntry("LDAP://...", "user", "password").
    _rule("secret_assignment", r"(?i)NetworkCredential\([ \t]*\"[^\"\n]*\"[ \t]*,[ \t]*\"(?P<s>[^\"\n]+)\"",
          "networkcredential(", lower=True),
    _rule("secret_assignment", r"(?i)DirectoryEntry\(\s*\"[^\"\n]*\"\s*,\s*\"[^\"\n]*\"\s*,\s*\"(?P<s>[^\"\n]+)\"",
          "directoryentry(", lower=True),
    _rule("sidekiq_credentials", r"(?i)https?://(?P<s>[a-f0-9]{8}:[a-f0-9]{8})@(?:gems|enterprise)\.contribsys\.com",
          "contribsys.com", lower=True, anchored=False),
    _rule("password_hash", r"\$(?:1|2[abxy]?|5|6|md5|apr1)\$(?:rounds=\d+\$)?[./A-Za-z0-9]{1,22}\$[./A-Za-z0-9]{22,86}"
                           r"|\$2[abxy]?\$\d\d\$[./A-Za-z0-9]{53}|\$8\$[./A-Za-z0-9]{14}\$[./A-Za-z0-9]{43}"
                           r"|\$krb5(?:asrep|tgs)\$\d+\$[^\s$]*\$?[0-9a-f]{32}\$[0-9a-f]{64,}|\$argon2(?:id|i|d)\$[^\s\"']+",
          "$1$", "$2a$", "$2b$", "$2x$", "$2y$", "$2$", "$5$", "$6$", "$8$", "$md5$", "$apr1$", "$krb5", "$argon2"),
    # JWTs, signed or not: a base64url JSON header, a payload, an optional signature (`alg: none` tokens end
    # with a dot or at the payload). Only one whose header and payload decode to JSON objects counts (_real_jwt).
    _rule("jwt", r"\beyJ[A-Za-z0-9_\-]{10,}={0,2}\.[A-Za-z0-9_\-]{10,}={0,2}(?:\.(?:[A-Za-z0-9_\-+/]{10,}={0,2})?)?"
                 + _END, "eyJ"),
    # A Kubernetes Secret manifest: its `data:` values are found by _kubernetes_secret_values when this occurs.
    _rule("kubernetes_secret", r"(?im)^[ \t]*kind:[ \t]*[\"']?secret[\"']?[ \t]*$", "kind:", lower=True,
          anchored=False),
    # Credentials in transit: HTTP headers, URLs and command lines.
    _rule("authorization_header", r"(?i)\b(?:proxy-)?authorization\\?[\"']?[ \t]*[:=][ \t]*\\?[\"']?[ \t]*"
                                  r"(?:(?:bearer|basic|token|api-token|apikey|ssws|digest|bot|key|aws4-hmac-sha256)"
                                  r"[ \t]+)?"
                                  r"(?P<s>[A-Za-z0-9_\-.~+/:!@%]{8,}={0,3})",
          "authorization", lower=True, check=True),
    _rule("authorization_header", r"(?i)\bbearer[ \t]+(?P<s>[A-Za-z0-9_\-.~+/]{20,}={0,3})" + _END,
          "bearer", lower=True, check=True),
    # Prose that gives a password away: "the default password is 'admin'", "the password for user 'postgres' is
    # 'admin'" (Nosey Parker np.generic.11-14: a quoted value whose first character does not start a template).
    _rule("secret_assignment", r"(?i)(?:(?<=\bthe )|(?<=\bthe default ))password (?:for (?:the )?(?:user|username) "
                               r"([\"'])[^\"'\n]{1,64}\1 )?is ([\"'])(?P<s>[^'\"\n#$|{<+ ()\\][^'\"\n]{0,63})\2",
          "password is ", "password for ", lower=True),
    # scheme://user:password@host: keep the user and host, drop the password.
    # A password may hold "@": the last "@" before the host ends it.
    _rule("url_credentials", r"://[^\s/:@'\"]{0,128}:(?P<s>[^\s/'\"]{1,256})@(?=[^\s/@'\"]+(?:[/?#\s'\"]|$))",
          "://"),
    # ?token=..., &access_token=..., ?api_key=...: a credential in a query string ends at the next & or #.
    _rule("url_credentials", r"(?i)[?&](?:access_?token|auth_?token|token|api_?key|apikey|key|secret|password|pwd"
                             r"|client_secret|signature|sig|auth)=(?P<s>[^&#\s'\"<>]{8,})", "token=", "key=",
          "secret=", "password=", "pwd=", "signature=", "auth=", lower=True, anchored=False, check=True),
    # curl -u user:password, --user 'key:' (an API key as the user name): both, since the user can be the key.
    _rule("url_credentials", r"(?:(?<=\s)|^)(?:-u|--user)(?:[ \t]+|=)(?P<s>\"[^\"\s:]*:[^\"\s]*\"|'[^'\s:]*:[^'\s]*'"
                             r"|(?P<q>[\"']?)[^\s:\"']*(?P=q):(?P<q2>[\"']?)[^\s\"']{3,}(?P=q2)|[^\s:\"']{10,}:)(?=\s|$)",
          "-u ", "-u\t", "--user"),
    # psexec and friends: `-u USER -p PASSWORD`.
    _rule("url_credentials", r"-u[ \t]+\S+[ \t]+-p[ \t]*(?P<s>[^\s\"'%$-][^\s\"']*)", "-u "),
)

_K8S_RULE = next(r for r in RULES if r.kind == "kubernetes_secret")

# Values that look like credentials and are published on purpose (AWS's documentation, the Firebase SDK's
# sample apps, the NuGet docs' `nuget.config` samples, the Algolia search key yarn ships): gitleaks allows exactly
# these by value (its aws-access-token, gcp-api-key, nuget-config-password and generic-api-key allowlists), so
# does this scrubber.
_PUBLIC_EXAMPLES = frozenset({
    "33f!!lloppa", "hal+9ooo_da!sY", "6fe4476ee5a1832882e326b506d14126",
    "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AIzaSyabcdefghijklmnopqrstuvwxyz1234567", "AIzaSyAnLA7NfeLquW1tJFpx_eQCxoX-oo6YyIs",
    "AIzaSyCkEhVjf3pduRDt6d1yKOMitrUEke8agEM", "AIzaSyDMAScliyLx7F0NPDEJi1QmyCgHIAODrlU",
    "AIzaSyD3asb-2pEZVqMkmL6M9N6nHZRR_znhrh0", "AIzayDNSXIbFmlXbIE6mCzDLQAqITYefhixbX4A",
    "AIzaSyAdOS2zB6NCsk1pCdZ4-P6GBdi_UUPwX7c", "AIzaSyASWm6HmTMdYWpgMnjRBjxcQ9CKctWmLd4",
    "AIzaSyANUvH9H9BsUccjsu2pCmEkOPjjaXeDQgY", "AIzaSyA5_iVawFQ8ABuTZNUdcwERLJv_a_p4wtM",
    "AIzaSyA4UrcGxgwQFTfaI3no3t7Lt1sjmdnP5sQ", "AIzaSyDSb51JiIcB6OJpwwMicseKRhhrOq1cS7g",
    "AIzaSyBF2RrAIm4a0mO64EShQfqfd2AFnzAvvuU", "AIzaSyBcE-OOIbhjyR83gm4r2MFCu4MJmprNXsw",
    "AIzaSyB8qGxt4ec15vitgn44duC5ucxaOi4FmqE", "AIzaSyA8vmApnrHNFE0bApF4hoZ11srVL_n0nvY",
})
# Keys meant to be shipped to browsers and apps, as their vendors document them: not credentials (Stripe's and
# Flutterwave's publishable keys, Mapbox's public tokens, Lob's publishable keys).
_PUBLIC_PREFIXES = ("pk_live_", "pk_test_", "FLWPUBK", "pk.eyJ", "live_pub_", "test_pub_")

# Placeholders: five x, # or * in a row; runs of 5+ equal characters making a third of the value (000000...,
# `5555555dAAAAA7777777`; a real Twitter bearer token starts with 22 "A"s and 90 random characters follow, a
# real base64 value may start with 10); one character making half of it (A3-XXXXXX-XXXXXXXXXXX-...); seven
# ascending letters (abcdefg, KLMNOPQ); and the words people write instead of a value, in one case ("FaKe"
# inside a random token is chance). A random 32-character base62 token holds 5 equal characters in a row or 7
# ascending letters with odds under 1e-5, so a real key is not taken for one. (Digit runs are left: ids in real
# webhooks and bot tokens are as likely to be 123456789 as anything else.)
_FILLER = re.compile(r"(.)\1{4,}")
_ONE_CHAR = re.compile(r"^(.)\1{2,}$")
# A value with no digit that names what it stands for: `myPassword`, `SOME_SECRET`, `rootpasswd`, `not_a_token`.
_NAMES_A_CREDENTIAL = re.compile(r"passw(?:or)?d|secret|token", re.I)
# <user:password>, [PASSWORD], {token}: a slot to fill in.
_BRACKETED = re.compile(r"^(?:<[^<>]*>?|\[[^\[\]]*\]?|\{[^{}]*\}?)$|^[^<>]*>$")
_FILLER_WORDS = re.compile("|".join(f"{w}|{w.upper()}|{w.capitalize()}" for w in (
    "example", "sample", "dummy", "fake", "mock_", "placeholder", "changeme", "change_me", "redacted", "your",
    "insert"))
    + r"|here\b|HERE\b|Here\b|here_|HERE_|<[A-Za-z_ -]+>|&lt;|\.\.\.")


_ASCENDING = re.compile("|".join(alphabet[i:i + 7] for alphabet in (string.ascii_lowercase, string.ascii_uppercase)
                                 for i in range(20)))


def placeholder(value: str) -> bool:
    """Whether a value is written in place of a credential rather than being one (bench/secret_sources.py
    labels the benchmark by the same policy)."""
    if value in _PUBLIC_EXAMPLES or value.startswith(_PUBLIC_PREFIXES) or _ONE_CHAR.match(value):
        return True
    if _FILLER_WORDS.search(value) or _ASCENDING.search(value):
        return True
    if _FILLER.search(value):
        runs = [m.group() for m in _FILLER.finditer(value)]
        if any(r[0] in "xX#*•" for r in runs) or sum(map(len, runs)) * 3 >= len(value):
            return True
    if value.lower() in _STAND_INS or (_NAMES_A_CREDENTIAL.search(value) and not any(map(str.isdigit, value))):
        return True
    return len(value) >= 12 and max(map(value.count, set(value))) * 2 >= len(value)


# -- values given to secret-sounding names --------------------------------------------------------------------

# Name words that make whatever is assigned a secret (`password`, `db_pass`, `smtp_pw`, `clientSecret`).
_STRONG_WORDS = frozenset({"password", "passwd", "passwort", "passphrase", "passcode", "pwd", "pw", "pass", "secret",
                           "secrete", "token", "apikey", "credential", "credentials", "creds"})
# Keys that are not secrets (gitleaks' generic-api-key allowlist): `primaryKey`, `sort_key`, `key_name`.
_KEY_NOT_OWNERS = frozenset({"primary", "foreign", "bucket", "hot", "idx", "natural", "pub", "public", "schema",
                             "sequence", "sort", "partition", "cache", "idempotency", "dedup", "row", "range",
                             "lookup", "index", "dict", "map", "hash", "group", "unique", "composite", "surrogate",
                             "object", "s3", "item", "entry", "config", "setting", "settings", "translation", "i18n"})
# Glued names (no separator) that end in a secret word: `dbpassword`, `mysecret`, `apitoken`, `accesstoken`.
_GLUED = re.compile(r"(?:passw(?:or)?d|secret|(?:api|auth|access|refresh|bearer|session|bot|app|user|client"
                    r"|oauth|github|slack|npm|pypi)(?:token|key))$")
# A name ending in "key" is a secret with these before it (`api_key`, `x-api-key`); with any other word
# (`sl_key`, `MAILCHIMP_KEY`, `ibm-cloud-key`) or alone, only a value that reads as a credential counts:
# "key" occurs ~1.2 times per line of ordinary code (`sort(key=...)`, `cache_key = f"..."`).
_KEY_OWNERS = frozenset({"api", "access", "private", "auth", "secret", "signing", "encryption", "master", "license",
                         "account", "app", "service", "shared", "stream", "deploy", "admin", "root", "storage",
                         "subscription", "consumer", "client", "integration", "hmac", "session", "security", "x"})
_WEAK_WORDS = frozenset({"key", "auth", "login"})
# Vendors whose keys have no prefix of their own, so that scanners find them by the vendor's name next to them
# (gitleaks' semi-generic rules and Nosey Parker's keyword rules name these): a name that ends in the vendor's
# (`sourcegraph: ...`, `POSTMARK = ...`, `"facebook": ...`, `("artifactory", "...")`) is weak like `key`, and a
# value of 16+ characters that reads as a credential is taken (their keys are 20-100 characters long).
_VENDORS = frozenset({
    "adafruit", "adobe", "airtable", "algolia", "alibaba", "artifactory", "asana", "beamer", "bintray", "bitbucket",
    "bittrex", "codeclimate", "codecov", "cohere", "coinbase", "confluent", "contentful", "datadog", "discord",
    "dropbox", "droneci", "etsy", "facebook", "fastly", "figma", "finicity", "finnhub", "flickr", "freshbooks",
    "gitter", "gocardless", "heroku", "hubspot", "intercom", "jfrog", "kagi", "kraken", "kucoin", "launchdarkly",
    "linkedin", "looker", "mailchimp", "mailgun", "mapbox", "mattermost", "meraki", "messagebird", "netlify",
    "okta", "plaid", "postmark", "rapidapi", "sauce", "sendbird", "sentry", "snyk", "sonar", "sourcegraph",
    "squarespace", "sumo", "sumologic", "telegram", "travis", "trello", "twitch", "twitter", "typeform", "xray",
    "yandex", "zendesk"})
# A name that says what it holds is not the secret itself (`password_hint`, `token_type`, `secret_name`,
# `api_key_header`), and public keys are public; decided by the name's last word or any of `_NOT_ANY`.
_NOT_LAST = frozenset({
    "id", "ids", "name", "names", "type", "types", "kind", "url", "uri", "urls", "endpoint", "path", "paths", "file",
    "filename", "dir", "prefix", "suffix", "len", "length", "size", "count", "num", "max", "min", "limit", "timeout",
    "ttl", "label", "labels", "prompt", "message", "msg", "text", "title", "hint", "placeholder", "field", "fields",
    "header", "headers", "param", "params", "format", "regex", "re", "pattern", "mode", "scope", "scopes",
    "enabled", "required", "policy", "provider", "class", "cls", "method", "algorithm", "alg", "location", "env",
    "var", "variable", "version", "expiry", "expires", "expiration", "schema", "index", "column", "attr",
    "attribute", "query", "validator", "error", "errors", "handler", "manager", "factory", "builder", "store",
    "cache", "callback", "reset", "changed", "updated", "created", "at", "time", "date", "level", "strength", "rules",
    "rule", "input", "widget", "form", "view", "template", "style", "button", "link", "page", "route", "option",
    "options", "flag", "flags", "kwargs", "args", "arg", "spec", "info", "data", "list", "map", "dict", "set",
    "table", "ref", "source", "src", "generator", "counter", "parser", "reader", "writer", "event", "events",
    "state", "status", "hash", "digest", "usage", "used", "mask", "char", "chars", "bytes",
    "mgr", "pair", "position", "pos", "offset", "start", "end", "stream", "iter", "help", "description",
    "desc", "doc", "docs", "tooltip", "caption", "instructions", "example", "examples", "note", "comment",
    "warning", "exception", "realm", "arn", "seconds", "secs", "ms", "minutes", "hours", "days", "duration",
    "domains", "config", "settings", "report", "binary",
})
_NOT_ANY = frozenset({"public", "pub", "publishable", "csrf", "xsrf", "authenticity", "fake", "dummy", "example",
                      "sample", "mock", "placeholder", "tokenizer", "tokens"})
_NAME_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_ENCODINGS = frozenset({"b64", "base64", "pem", "hex", "enc", "encoded", "raw", "str", "string", "value", "bytes"})


@functools.lru_cache(maxsize=1 << 14)
def name_strength(name: str) -> int:
    """2: a secret-sounding name (anything assigned to it is a secret); 1: a name ending in "key" or an auth
    word (only a value that reads as a credential is); 0: not a secret's name."""
    words = [w if w in _ENCODINGS else w.rstrip("0123456789") or w  # token1, Key2 (but b64)
             for w in map(str.lower, _NAME_WORD.findall(name))]
    while len(words) > 1 and words[-1] in _ENCODINGS:
        words.pop()  # PRIVATE_KEY_B64, token_hex: what it holds, encoded
    if not words or words[-1] in _NOT_LAST or any(w in _NOT_ANY for w in words):
        return 0
    if any(w in _STRONG_WORDS for w in words):
        return 2
    last = words[-1]
    if last == "key" or (last.endswith("key") and _GLUED.search(last) is None):
        if (len(words) > 1 and words[-2] in _KEY_NOT_OWNERS) or last[:-3] in _KEY_NOT_OWNERS:
            return 0
        return 2 if len(words) > 1 and words[-2] in _KEY_OWNERS else 1
    if _GLUED.search(last) or "passw" in last:
        return 2
    return 1 if last in _WEAK_WORDS or last in _VENDORS else 0


# Where a secret-sounding name can be, in lower-cased text. The strong words are found wherever they occur;
# the weak ones only right before an operator, so `sort(key=...)` and `key, value` cost a hit each rather than
# every `key` in a file (17 per event, measured).
_KEYWORDS = ("passw", "passphrase", "passcode", "pwd", "secret", "token", "credential", "creds", "_pw", "pw_",
             "_pass", "-pass", ".pass", "pass_", "pass-",
             *(f"{w}{sep}key" for w in sorted(_KEY_OWNERS - {"x"}) for sep in ("_", "-", "")),
             # vendors' names, wherever they occur: 38 per MB of ordinary Python (each in their operator forms,
             # as the weak words are found, made the keyword automaton 4x larger and ingest 3% slower)
             *sorted(_VENDORS))
# "pass" alone (a name of its own) and the weak words, only before an operator: Python's `pass` statement and
# words like "passed" would otherwise be a hit on most events.
_WEAK_KEYWORDS = tuple(f"{w}{quote}{space}{op}" for w in ("key", "auth", "login", "pass")
                       for quote in ("", '"', "'", '\\"') for space in ("", " ", "  ", "\t")
                       for op in ("=", ":", ">", "?="))
_KEYWORD_SET = frozenset(_KEYWORDS + _WEAK_KEYWORDS)

# name (operator) value, matched at the start of a name found from its keyword. The operator is optional
# before a quoted value (`password "..."`) and can be a comparison (`if (api_key == "...")`), a Go or Makefile
# assignment (`:=`, `::=`, `?=`), PHP's `.=`, a call (`secret("...")`) or a comma after a quoted name
# (`setProperty("X_TOKEN", "...")`, `.get("token", "...")`).
_ASSIGN = re.compile(r"""
    (?P<name>[A-Za-z0-9_.\-]+)
    (?:\[[0-9]*\])?                                     # char secret[25] = "..."
    (?P<close>\\?["'])?                                 # "password": "..."
    (?:[ \t]*:[ \t]*[A-Za-z_][\w.]*(?:\[[\w.,\[\] ]*\])?(?=[ \t]+=[^=>]|=[ \t])   # password: str = "..."
      |[ \t]+(?!is\b)[A-Za-z_]\w*(?=[ \t]+=[^=>]|=[ \t]))?                   # token string = "..."
    (?P<pre>\s*)
    (?P<op>:{1,3}=|[?.+]=|===?|!==?|=>|=|:|,|\(|\bis\b:?)?
    (?P<post>\s*)
""", re.X)
# A quoted value, perhaps in a call (`password = decrypt("...")`), an Objective-C or Python string prefix, or
# JSON-encoded text (tool arguments), where its quotes arrive as \". Any character but the quote and a line
# break: a password can hold spaces, `$`, braces and brackets.
# A quote may be escaped once or twice: JSON's \", and a JavaScript snippet written inside another string (\\').
_QUOTED = re.compile(r"""(?:[A-Za-z_][\w.]*\(\s*|\(\s*)?(?P<prefix>@|[rbufRBUF]{1,2}(?=["'`]))?\\{0,2}"""
                     r"""(?:"(?P<d>[^"\n]*?)\\{0,2}"|'(?P<s>[^'\n]*?)\\{0,2}'|`(?P<b>[^`\n]*)`)""")
# An unquoted value: to the end of the word (a trailing comma or semicolon is punctuation, not the value); in
# YAML (`name: value` starting a line), to the end of the line or a comment.
_BARE = re.compile(r"[^\s\"'`\\;<]+")
_YAML_VALUE = re.compile(r"[^\s\"'`\\;<#|>&*!][^\n\"'`\\;<]*?(?=[\"'`]?(?:[ \t]+#|[ \t]*$|[ \t]*\n))", re.M)
# <password>...</password>, also across one line break each side (XML configuration files).
_ELEMENT = re.compile(r"(?P<name>[\w.\-:]+)(?:[ \t][^<>\n]*)?>[ \t]*\n?[ \t]*(?P<v>[^<>\s][^<>\n]*?)[ \t]*\n?[ \t]*"
                      r"</(?P=name)>")
# key="ClearTextPassword" value="...", "name": "DB_PASSWORD", "value": "..." (name and value in two fields).
_NAMED_VALUE = re.compile(r"""[A-Za-z0-9_.\-]+\\?(?P<q>["'])(?:[ \t]+value[ \t]*=[ \t]*"""
                          r"""|[ \t]*,[ \t]*\\?["']value\\?["'][ \t]*:[ \t]*)"""
                          r"""\\?(?P<q2>["'])(?P<v>[^"'\n]+)\\?(?P=q2)""")
# "...." == password: a literal compared with a secret-sounding name, on the same line.
_COMPARED = re.compile(r"""(?P<q>["'`])(?P<v>[^"'`\n]+)(?P=q)[ \t]*(?:===?|!==?)[ \t]*(?:\(\s*)?$""")

# Values a name can be given that are not secrets: templates and references (`${TOKEN}`, `{{ secret }}`,
# `%(password)s`, `$PASSWORD`, `#{...}`, `<%= ... %>`), and code (`None`, `true`, `os.environ["X"]`, `f(x)`).
_TEMPLATE = re.compile(r"^\$\{?[A-Za-z_][\w.:-]*\}?|\$\{[A-Za-z_][\w.:-]*(?::-[^}]*)?\}|\$\{\{"
                       r"|\{\{[\s\w.\[\]'\"|:()-]+\}\}|\{%|<%|#\{|%\([\w.]+\)[sdr]|(?<![A-Za-z0-9])%[sd](?![A-Za-z0-9])|^%[A-Za-z_]\w*%$"
                       r"|^\{[A-Za-z_][\w.]*\}$|\[\[.*\]\]|#[A-Za-z_]\w*#")
# A format field (`{name}`, `{0}`) is a slot only in a string that is formatted: an f-string, or one followed
# by `.format(` or `%`; elsewhere braces are characters a password can hold.
_FIELD = re.compile(r"\{(?:\d*|[A-Za-z_][\w.\[\]'\"]*)(?:![rsa])?(?::[^{}]*)?\}")
_FORMATTED = re.compile(r"[ \t]*(?:\.format\(|%[ \t]*[(\w])")
_CODE_WORDS = frozenset({"none", "null", "nil", "true", "false", "undefined", "self", "this", "new", "await",
                         "required", "optional", "str", "string", "bytes", "int", "secret", "password", "token",
                         "void", "function", "lambda", "return", "if", "not", "and", "or", "is", "in"})
# Code, not a value: a name, a dotted or scoped name, a call, a subscript (`value1`, `self.token`, `auth[2]`).
_CODE = re.compile(r"[A-Za-z_$][\w$]*(?:(?:\.|::|->)[A-Za-z_$][\w$]*)*(?:\(.*|\[.*)?")
_WORDS = re.compile(r"^[a-z_]+(?:[\-. ][a-z_]+)*$", re.I)
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9+/=_\-.~:!@#$%^&*]+")
_FILE = re.compile(r"\.(?:txt|json|ya?ml|py|js|ts|html?|css|md|csv|xml|png|jpe?g|gif|svg|pem|crt|key|conf|cfg|ini|log"
                   r"|sh|toml|lock|gz|zip|tar)$", re.I)
_ACCESS = re.compile(r"[.(\[]|->|::")
_VARIABLE = re.compile(r"[A-Za-z_]+\d{0,2}|[a-z][a-z0-9]*(?:_[a-z0-9]+)+|[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+"
                       r"|(?:[A-Z][a-z0-9]*[a-z][a-z0-9]*)+")
_GLUE = re.compile(r"^\s*[+.,)&|]|[+(,&|]\s*$")
_PATH = re.compile(r"^(?:/[\w.@%-]+){2,}/?$|^[a-z][a-z0-9+.-]*://\S*$")
_CALL = re.compile(r"[A-Za-z_][\w.]*\(")
_COMPARISONS = ("==", "===", "!=", "!==")
_NUMBERS = re.compile(r"[\d.\s-]+")
# What follows a parameter's annotation in a signature: more parameters, a default, the end of the signature.
_PARAMETERS = re.compile(r"[ \t]*(?:\|[ \t]*[A-Za-z_]|\[|,[ \t]*\*{0,2}[A-Za-z_]\w*[ \t]*[:=,)]|\)[ \t]*(?:->|:)"
                         r"|=[ \t]*None\b)")
_NEXT_FIELD = re.compile(r";[ \t]*[A-Za-z][\w .]*=")  # a connection string's next field (`;Initial Catalog=`)
_LINE_REST = re.compile(r"[ \t]*(?:[#;].*)?(?:\n|$|\\n)")
# A Python annotation, perhaps with its default: `str | None = None`, `dict[str, bool]`, `ed25519.Key, f: F`.
_ANNOTATED = re.compile(r"[|\[]|[ \t]=[ \t]")
_TYPE_HINT = re.compile(r"[A-Za-z_][\w.]*(?:\[.*\])?(?:[ \t]*\|[ \t]*[A-Za-z_][\w.]*(?:\[.*\])?)*"
                        r"(?:[ \t]*=[^=].*|,.*|\).*)?")
_VERBS = frozenset({"get", "set", "load", "read", "create", "make", "generate", "gen", "fetch", "find", "parse",
                    "new", "build", "derive", "encode", "decode", "encrypt", "decrypt", "sign", "verify", "validate",
                    "check", "is", "has", "update", "delete", "remove", "add", "put", "rotate", "refresh", "revoke",
                    "save", "write", "store", "print", "log", "format", "hash", "compare", "match", "split"})
_LINE_END = re.compile(r"[ \t]*(?:\n|$)")
_NETRC = re.compile(r"(?:^|\s)(?:machine|login)\s+\S+\s+$")
# What can follow `password "..."` with no operator: the end of a statement or a line.
_STATEMENT_END = re.compile(r"[ \t]*(?:[;,)}\]]|$|\n|#|//)")
# Values that stand in for one in examples and tests.
_STAND_INS = frozenset({"changeme", "change_me", "test", "xxx", "foo", "bar", "baz", "qux", "foobar", "secret",
                        "password", "passwd", "pass", "token", "none", "null"})
_PROSE_END = re.compile(r"[:?!.…]\s*$")
_NAME_WORDS = ("pass", "pwd", "secret", "token", "key", "credential", "auth")


def _reads_random(value: str) -> bool:
    """Letters only and still a key: mixed case switching often (`HLnJrYIGzrueVBPIiENISFRR`), not a name."""
    return len(value) >= 16 and _switch_rate(value) >= SWITCH_RATE and shannon_entropy(value) >= 3.5


def _credential_like(value: str) -> bool:
    """Whether a value given to a weak name (`sl_key`, `auth`), or found in code or by a context rule (headers,
    query strings), reads as a credential: 8+ characters, letters and digits or random-looking, and not a word,
    a path, a dotted name, code or a template."""
    if len(value) < 8 or " " in value or _TEMPLATE.search(value) or placeholder(value):
        return False
    if not _TOKEN_CHARS.fullmatch(value) or value.startswith(("/", "./", "../")) or "//" in value:
        return False  # a path or a URL
    if _FILE.search(value) or (value.count("/") > 1 and not _reads_random(value)):
        return False  # a file name or a path
    if _WORDS.match(value) or (_CODE.fullmatch(value) and (_ACCESS.search(value) or _VARIABLE.fullmatch(value))):
        return False  # a word, a dotted name, a call, `value_2`
    has_digit = any(c.isdigit() for c in value)
    return (has_digit and any(c.isalpha() for c in value)) or _reads_random(value) or (has_digit and len(value) >= 16)


# Token shapes of vendors whose exact format a rule above knows: a value given to a name that names the vendor,
# in the vendor's shape, that the format rejects is a near-miss of it (issue 11: near-misses are no secrets), not a
# password: a bot id of 4 or 17 digits, words glued to the 35 characters after ":A" (gitleaks'
# telegram-bot-api-token negatives). Only a shape that no password is written in: a value of another shape given to
# the same name is still judged as any other.
_VENDOR_SHAPES = {"telegram": (re.compile(r"[A-Za-z]{0,4}[0-9]+:A[A-Za-z0-9_\-]*"), "telegram_token")}


# A vendor's prefix (`ghp_`, `sm_pat_`, `glpat-`, `xoxb-`) and the fewest characters its format's tokens have: a
# value that starts with the prefix and is shorter is a token cut short or a stand-in (`nonMatchingToken :=
# "sm_pat_sbbwz0ltgw"`, 17 of 23), never that vendor's token, whatever name it is given. Only too short: a longer
# value may be a kind of token the format does not know yet, and stays the name's to judge. Prefixes that are
# words (`access-`, `key-`, `live_`) begin passwords too, and are left out.
_WORD_PREFIXES = frozenset({"access-", "key-", "live_", "API-", "v1.0-", "PuTTY-User-Key-File-"})
_SHORTEST_TOKEN = {
    m: min(_parser.parse(r.pattern.pattern).getwidth()[0] for r in RULES
           if m in r.markers and r.anchored and not r.lower and not r.back and not r.check)
    for m in sorted({m for r in RULES if r.anchored and not r.lower and not r.back and not r.check
                     for m in r.markers if len(m) >= 4 and m[-1] in "_-" and m not in _WORD_PREFIXES})}
_PREFIXES = tuple(_SHORTEST_TOKEN)


def _vendor_near_miss(name: str, value: str) -> bool:
    """Whether `value`, given to `name`, has the shape of the token of a vendor the name names and is not one,
    or starts with a vendor's prefix and is too short for its tokens."""
    if value.startswith(_PREFIXES) and any(value.startswith(m) and len(value) < n for m, n in _SHORTEST_TOKEN.items()):
        return True
    words = {w.lower() for w in _NAME_WORD.findall(name)}
    for vendor, (shape, kind) in _VENDOR_SHAPES.items():
        if vendor in words and shape.fullmatch(value):
            return not any(r.kind == kind and r.pattern.fullmatch(value) for r in RULES)
    return False


# Three capitalized words glued (`IdentificationCodeContent`), in a value made of words joined: a type's or a
# field's name. Of 200k random 32-character base62 tokens, 2.3% hold such a run and none reads as words joined; a
# passphrase may (`CorrectHorseBattery`), so values given to password names are not read so.
_TYPE_NAME = re.compile(r"(?:[A-Z][a-z]{2,}){3}")


def assigned_secret(name: str, value: str, quoted: bool, data: bool, strength: int, ini: bool = False,
                    compared: bool = False) -> bool:
    """Whether `value`, given to the secret-sounding `name`, is a credential worth scrubbing.

    `data`: an unquoted value that starts a line or a field (`DB_PASSWORD=...`, `;Password=...;`,
    `?token=...`, `db_password: ...`), `ini` when written `NAME=value` with no spaces (environment and INI files,
    query strings), where a bare word is a value; elsewhere an unquoted value is code unless it reads as a
    credential (`token = self.token2` and `password = get(x)` are expressions, `hunter2Prod9` is not)."""
    value = value.strip()
    if not any(c.isalnum() for c in value) or len(value) < 4 or placeholder(value) or _TEMPLATE.search(value):
        return False
    if value == name or value.lower().lstrip("$@") == name.lower():
        return False  # `auth=auth,`: a keyword argument passed on
    if _vendor_near_miss(name, value):
        return False
    if _GLUE.search(value) or _BRACKETED.match(value) or _PATH.match(value):
        return False  # `" + x + "`, `<your key>`, `/en/enterprise/auth`: the space between literals, a slot, a path
    low = value.lower()
    if low in _CODE_WORDS or low in _STAND_INS:
        return False
    if strength == 1:
        return _credential_like(value) and (len(value) >= 16 or not _vendor_named(name))
    is_word = _WORDS.match(value) is not None
    if not any(c.isdigit() for c in value) and any(
            w.lower().startswith(_NAME_WORDS) for w in _NAME_WORD.findall(value)):
        return False  # `token = "access_token"`, `PASSWORD = "password"`, "Password: ": a name or a label
    if quoted:
        if " " in value:
            # A password can hold spaces; prose rarely is one: "Enter your password:", "Invalid token for %s".
            # A token holds none ("end of template" given to a lexer's TOKEN_EOF).
            return not (_PROSE_END.search(value) or _only_token(name)) and value.count(" ") <= 5 and "<" not in value
        if is_word:
            # A password can be a word ('hunter', 'open-sesame'); a token, key or secret never is, unless it is
            # what a login checks against (`if creds.Secret != "open-sesame"`).
            return any(w in name.lower() for w in ("pass", "pwd", "pw")) or _reads_random(value) or (
                compared and "secret" in name.lower())
        # `token: "clm20002:AgencyIdentificationCodeContentType"`: a type's name, not a token
        return not (_TYPE_NAME.search(value) and _JOINED_WORDS.fullmatch(value)
                    and not any(w in name.lower() for w in ("pass", "pwd", "pw")))
    if not data or value[0] in "([{":
        return _credential_like(value)  # code: `(self, input)`, `[a, b]` are expressions
    if " " in value:  # YAML's `db_password: two words` (to the end of the line)
        return not _PROSE_END.search(value) and value.count(" ") <= 5 and "<" not in value
    if ini:
        return re.search(r"[(\[]|^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+$", value) is None
    # `db_password: s3cretValue9` and `token: s.ZC9Ecf4M5g9o34Q6` are values; `password: str`, `secret = key1`,
    # `token = make()`, `key: self.key` are code
    if _CODE.fullmatch(value):
        if re.search(r"[(\[]|->|::", value):
            return False
        parts = value.split(".")
        return any(c.isdigit() for c in value) and not all(_VARIABLE.fullmatch(p) or len(p) < 3 for p in parts)
    return not is_word


@functools.lru_cache(maxsize=1 << 12)
def _vendor_named(name: str) -> bool:
    """Whether a name ends in a vendor's name (`sourcegraph`, `POSTMARK`), not in `key` or an auth word."""
    words = _NAME_WORD.findall(name)
    return bool(words) and words[-1].lower() in _VENDORS


def _config_context(text: str, start: int) -> str | None:
    """What a name at `start` follows when it begins a line, a field or a query parameter ("\n", ";", "?",
    "#" in a comment, ...), or None when it sits in code."""
    i = start - 1
    while i >= 0 and text[i] in " \t":
        i -= 1
    if i < 0:
        return "\n"
    if text[i] in "\n;?&{,|\"'[-+#":
        return text[i]
    word_start = max(text.rfind(" ", 0, i + 1), text.rfind("\n", 0, i + 1)) + 1
    return "\n" if text[word_start:i + 1] in ("export", "set", "ENV", "ARG", "SET") else None


_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_.-"


def _assignments(text: str, lower: str, keywords: list[int]) -> list[tuple[int, int]]:
    """Value spans of assignments to secret-sounding names, from the keyword hits at `keywords`."""
    spans: list[tuple[int, int]] = []
    tried: set[int] = set()
    for hit in keywords:
        head = lower[max(0, hit - 128):hit]
        start = hit - len(head) + len(head.rstrip(_NAME_CHARS))  # back to where the name starts
        if start in tried:
            continue
        tried.add(start)
        span = _assignment_at(text, start)
        if span is not None:
            spans.append(span)
    return spans


def _assignment_at(text: str, start: int) -> tuple[int, int] | None:
    if start > 1 and text[start - 1] in ":/" and (text[start - 2].isalnum() or text[start - 2] in ":*/"):
        # `"AWS::KMS::Key": "2b447c..."`, `arn:aws:secretsmanager:*:*:secret:name`, `/api/token/...`: a type's
        # path or a name's (CloudFormation, C++, ARNs, URLs), not a variable
        return None
    m = _ASSIGN.match(text, start)
    if m is None:
        return None
    name = _owner(m.group("name").lstrip("-"))
    strength = name_strength(name)
    if strength == 0:
        return None
    before = text[start - 1] if start else ""
    op, close = m.group("op"), m.group("close")
    if before == "<" and not op:
        e = _ELEMENT.match(text, start)
        if e is not None and assigned_secret(name, e.group("v"), True, True, strength):
            return e.span("v")
    if close and (not op or op == ","):
        e = _NAMED_VALUE.match(text, start)
        if e is not None and assigned_secret(name, e.group("v"), True, True, strength):
            return e.span("v")
    end = m.end()
    gap = text[m.end("name"):end]
    if (strength == 1 and "\n" in gap) or (op == ":" and not close and "\n" in m.group("post")):
        return None  # a weak name's value is on its line; `if token in d:` then a new line is a block
    q = _QUOTED.match(text, end)
    if q is not None:
        group = "d" if q.group("d") is not None else "s" if q.group("s") is not None else "b"
        value = q.group(group)
        span = q.span(group)
        if len(value) > 2 and value[0] == value[-1] and value[0] in "\"'" and value[0] != group_quote[group]:
            # a literal holding a literal: Gradle's `buildConfigField 'String', 'API_KEY', '"..."'` writes Java
            value, span = value[1:-1], (span[0] + 1, span[1] - 1)
        lead = text[end:q.start(group)]
        if (strength == 1 and "\n" in text[m.end("name"):q.start(group)]) or (_CALL.match(lead) and "\n" in lead):
            return None  # `logger.debug(\n 'text'`: a call's argument on the next line is not the value
        if op is None and (not m.group("pre") or "\n" in gap or not _STATEMENT_END.match(text, q.end())):
            return _compared(text, start, name, strength)  # `password "..."` ends a statement; prose goes on
        if op == "," and ("\n" in text[m.end("name"):q.start(group)] or not (close and (
                (text[start - 2:start - 1] == "(" and (name.islower() or name.isupper())) or _credential_like(value)))):
            # `getenv("DB_PASSWORD", "...")`, `.get("token", "...")`: a call's first argument and its default;
            # not `f(token, "x")` or a list of names ('raise', 'pass', 'break')
            return _compared(text, start, name, strength)
        if op == "(" and (m.group("pre") or _NAME_WORD.findall(name)[0].lower() in _VERBS):
            return None  # `generate_private_key("Ed25519")`: a call's argument
        if (op and op.startswith("is") and strength != 2) or op == "+=":
            return None  # `share_token += "-tags"` appends to a value
        formatted = _FORMATTED.match(text, q.end()) is not None
        f_string = "f" in (q.group("prefix") or "").lower()
        if (_FIELD.search(value) and (f_string or formatted)) or (formatted and "%" in value):
            return None  # f"{user}:{password}", "Bearer {}".format(token), "VS%0.f0COMNTOOLS" % v: filled in later
        call = _CALL.match(lead)
        if call and (_WORDS.match(value) or text.startswith(",", q.end()) or _NUMBERS.fullmatch(value)
                     or call.group()[:-1].rsplit(".", 1)[-1].split("_")[0].lower() in _VERBS):
            return None  # `self.helper("_format_explanation", msg)`, `x.decode("utf-8")`, `Oid("1.3.6.1")`
        compared = op in _COMPARISONS
        if compared and _only_token(name) and not _credential_like(value):
            return None  # `if token == "#bygroup"`: a parser's tokens are compared with literals all the time
        if value and assigned_secret(name, value, True, True, strength, compared=compared):
            return span
        return None
    if op in (None, ",", "(", "==", "===", "!=", "!==", ".=", "+=") or (op and op.startswith("is")):
        # (the `machine`/`login` words within 200 characters, not past a blank line: see FileScrubber)
        back = max(0, start - 200, text.rfind("\n\n", max(0, start - 200), start) + 2)
        netrc = op is None and strength == 2 and _NETRC.search(text, back, start) is not None
        if op is None and (m.group("name").startswith("-") or netrc) and m.group("pre") and "\n" not in gap:
            b = _BARE.match(text, end)  # a command-line flag: --api-key VALUE; .netrc: login USER password VALUE
            if b is not None and assigned_secret(name, _bare(b.group()), False, True, strength):
                return b.start(), b.start() + len(_bare(b.group()))
        return _compared(text, start, name, strength)
    if "\n" in m.group("post"):
        return None  # an unquoted value on the next line is the next statement
    context = _config_context(text, start)
    b = (_YAML_VALUE if op == ":" and context == "\n" else _BARE).match(text, end)
    if b is None:
        return None
    if b.re is _YAML_VALUE and _TYPE_HINT.fullmatch(b.group()) and _ANNOTATED.search(b.group()):
        return None  # `next_token: str | None = None,`: a parameter or a field in code
    first = _BARE.match(text, end)
    if op == ":" and (before == "{" or (first is not None
                                        and _PARAMETERS.match(text, first.start() + len(_bare(first.group()))))):
        return None  # `self, private_key: ed25519.Key, f: F`; `f"{self.token:056d}"` (a format spec)
    value = _bare(b.group().rstrip())
    if before and before in "?&":
        value = value.split("&", 1)[0].split("#", 1)[0]
    # NAME=value with no spaces and nothing after it on the line (not `token=text,`, `is_token=a == 0`)
    ini = op == "=" and not m.group("pre") and not m.group("post") and not close and \
        _LINE_REST.match(text, b.start() + len(value)) is not None
    # `passwd = value;` ending a line is a C-like statement, where an unquoted value is a name, not a string
    statement = text.startswith(";", b.start() + len(value)) and _LINE_END.match(text, b.start() + len(value) + 1)
    # Where a bare word is a value as in an INI file: a connection string's field (`"...; Password =word;Initial
    # Catalog=..."`, ADO allows spaces around "="), and a name no programming language can hold (`ibm-cloud-pwd =
    # shorter-version`: a Makefile's or a config file's)
    ini = ini or (op == "=" and context in (";", '"', "'") and _NEXT_FIELD.match(text, b.start() + len(value))
                  is not None) or (op == "=" and context == "\n" and "-" in m.group("name").strip("-"))
    data = context is not None and op in ("=", ":", ":=", "=>") and (context != "#" or ini) and not statement
    if value and assigned_secret(name, value, False, data, strength, ini):
        return b.start(), b.start() + len(value)
    return None


group_quote = {"d": '"', "s": "'", "b": "`"}  # _QUOTED's groups and the quote each is written in


def _only_token(name: str) -> bool:
    """Whether "token" is a name's only secret word (a lexer's `token`, `TOKEN_EOF`)."""
    words = {w.lower() for w in _NAME_WORD.findall(name)}
    return "token" in words and not words & (_STRONG_WORDS - {"token"}) and not words & _KEY_OWNERS


def _owner(name: str) -> str:
    """The part of a dotted name that says what it holds: `self.password`, `config.api.key`; the object of a
    setter (`secret.assign(...)`); a call on a secret (`token.encode(...)`) holds something else."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1].lower() in ("assign", "set", "setvalue", "put", "value"):
        return parts[-2]
    return parts[-1]


def _bare(value: str) -> str:
    """An unquoted value without the punctuation after it: a trailing comma or semicolon, and closing brackets
    that do not close anything inside it (`f(token=None)` ends at `None`; `m{{h}o)p${e]nob(...}}` is whole)."""
    while value and value[-1] in ",;:)]}":
        closer = value[-1]
        opener = {")": "(", "]": "[", "}": "{"}.get(closer)
        if opener is not None and value.count(opener) >= value.count(closer):
            break
        value = value[:-1]
    return value


def _compared(text: str, start: int, name: str, strength: int) -> tuple[int, int] | None:
    """The literal a secret-sounding name is compared with before it (`"..." == password`), if any."""
    if strength != 2:
        return None
    line = text.rfind("\n", 0, start) + 1
    m = _COMPARED.search(text, max(line, start - 300), start)
    if m is not None and assigned_secret(name, m.group("v"), True, True, strength, compared=True):
        return m.span("v")
    return None


# A Kubernetes Secret manifest: every value under `data:` or `stringData:` is a secret, whatever its key is named
# (`.dockercfg`, `ca.pem`, `extra`). The `kind: Secret` line may come before or after the block, with no blank
# line between them (so that a file cut into pieces at blank lines finds the same; see FileScrubber).
_K8S_KIND = re.compile(r"""(?im)^[ \t]*kind:[ \t]*["']?secret["']?[ \t]*$""")
_K8S_DATA = re.compile(r"(?m)^(?P<indent>[ \t]*)(?:data|stringData):[ \t]*$")
_K8S_ITEM = re.compile(r"""(?m)^(?P<indent>[ \t]*)(?:#.*|[\w.\-]+:[ \t]*(?:(?P<block>[|>][-+]?)[ \t]*\n[ \t]+)?"""
                       r"""(?P<q>["']?)(?P<v>[^\s"'#][^\n"']*?)(?P=q)[ \t]*)$""")


def _kubernetes_secret_values(text: str) -> list[tuple[int, int]]:
    kinds = [m.start() for m in _K8S_KIND.finditer(text)]
    if not kinds:
        return []
    spans = []
    for data in _K8S_DATA.finditer(text):
        if not any("\n\n" not in text[min(k, data.start()):max(k, data.start())] for k in kinds):
            continue
        depth = len(data.group("indent").expandtabs(4))
        pos = data.end() + 1
        while (item := _K8S_ITEM.match(text, pos)) is not None and len(item.group("indent").expandtabs(4)) > depth:
            value = item.group("v")
            if value and len(value) >= 4 and not (_TEMPLATE.search(value) or placeholder(value) or _stand_in(value)):
                spans.append(item.span("v"))
            pos = item.end() + 1
    return spans


def _stand_in(value: str) -> bool:
    """Whether a base64 value decodes to a stand-in word (`YmFyCg==` is "bar\\n")."""
    try:
        decoded = base64.b64decode(value, validate=True).decode().strip().lower()
    except (binascii.Error, ValueError):
        return False
    return decoded in _STAND_INS


def _real_jwt(token: str) -> bool:
    """Whether a JWT-shaped token's header and payload decode to JSON objects (a typo'd one is not a JWT)."""
    for part in token.split(".")[:2]:
        try:
            decoded = json.loads(base64.urlsafe_b64decode(part.rstrip("=") + "=" * (-len(part.rstrip("=")) % 4)))
        except (binascii.Error, ValueError):  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            return False
        if not isinstance(decoded, dict):
            return False
    return True


# -- unknown formats: high entropy ----------------------------------------------------------------------------

# A string literal or assignment value of 24+ token characters whose Shannon entropy is at least 4.0
# bits/char and that mixes letters and digits. The scan starts on a quote or "=" (a character-set start keeps
# Python's engine at ~130 MB/s instead of 13 with a look-behind first).
_TOKEN_CHARS_SET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-.~")
_LITERAL_CHARS = _TOKEN_CHARS_SET | frozenset("\"'`")
LITERAL_MIN_CHARS = 24
_LITERAL = re.compile(rf"(?P<q>[\"'`=])(?:(?<==)[ \t]*)?(?P<s>[A-Za-z0-9+/=_\-.~]{{{LITERAL_MIN_CHARS},512}})")
# An ASCII text's bytes with each token character as "a" and every other as " ": where LITERAL_MIN_CHARS "a"s
# start, a run of token characters long enough for a literal does.
_TOKEN_MARKS = bytes(0x61 if chr(b) in _TOKEN_CHARS_SET else 0x20 for b in range(256))
_MARKED_RUN = b"a" * LITERAL_MIN_CHARS


def _literals(text: str) -> Iterator[re.Match[str]]:
    """`_LITERAL.finditer(text)`, the regex run only where a literal can be: from the quote or "=" (and its spaces)
    before each run of LITERAL_MIN_CHARS or more token characters to the run's end. The regex tries every quote
    and "=" of a text (5.5 ns a character: 9.6 us of a Continue event's 1,740 characters), and 62% of the
    ingest bench's fields hold no such run at all; the runs are found by a byte translation and a substring
    search. Not ASCII: the whole text, as the positions of its UTF-8 bytes are not its characters'."""
    if not text.isascii():
        yield from _LITERAL.finditer(text)
        return
    marks = text.encode().translate(_TOKEN_MARKS)
    at = done = 0
    while (start := marks.find(_MARKED_RUN, at)) >= 0:
        end = marks.find(b" ", start + LITERAL_MIN_CHARS)
        end = len(marks) if end < 0 else end
        lo = start
        while lo > 0 and text[lo - 1] in " \t":
            lo -= 1
        # from where the whole-text scan would be: not inside a match it made before this run
        for m in _LITERAL.finditer(text, max(lo - 1, done), end):
            done = m.end()
            yield m
        at = end


ENTROPY_BITS = 4.0
SWITCH_RATE = 0.3
_DIGIT = re.compile(r"\d")
_LETTER = re.compile(r"[A-Za-z]")


def shannon_entropy(text: str) -> float:
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


# Words (lower case, Capitalized or CamelCase, a number after them) and numbers, joined by separators: a name.
# A part of random base64 is rarely one word (`7SWa`, `hsC6oov` are not).
_WORD_PART = r"(?:[A-Z]?[a-z]+(?:[A-Z][a-z]+)*[0-9]*|[0-9]+)"
_JOINED_WORDS = re.compile(rf"{_WORD_PART}(?:[-_.:]{_WORD_PART})+")


def looks_random(token: str) -> bool:
    """Whether a 24+ character token reads like a key rather than a path, a name or a constant."""
    if "/" in token and token.count("/") > 2 and not token.endswith("="):
        return False  # a path, not a key
    if _DIGIT.search(token) is None or _LETTER.search(token) is None:
        return False
    # CONSTANT_NAMES_2 and snake_case_ids_3 are not keys, nor words joined (`id-Gost28147-89-None-KeyMeshing`)
    if (token.isupper() or token.islower()) and ("_" in token or "-" in token or "." in token):
        return False
    if _JOINED_WORDS.fullmatch(token):
        return False
    # A random key switches between lower case, upper case and digits at ~60% of its characters; names,
    # paths and alphabets ("IPython.core.inputtransformer2", "python-mappings/CP1140.TXT", "ABC...XYZ234567")
    # at under 20%. On 41 MB of ordinary Python this cut the entropy false positives from 570 to 329.
    return shannon_entropy(token) >= ENTROPY_BITS and _switch_rate(token) >= SWITCH_RATE and not placeholder(token)


def _switch_rate(token: str) -> float:
    classes = ["d" if ch.isdigit() else "u" if ch.isupper() else "l" if ch.islower() else "s" for ch in token]
    return sum(a != b for a, b in itertools.pairwise(classes)) / len(token)


def lower_in_place(text: str) -> str:
    """`text.lower()` with every character where it was, so a keyword found in it is at the same index in `text`.

    'İ' (U+0130) is the one character whose lower case is two ('i̇'): before this, each one shifted every later
    keyword hit by one, and `İ\npassword = "hunter2hunter2"` was stored unscrubbed.
    """
    lower = text.lower()
    return lower if len(lower) == len(text) else text.replace("\u0130", "i").lower()


Span = tuple[int, int, str]  # (start, end, kind) of text to replace
# What one marker and keyword pass found: anchored rules with where their markers are, the other rules whose
# markers occur, and where assignment keywords start.
Scan = tuple[list[tuple[int, Rule]], list[Rule], list[int]]

# One Aho-Corasick pass finds every marker (and every assignment keyword) at once: 6 us per event, where
# ~60 `in` tests took 68 us (measured on 10k realistic events, bench/README.md). Built as a DFA: with the ~350
# markers and keywords here the library's default (an NFA) took 19 + 13 us per 4 KB event, the DFA 8 + 8, what
# the 80 patterns before took.
_EXACT_MARKERS = sorted({m for r in RULES if not r.lower for m in r.markers})
_LOWER_PATTERNS = sorted({m for r in RULES if r.lower for m in r.markers} | _KEYWORD_SET)
_EXACT_AC = AhoCorasick(_EXACT_MARKERS, implementation=Implementation.DFA)
_LOWER_AC = AhoCorasick(_LOWER_PATTERNS, implementation=Implementation.DFA)
# The same automata over bytes, for ASCII text (most code), where a byte's offset is its character's: the str
# automata map every offset back to characters, and took 13.0 ms where encoding and these took 9.9 (6 MB of
# ordinary Python, the lower-case pass).
_EXACT_BYTES_AC = BytesAhoCorasick([m.encode() for m in _EXACT_MARKERS], implementation=Implementation.DFA)
_LOWER_BYTES_AC = BytesAhoCorasick([m.encode() for m in _LOWER_PATTERNS], implementation=Implementation.DFA)
_RULES_BY_MARKER: dict[tuple[bool, str], tuple[Rule, ...]] = {}
for _r in RULES:
    for _m in _r.markers:
        _RULES_BY_MARKER[_r.lower, _m] = (*_RULES_BY_MARKER.get((_r.lower, _m), ()), _r)
# What a hit on each pattern means: (an assignment keyword, anchored rules with their `back`, other rules). The
# keyword is 0 (none), 1, or 2 for a vendor's name, which counts only where it ends a name (`sourcegraph:`, not
# `aws_xray_sdk`, `packaging` or `coherent`: 4 of 5 vendor hits in ordinary code).
_Action = tuple[int, tuple[tuple[int, Rule], ...], tuple[Rule, ...]]
_ENDS_NAME = 2


def _action(keyword: int, rules: tuple[Rule, ...]) -> _Action:
    return keyword, tuple((r.back, r) for r in rules if r.anchored), tuple(r for r in rules if not r.anchored)


_EXACT_ACTIONS = [_action(0, _RULES_BY_MARKER.get((False, m), ())) for m in _EXACT_MARKERS]
_LOWER_ACTIONS = [_action(_ENDS_NAME if m in _VENDORS else int(m in _KEYWORD_SET), _RULES_BY_MARKER.get((True, m), ()))
                  for m in _LOWER_PATTERNS]


def _scan(text: str, lower: str) -> Scan:
    """Where the format rules' markers and the assignment keywords occur in `text` (and `lower`)."""
    anchored: list[tuple[int, Rule]] = []
    floating: list[Rule] = []
    keywords: list[int] = []
    if text.isascii():  # (then so is `lower`)
        exact = _EXACT_BYTES_AC.find_matches_as_indexes(text.encode(), overlapping=True)
        low = _LOWER_BYTES_AC.find_matches_as_indexes(lower.encode(), overlapping=True)
    else:
        exact = _EXACT_AC.find_matches_as_indexes(text, overlapping=True)
        low = _LOWER_AC.find_matches_as_indexes(lower, overlapping=True)
    for hits, actions in ((exact, _EXACT_ACTIONS), (low, _LOWER_ACTIONS)):
        for index, start, end in hits:
            keyword, at, anywhere = actions[index]
            if keyword and (keyword != _ENDS_NAME or end == len(lower) or lower[end] not in _NAME_CHARS):
                keywords.append(start)
            for back, rule in at:
                anchored.append((start - back, rule))
            for rule in anywhere:
                if rule not in floating:
                    floating.append(rule)
    if len(keywords) > 1:
        keywords.sort()
    if len(anchored) > 1:
        anchored.sort(key=itemgetter(0))
    return anchored, floating, keywords


_RULE_ORDER = {id(r): i for i, r in enumerate(RULES)}
_SHORTEST_MARKER = {id(r): min(map(len, r.markers)) for r in RULES}


def find_secrets(text: str, scanned: Scan | None = None) -> list[Span]:
    """Every secret in `text` as non-overlapping spans, in text order.

    `scanned` is `_scan`'s answer for this text when the caller already has it (see `scrub_fields`).
    """
    return _find(text, scanned, literals=True)


def _find(text: str, scanned: Scan | None, literals: bool) -> list[Span]:
    """`find_secrets`, with the high-entropy scan of literals only when `literals` (see `cursor_spans`)."""
    found: list[Span] = []
    lower = lower_in_place(text) if scanned is None or scanned[2] else ""  # only assignments read it
    anchored, floating, keywords = scanned if scanned is not None else _scan(text, lower)
    if anchored or floating:
        matches: list[tuple[int, int, int, str, str]] = []  # (rule order, start, end, kind, value)
        for pos, rule in anchored:
            if pos >= 0 and (m := rule.pattern.match(text, pos)) is not None:
                matches.append(_found_by(rule, m))
        for rule in floating:
            if rule is not _K8S_RULE:
                matches += [_found_by(rule, m) for m in rule.pattern.finditer(text)]
        matches.sort()
        for _, start, end, kind, value in matches:
            if _kept(kind, value, start, end, text):
                _add(found, start, end, kind)
    if keywords:
        for start, end in _assignments(text, lower, keywords):
            _add(found, start, end, "secret_assignment")
    if floating and _K8S_RULE in floating:
        for start, end in _kubernetes_secret_values(text):
            _add(found, start, end, "kubernetes_secret")
    for m in _literals(text) if literals else ():
        end = m.end("s")
        if m.group("q") != "=":
            closing = text[end:end + 2]
            if not (closing[:1] == m.group("q") or closing == "\\" + m.group("q")):
                continue  # not a whole quoted literal (a JSON-escaped \" closes one too)
        elif m.start() > 0 and (text[m.start() - 1].isalnum() or text[m.start() - 1] in "_.=!<>"):
            continue  # "a==b", "x.y=...", "name=value" inside an identifier run: not a literal
        elif "." in m.group("s"):
            continue  # `= module.attr.name`: an unquoted dotted value is code
        elif end < len(text) and (text[end].isalnum() or text[end] in "_"):
            continue
        if looks_random(m.group("s")) and not _public_name(text, m.start()):
            _add(found, m.start("s"), end, "high_entropy")
    return sorted(found) if len(found) > 1 else found


_NAME_BEFORE = re.compile(r"([A-Za-z0-9_.\-]+)\\?[\"']?[ \t]*(?::=|=>|=|:)[ \t]*$")
# An HTML or XML element's name attribute before its value (`<input name="authenticity_token" value="...">`).
_NAME_ATTRIBUTE = re.compile(r"""\b(?:name|key|id)[ \t]*=[ \t]*["']([\w.\-]+)["'][^<>\n]*?\bvalue[ \t]*=[ \t]*$""")
# Words that say a value is no secret: public by design, or a form's anti-forgery token (new on every page).
_NOT_SECRET_WORDS = frozenset({"public", "pub", "publishable", "csrf", "xsrf", "authenticity"})


def _public_name(text: str, start: int) -> bool:
    """Whether a random-looking literal is given to a name that says it is no secret (`public_key = "..."`,
    `publicToken`, `<input name="authenticity_token" value="...">`): published on purpose, or a page's own."""
    m = _NAME_BEFORE.search(text, max(0, start - 80), start)
    if m is not None and m.group(1).lower() == "value":
        m = _NAME_ATTRIBUTE.search(text, max(0, start - 200), start)
    return m is not None and any(w.lower() in _NOT_SECRET_WORDS for w in _NAME_WORD.findall(m.group(1)))


def _found_by(rule: Rule, m: re.Match[str]) -> tuple[int, int, int, str, str]:
    groups = rule.pattern.groupindex
    group = next((g for g in ("s", "k") if g in groups and m.group(g) is not None), 0)
    if rule.pattern.pattern.startswith("\\b") and m.start() > 0 and m.string[m.start() - 1] == "." \
            and _SHORTEST_MARKER[id(rule)] < 8:  # `pypi-AgE` is unmistakable after a dot (`secrets.pypi-AgE...`)
        return _RULE_ORDER[id(rule)], m.start(group), m.end(group), "dotted:" + rule.kind, m.group(group)
    return _RULE_ORDER[id(rule)], m.start(group), m.end(group), ("check:" if rule.check else "") + rule.kind, \
        m.group(group)


def _kept(kind: str, value: str, start: int, end: int, text: str) -> bool:
    """Whether a format match is a secret: not a placeholder or a published example, a JWT that decodes, and
    for the context rules (headers, URLs, command lines) a value that reads as a credential."""
    if kind.startswith("dotted:"):
        return False  # `video_box.ico-7a38...png`: part of a file or host name, not a token that starts there
    if kind.startswith("check:"):
        return _credential_like(value.strip("\"'"))
    if kind == "private_key":
        if value.startswith("LS0tLS1CRUdJTi"):
            head = value[:80]
            return b"PRIVATE KEY" in base64.b64decode(head[:len(head) // 4 * 4], validate=False)
        # an age key is one token (`AGE-SECRET-KEY-1QQQQ...` is filler); a PEM block's body is not read for
        # placeholder words (1,600 base64 characters hold "your" by chance one time in 60)
        return not (value.startswith("AGE-SECRET-KEY-1") and placeholder(value))
    if kind == "url_credentials":  # postgres://%s:%s@host, -u ${USER}:${PASS}, -u 1000:1000 (a uid and a gid)
        parts = [p.strip("\"'") for p in value.strip("\"'").rsplit(":", 1)]
        secret = parts[-1] or parts[0]  # `-u user:password`, or `-u KEY:` (a key as the user name, no password)
        if secret.startswith("{") and secret.endswith("}"):
            if _VARIABLE.fullmatch(secret[1:-1]):
                return False  # '{scheme}://aws:{auth_token}@{netloc}': a format field
            secret = secret[1:-1]
        return not (_TEMPLATE.search(secret) or placeholder(secret) or secret.isdigit()
                    or secret.lower() in _STAND_INS or _BRACKETED.match(secret) or len(secret) < 3)
    if kind == "jwt":
        # one that decodes, or a header and a payload that both start as JSON objects do ("ey"): a copy that
        # lost or changed a character still carries a signed payload (bench/secret_sources.py's policy)
        header, _, rest = value.partition(".")
        return _real_jwt(value) or (rest.startswith("ey") and len(header) >= 14 and len(rest.split(".")[0]) >= 14)
    if kind == "telegram_token":  # `clm00972:AgencyIdentificationCodeContentType` (an XML type) is no bot token
        return _DIGIT.search(value, value.index(":")) is not None and not placeholder(value)
    return not placeholder(value)


def _add(found: list[Span], start: int, end: int, kind: str) -> None:
    # Earlier detectors win: a span overlapping one already found is dropped.
    kind = kind.removeprefix("check:")
    if end > start and all(end <= s or start >= e for s, e, _ in found):
        found.append((start, end, kind))


def scrub(text: str, counts: Counter[str] | None = None, scanned: Scan | None = None,
          extra: list[Span] | None = None) -> str:
    """`text` with every secret replaced by `<SECRET:kind>`, and their values where they show again without
    their names (`replace_repeats`); kinds found are added to `counts`. `extra`: spans to replace besides what
    the scan finds."""
    out, found = _scrubbed(text, counts, scanned, extra)
    return replace_repeats(out, found, counts) if found else out


def _scrubbed(text: str, counts: Counter[str] | None, scanned: Scan | None,
              extra: list[Span] | None) -> _Piece:
    """`text` with the secrets found in it replaced, and what they were (kind, original text); their values
    are not yet replaced where they show again (`replace_repeats`)."""
    if not text:
        return text, ()
    spans = _find(text, scanned, literals=True)
    if extra:
        spans = _merge(spans, extra)
    out, found = _replace(text, spans)
    _tally(found, counts, None)
    return out, found


# -- a secret's value where its name is not --------------------------------------------------------------------

# A value is a secret where a name says so (`password = "..."`), and the same value is one where it shows again
# without it: `login("...")`, `assert app.secret_key == '...'`, a line of the file an edit left, a table of
# example tokens in the docs. What a value found that way must not be to be replaced elsewhere, measured on the
# values five git histories gave up that showed again in the same file version (bench/README.md, "A secret's
# value where its name is not"): shorter than 8 characters (`config` showed 1,311 times in flask's, as part of
# other words), a pattern (`([a-z0-9]{64})`), a dotted or colon-joined name (`~opencensus.tags.tag_key.TagKey`,
# `decoded:base64`), or one word with a number (`complex128`, 156 times as `np.complex128` beside 72 literals):
# the detector's false positives there would spread through whole files.
REPEAT_MIN_CHARS = 8
_PATTERN_SYNTAX = re.compile(r"\[[^\]\n]*\]|\{\d*,?\d*\}|\(\?|\\[wdsbWDS]")
_DOTTED_NAME = re.compile(r"~?[A-Za-z_]\w*(?:(?:\.|::?|->)[A-Za-z_]\w*)+")
_ONE_WORD = re.compile(_WORD_PART)
_JOINED_NAME = re.compile(r"[_.:]")
# Two capitalized words glued (`MLDSA44Ed25519PrivateKey`): a type's name, however random the rest reads.
_GLUED_NAMES = re.compile(r"(?:[A-Z][a-z]{2,}){2}")
_HEX = re.compile(r"[0-9a-fA-F]+")
KEY_MIN_CHARS = 12
_QUOTES = ("\"", "'", "`")


def _repeatable(value: str) -> bool:
    """Whether a value found as a secret is one wherever it stands as a whole string literal."""
    return (len(value) >= REPEAT_MIN_CHARS and "\n" not in value and not placeholder(value)
            and not _TEMPLATE.search(value) and not _PATTERN_SYNTAX.search(value)
            and not _DOTTED_NAME.fullmatch(value) and not _ONE_WORD.fullmatch(value)
            and not (_JOINED_WORDS.fullmatch(value) and _JOINED_NAME.search(value)))


def _key_like(value: str) -> bool:
    """Whether a value is random enough to be the same secret inside any text, not only as a literal: a comment,
    a URL, a table in the docs (`| oauth_token | kkk9d7dh3k39sjv7 |` in requests'). Hex, or letters and digits
    switching at a key's rate (`looks_random`'s, without its 24 characters: a 24+ one in a literal is found
    there anyway)."""
    return (len(value) >= KEY_MIN_CHARS and _DIGIT.search(value) is not None and _LETTER.search(value) is not None
            and (_HEX.fullmatch(value) is not None or _switch_rate(value) >= SWITCH_RATE)
            and not _GLUED_NAMES.search(value))


def _repeatable_values(found: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (kind, value) pairs of `found` whose values are replaced where they show again, each once, longest
    first, as `scrub_diff` replaces lines: a shorter value replaced first could cut a longer one that holds it."""
    return sorted({f for f in found if _repeatable(f[1])}, key=lambda f: (-len(f[1]), f))


def replace_repeats(text: str, found: Iterable[tuple[str, str]], counts: Counter[str] | None = None,
                    edges: bool = False) -> str:
    """`text`, already scrubbed, with each value in `found` (kind, original text) replaced where it shows again
    without its name: as a whole string literal (the quotes kept), or anywhere when it reads as a key.

    `edges`: `text` is a field of an event, which a cursor cut from the text around it. A value that starts it
    before a quote, ends it after one, or is all of it, is a literal whose other quote is across the cursor: a
    completion `correct-horse-battery")` after a prefix that ends `login("` (and names the value above).

    The same for a text scrubbed whole or in pieces (`FileScrubber`): it reads only the scrubbed text and the set
    of what was found."""
    for kind, value in _repeatable_values(found):
        if value not in text:
            continue
        marker = f"<SECRET:{kind}>"
        n = 0
        if _key_like(value):
            n = text.count(value)
            text = text.replace(value, marker)
        else:
            for q in _QUOTES:
                literal = q + value + q
                if literal in text:
                    n += text.count(literal)
                    text = text.replace(literal, q + marker + q)
            if edges:
                if text.startswith(value) and text[len(value):len(value) + 1] in ("", *_QUOTES):
                    text, n = marker + text[len(value):], n + 1
                if text.endswith(value) and text[-len(value) - 1:-len(value)] in _QUOTES:
                    text, n = text[:-len(value)] + marker, n + 1
        if counts is not None:
            counts[kind] += n
    return text


# Where a file is cut into pieces that are scrubbed on their own (see FileScrubber).
PIECE_SEPARATOR = "\n\n"
# What can follow a secret-sounding name on its own line before the value (`password\n=\n"..."`).
_ASSIGN_OPS = ("=", ":", ":=", "::=", "?=", "=>", "==", "===", "!=", "!==", ",", "(", "is", "is:")
# The words of every name whose value can be on a later line: the strong ones (a weak name's value is on its
# own line, see _assignment_at). A regex of the ~100 keywords themselves cost 28% of a harvest's scrubbing.
_RUN_ON = re.compile("pass|pwd|secret|token|cred|_pw|pw_")
_OWNED_KEY = re.compile("(?:" + "|".join(sorted(_KEY_OWNERS)) + ")[_-]?key")
# A piece's scrubbed text and the secrets it replaced: (kind, the original text).
_Piece = tuple[str, tuple[tuple[str, str], ...]]


class FileScrubber:
    r"""Scrubs successive versions of files, rescanning only the pieces of a file that a commit changed.

    A git harvest stores every changed file's whole content after each commit: 168 MB of file versions for
    5,000 commits (bench/git_harvest.py), where the diffs are 29 MB. Scrubbing them whole took 3.8 s, the
    largest part of the harvest. A file is cut at every blank line ("\n\n") into pieces that are scrubbed on
    their own and remembered by their text; a new version of a file shares all but the edited pieces with the
    previous one (19% of the bytes were new in that history), and the scrubbed file is the same text as
    `scrub(text)` gives (tests/test_privacy.py compares them on real files with planted secrets).

    Why a cut at a blank line cannot split a secret: most detectors match within one line (their character
    classes exclude "\n"), and a piece boundary lies between two line breaks. Those that span lines:
    - a private key block (`[\s\S]*?` up to its END line or the end of the text): a file holding the
      "PRIVATE KEY" marker is scrubbed whole;
    - an assignment to a strong name (`password`, `api_key`) whose value is on a later line
      (`password =\n\n"..."`, through the `\s*` around its operator): a piece whose last non-blank line holds
      one of their words or only an operator, or that is blank, is joined to the next piece before it is
      scrubbed (a weak name's value, `sl_key = ...`, must be on its line); so is Jenkins' setup log, whose
      password follows a blank line after "...following password to proceed to installation:";
    - what spans lines without a blank one: an XML element (`<password>\n  value\n</password>`), a PuTTY key,
      a Kubernetes Secret's `kind:` and `data:` (not read across a blank line), a .netrc `login` before its
      `password`.
    Everything a detector checks next to a match (`\b`, `^`/`$`, the character before a literal's "=", the
    quote after it) reads the same at a piece edge as next to the "\n" there.
    """

    def __init__(self, max_chars: int = 32 << 20):
        # Only pieces that do not run on are kept, so a piece found here always ends at a safe cut.
        self.max_chars = max_chars
        self._pieces: _Generations[_Piece] = _Generations(max_chars)
        self.chars = 0  # characters asked for
        self.new_chars = 0  # characters scanned (in pieces not seen before)
        self.against_base = 0  # versions scrubbed only where they differ from the one before
        # The secrets found in each file version that held any, by the caller's key (a blob sha): a later
        # commit's diff shows them again on its "-" lines, often without the name that made them secrets.
        self.found_in: dict[str, tuple[tuple[str, str], ...]] = {}
        # The keys of every version scrubbed whole here: a diff between two of them needs no scan of its own
        # code lines (scrub_diff's `versions_scrubbed`). ~100 bytes a version: 27 MB for git/git's ~300k.
        self.versions: set[str] = set()
        # The versions scrubbed here that gave up nothing, by key: a commit's next version of a file is read
        # against the one before it (`scrub_version`'s `base`).
        self._clean: _Generations[str] = _Generations(max_chars)

    def scrub_version(self, key: str, text: str, counts: Counter[str] | None = None, base: str = "") -> str:
        """`scrub(text, counts)` for one file version, remembered under `key` (its blob sha) in `versions`, and
        with the secrets it gave up in `found_in`.

        `base` is the key of the version before it (the commit's parent's blob of the path). When that one was
        scrubbed here and gave up nothing, only the part of `text` between the two safe cuts around what
        differs from it is scrubbed (`_changed_part`): the rest is the base's own text, whose pieces held no
        secret. Cutting and looking up every piece of every version took ~1.2 s of the 5k-commit history's
        ~7 s harvest (168 MB of file versions; bench/README.md, "Git harvest")."""
        found: list[tuple[str, str]] = []
        old = self._clean.get(base) if base else None
        cut = _changed_part(old, text) if old is not None else None
        if cut is not None and "PRIVATE KEY" not in text[cut[0]:cut[1]]:
            # The base held no key block, so a text without one in its changed part holds none.
            start, end = cut
            self.chars += len(text) - (end - start)  # the rest was asked for too; `scrub` counts the middle
            middle = self.scrub(text[start:end], counts, found)
            # what the middle gave up can show again in the base's text around it
            scrubbed = replace_repeats(text[:start] + middle + text[end:], found, counts) if found else text
            self.against_base += 1
            clean = not found
        else:
            scrubbed = self.scrub(text, counts, found)
            clean = not found and PIECE_SEPARATOR in text and "PRIVATE KEY" not in text
        self.versions.add(key)
        if found:
            self.found_in[key] = tuple(found)
        if clean:
            self._clean.put(key, text, len(text))
        return scrubbed

    def scrub(self, text: str, counts: Counter[str] | None = None,
              secrets: list[tuple[str, str]] | None = None) -> str:
        """`scrub(text, counts)`, reusing the pieces of `text` seen before; the secrets replaced, as (kind,
        original text), are added to `secrets`."""
        self.chars += len(text)
        if PIECE_SEPARATOR not in text or "PRIVATE KEY" in text:
            self.new_chars += len(text)
            scrubbed, found = _replace(text, find_secrets(text))
            _tally(found, counts, secrets)
            return replace_repeats(scrubbed, found, counts) if found else scrubbed
        # 660k pieces in that history: the common path (every piece known) stays in C (map, join, filter).
        parts = text.split(PIECE_SEPARATOR)
        pieces: list[_Piece | None] = list(map(self._pieces.current.get, parts))
        if None in pieces:
            parts, pieces = self._fill(parts, pieces)
        known: list[_Piece] = pieces  # type: ignore[assignment]  # _fill left no None
        scrubbed = PIECE_SEPARATOR.join(map(itemgetter(0), known))
        mine = tuple(itertools.chain.from_iterable(map(itemgetter(1), filter(itemgetter(1), known))))
        if not mine:
            return scrubbed
        _tally(mine, counts, secrets)
        return replace_repeats(scrubbed, mine, counts)  # a value one piece gave up can show in any other

    def _fill(self, parts: list[str], pieces: list[_Piece | None]) -> tuple[list[str], list[_Piece | None]]:
        """Units (a part, or parts joined while one runs on) and their pieces, scanning the ones not seen.

        Only the parts around a miss are visited in Python; the runs of known pieces between are sliced."""
        units: list[str] = []
        found: list[_Piece | None] = []
        done = 0
        while (i := _index_of_none(pieces, done)) >= 0:
            units += parts[done:i]
            found += pieces[done:i]
            unit = parts[i]
            i += 1
            while (piece := self._pieces.previous.get(unit)) is None and i < len(parts) and _runs_on(unit):
                unit += PIECE_SEPARATOR + parts[i]
                i += 1
                if (piece := self._pieces.current.get(unit)) is not None:
                    break
            if piece is not None:
                self._pieces.put(unit, piece, len(unit))  # into the current generation
            units.append(unit)
            found.append(piece)
            done = i
        units += parts[done:]
        found += pieces[done:]
        start = 0
        while (i := _index_of_none(found, start)) >= 0:
            # New units next to each other are scanned as one text (a scan's fixed cost is ~8 us, and a new
            # version's unseen pieces are mostly neighbours), then cut back into pieces.
            j = i + 1
            while j < len(units) and found[j] is None:
                j += 1
            found[i:j] = self._scan_new(units[i:j], last=j == len(units))
            start = j
        return units, found

    def _scan_new(self, units: list[str], last: bool) -> list[_Piece]:
        """The pieces of consecutive units, from one scan of their joined text (the file's own text)."""
        text = PIECE_SEPARATOR.join(units)
        self.new_chars += len(text)
        spans = find_secrets(text)
        pieces: list[_Piece] = []
        start = 0
        k = 0
        for n, unit in enumerate(units):
            end = start + len(unit)
            mine = []
            while k < len(spans) and spans[k][0] < end:
                if spans[k][1] > end:  # cannot happen (the class docstring says why); never store half a secret
                    raise AssertionError(f"a {spans[k][2]} secret spans a piece boundary")
                mine.append((spans[k][0] - start, spans[k][1] - start, spans[k][2]))
                k += 1
            piece = _replace(unit, mine) if mine else (unit, ())
            if not (last and n == len(units) - 1 and _runs_on(unit)):
                self._pieces.put(unit, piece, len(unit))  # the text's last unit may run on; none is kept
            pieces.append(piece)
            start = end + len(PIECE_SEPARATOR)
        return pieces


_T = TypeVar("_T")


class _Generations(Generic[_T]):
    """Values by text key in two generations: what is put stays in the current one; the older one is dropped
    when the current one holds `max_chars` / 2 characters. Plain dicts, read directly where it counts: an LRU's
    move_to_end cost 0.3 s per 660k pieces."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.current: dict[str, _T] = {}
        self.previous: dict[str, _T] = {}
        self._chars = 0

    def get(self, key: str) -> _T | None:
        found = self.current.get(key)
        return self.previous.get(key) if found is None else found

    def put(self, key: str, value: _T, chars: int) -> None:
        if self._chars >= self.max_chars // 2:
            self.previous, self.current, self._chars = self.current, {}, 0
        self.current[key] = value
        self._chars += chars


def _changed_part(old: str, new: str) -> tuple[int, int] | None:
    """Where `new` differs from `old`, widened to safe cuts on both sides (`_safe_cut`, in both texts): `new`
    is `new[:start]`, then the changed part, then `new[end:]`, the outer two the same text in `old`, and each
    scrubs on its own, as the pieces they are. None when that leaves nothing out.

    The cuts are where `FileScrubber.scrub` splits the whole text and starts a new piece (a separator after a
    non-blank line that does not run on), so the three parts scrub as they do together. The end cut is checked
    in `old` too, where the line before it may differ: the part after it was free of secrets in `old` as
    pieces of its own, as it is read here."""
    if old == new:
        return None
    same_start = _common_prefix(old, new)
    start = 0
    cut = new.rfind(PIECE_SEPARATOR, 0, same_start)
    for _ in range(_CUT_TRIES):
        if cut < 0:
            break
        if _safe_cut(new, cut):
            start = cut + len(PIECE_SEPARATOR)
            break
        cut = new.rfind(PIECE_SEPARATOR, 0, cut + 1)
    end = len(new)
    same_end = _common_suffix(old, new, min(len(old), len(new)) - same_start)
    shift = len(old) - len(new)
    cut = new.find(PIECE_SEPARATOR, len(new) - same_end)
    for _ in range(_CUT_TRIES):
        if cut < 0:
            break
        if _safe_cut(new, cut) and _safe_cut(old, cut + shift):
            end = cut
            break
        cut = new.find(PIECE_SEPARATOR, cut + 1)
    # (end < start cannot happen: the end cut lies in the shared end, which starts after the shared start.)
    return None if (start == 0 and end == len(new)) or end < start else (start, end)


_CUT_TRIES = 16  # separators tried on each side before the changed part runs to the text's edge


def _safe_cut(text: str, at: int) -> bool:
    """Whether the separator at `at` is one `FileScrubber.scrub` cuts at and does not join across: the line
    before it does not run on, and so is not blank (no separator starts a character earlier, and the piece
    before ends there)."""
    return not _runs_on(text[text.rfind("\n", 0, at) + 1:at])


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b`: spans compared in C, doubling from 1,024
    characters while they match, then halving the range (~4 us for a 48 KB file edited after 5 KB, against
    ~8 us bisecting all of it)."""
    low, step, most = 0, _FIRST_STEP, min(len(a), len(b))
    while low + step <= most and b.startswith(a[low:low + step], low):
        low, step = low + step, step * 2
    high = min(most, low + step)
    while low < high:
        mid = (low + high + 1) // 2
        if b.startswith(a[low:mid], low):
            low = mid
        else:
            high = mid - 1
    return low


def _common_suffix(a: str, b: str, most: int) -> int:
    """The length of the longest common suffix of `a` and `b`, at most `most`, the same way."""
    low, step = 0, _FIRST_STEP
    while low + step <= most and b.endswith(a[len(a) - low - step:len(a) - low], 0, len(b) - low):
        low, step = low + step, step * 2
    high = min(most, low + step)
    while low < high:
        mid = (low + high + 1) // 2
        if b.endswith(a[len(a) - mid:len(a) - low], 0, len(b) - low):
            low = mid
        else:
            high = mid - 1
    return low


_FIRST_STEP = 1024


def _replace(text: str, spans: list[Span]) -> _Piece:
    out = []
    found = []
    pos = 0
    for start, end, kind in spans:
        out += [text[pos:start], f"<SECRET:{kind}>"]
        found.append((kind, text[start:end]))
        pos = end
    return ("".join([*out, text[pos:]]) if spans else text), tuple(found)


def _tally(found: tuple[tuple[str, str], ...], counts: Counter[str] | None,
           secrets: list[tuple[str, str]] | None) -> None:
    if counts is not None:
        for kind, _ in found:
            counts[kind] += 1
    if secrets is not None:
        secrets += found


def _index_of_none(items: list[Any], start: int) -> int:
    try:
        return items.index(None, start)
    except ValueError:
        return -1


def _runs_on(piece: str) -> bool:
    """Whether an assignment could start in `piece` and take its value from the text after it: its last
    non-blank line names a secret-sounding keyword or is an operator alone, or it has no non-blank line."""
    end = len(piece)
    while True:
        start = piece.rfind("\n", 0, end) + 1
        line = piece[start:end].strip()
        if line:
            low = line.lower()
            return line in _ASSIGN_OPS or _RUN_ON.search(low) is not None or ("key" in low and
                                                                             _OWNED_KEY.search(low) is not None)
        if start == 0:
            return True
        end = start - 1


def scrub_diff(diff: str, counts: Counter[str] | None = None, known: Iterable[tuple[str, str]] = (),
               versions_scrubbed: bool = False) -> str:
    """A zero-context patch scrubbed: read as the lines of code it holds, and of every secret `known` to be in
    the file versions it joins (as (kind, original text)).

    A hunk stops at the changed lines, so it can hold a value without the name that makes it a secret
    (`password =` unchanged above a changed `"hunter2..."` line) or a key block without its BEGIN line; the
    file versions were scrubbed whole, so what they gave up is replaced here wherever it shows, line by line.
    And the "+"/"-" before each line kept the line-start patterns from matching at all (`+DB_PASSWORD=...`,
    `-  db_password: s3cret`): the patch is scanned with those signs read as spaces (same length, so the
    secrets found are at the same places), which also joins a name and a value on adjacent lines of a hunk.

    `versions_scrubbed`: both versions the patch joins (or the one, for an added or deleted file) were
    scrubbed whole by the caller, and `known` holds all they gave up. Each "+" line is then a line of the new
    version and each "-" line one of the old, read there with at least the context a hunk gives (its
    neighbours in the hunk are its neighbours in the file, or lines of the other version, which no file
    holds next to it), so their secrets are all in `known`; only the other lines (the patch and hunk headers,
    whose function context git cuts at 80 bytes) are scanned. The whole scan cost ~0.3 s of the 5k-commit
    history's ~8 s harvest (1.3 s under cProfile; bench/README.md, "Git harvest", fifth round). A patch cut
    short (`max_file_bytes`) ends in part of a line, and is scanned whole.
    """
    if versions_scrubbed and "\n[devtune: diff cut at " not in diff:
        spans = _outside_code(diff)
    else:
        code = diff.replace("\n+", "\n ").replace("\n-", "\n ")
        if code[:1] in ("+", "-"):
            code = " " + code[1:]
        spans = find_secrets(code)
    out, found = _replace(diff, spans)
    _tally(found, counts, None)
    # Longest first: a shorter line replaced first can cut a longer one that holds it (a "-----BEGIN PRIVATE
    # KEY-----" line of one key block inside a one-line Go literal holding another whole key kept that key's
    # body in gitleaks' own history).
    lines = {line: kind for kind, original in known for line in original.split("\n") if line.strip()}
    for line in sorted(lines, key=len, reverse=True):
        if line in out:
            if counts is not None:
                counts[lines[line]] += out.count(line)
            out = out.replace(line, f"<SECRET:{lines[line]}>")
    return _cut_short(out, lines, counts) if lines and "@@ " in out else out


# A hunk header's function context: git copies the start of a line of the version before, at most 80 bytes.
_HUNK_CONTEXT = re.compile(r"^(@@ [^\n]*? @@ )([^\n]+)$", re.M)
CUT_SECRET_CHARS = 8  # the shortest start of a secret a cut context must show to be replaced


def _cut_short(out: str, lines: dict[str, str], counts: Counter[str] | None) -> str:
    """`out` with every hunk header whose context ends inside a known secret line replaced from where that
    line starts: git cuts the context at 80 bytes, so `def connect(..., password="hunter2Pr` holds a secret's
    start that neither a whole known line nor a pattern matches."""
    def cut(m: re.Match[str]) -> str:
        context = m.group(2)
        for line, kind in lines.items():
            if len(line) <= CUT_SECRET_CHARS:
                continue
            start = context.find(line[:CUT_SECRET_CHARS])
            while start >= 0:
                if line.startswith(context[start:]):
                    if counts is not None:
                        counts[kind] += 1
                    return m.group(1) + context[:start] + f"<SECRET:{kind}>"
                start = context.find(line[:CUT_SECRET_CHARS], start + 1)
        return m.group(0)

    return _HUNK_CONTEXT.sub(cut, out)


# Where a patch's line that holds no line of code starts, after its "\n": headers, hunk headers, "\ No newline
# at end of file". The "--- a/path" and "+++ b/path" headers are among them; so is a removed "-- comment" line
# ("--- comment"), which is scanned once more for nothing. A pattern that starts with a literal "\n" is
# searched for it in C: 0.07 s for the generated history's 29 MB of patches, against 0.17 s for the same
# lines matched as `^...$` in multi-line mode.
_NOT_CODE_AFTER = re.compile(r"\n(?:[^+\-\n]|\+\+\+|---)")


def _not_code(diff: str) -> list[tuple[int, str]]:
    """A patch's lines that are not lines of code (not empty), with where each starts."""
    lines = []
    # Searched with a line break before the first line too: a match's "\n" in that text is at its line's
    # start in `diff`.
    for m in _NOT_CODE_AFTER.finditer("\n" + diff):
        start = m.start()
        end = diff.find("\n", start)
        lines.append((start, diff[start:] if end < 0 else diff[start:end]))
    return lines


def _outside_code(diff: str) -> list[Span]:
    """The secrets in a patch's lines that are not lines of code, read as one text (each on its own line), as
    spans in `diff`."""
    lines = _not_code(diff)
    starts = []  # where each line starts in the joined text
    at = 0
    for _, line in lines:
        starts.append(at)
        at += len(line) + 1
    spans = []
    for start, end, kind in find_secrets("\n".join(line for _, line in lines)):
        # A secret over several of these lines (a name in one header, a value in the next) covers the patch
        # between them too: more is replaced, never less.
        first = bisect.bisect_right(starts, start) - 1
        last = bisect.bisect_right(starts, max(start, end - 1)) - 1
        spans.append((lines[first][0] + start - starts[first], lines[last][0] + end - starts[last], kind))
    return spans


# How far either side of the cursor a secret can start or end and still need the other side to be seen: an
# assignment with its value on a later line spans a few lines (`password = (` ... `"..."`), and the longest
# token formats run to 255 characters. A private key block opened in the prefix is read from its BEGIN line
# instead. The two extra scans cost 11% of Continue ingest at 256 (5,506 -> 4,900 events/s, 30k events of
# bench/ingest_continue.py) and 18% at 512.
SEAM_CHARS = 256


def cursor_spans(prefix: str | None, middles: list[str | None], suffix: str | None) -> list[list[Span]]:
    """The secrets that show only when a prefix, a middle and a suffix are read as the one file they are, as
    spans in each part (prefix, each middle, suffix), for `scrub_fields(..., extra=)`.

    A cursor can sit anywhere: between `password = ` and its value (the value then starts the suffix, or is
    the completion), inside a token, inside a private key block. Each part alone holds half of the pattern,
    so the text around the cursor is scanned once without a middle (the file as it was) and once with each
    middle (the file had it been accepted). The spans are only added to what each part's own scan finds:
    replacing them first could break a neighbouring secret's marker (a key cut after "LTAI5tB9" ran on into
    the suffix's "sk-ant-..." and took its "sk").
    """
    p, s = prefix or "", suffix or ""
    tail = max(0, len(p) - SEAM_CHARS)
    head = min(len(s), SEAM_CHARS)
    begin = p.rfind("-----BEGIN")
    if begin >= 0 and "PRIVATE KEY" in p[begin:] and "-----END" not in p[begin:]:
        tail = min(tail, begin)
        end = s.find("-----END")
        line_end = s.find("\n", end) if end >= 0 else -1
        head = len(s) if line_end < 0 else max(head, line_end)
    last = len(middles) + 1
    found: list[list[Span]] = [[] for _ in range(last + 1)]  # prefix, each middle, suffix
    if _nothing_at_the_cursor(p[tail:], [m or "" for m in middles], s[:head]):
        return found
    for which, middle in [(0, ""), *((i + 1, m or "") for i, m in enumerate(middles))]:
        lp, lm = len(p), len(middle)
        # where each part lies in the joined prefix + middle + suffix
        bounds = [(0, 0, lp), (which, lp, lp + lm), (last, lp + lm, lp + lm + len(s))] if which else \
            [(0, 0, lp), (last, lp, lp + len(s))]
        # A literal (24+ token characters) can only cross a seam inside a run of 24 token characters (or a quote
        # and one); elsewhere the parts' own scans find every literal (see _literal_across).
        window = p[tail:] + middle + s[:head]
        seams = [lp - tail, lp - tail + lm] if which else [lp - tail]
        literals = any(_literal_across(window, at) for at in seams)
        for start, end, kind in _find(window, None, literals):
            start, end = start + tail, end + tail
            for part, lo, hi in bounds:
                if start < hi and end > lo:
                    found[part].append((max(start, lo) - lo, min(end, hi) - lo, kind))
    return [_merge(spans, []) for spans in found]


# The longest marker or keyword: a hit that crosses a seam lies within this many characters either side of it.
_LONGEST_PATTERN = max(map(len, [*_EXACT_MARKERS, *_LOWER_PATTERNS]))


def _nothing_at_the_cursor(before: str, middles: list[str], after: str) -> bool:
    """Whether no window `cursor_spans` reads (`before` + `after`, and `before` + each middle + `after`) can hold a
    secret: one scan finds no marker or keyword in any of them, and no literal can cross a seam.

    Every pattern but the literals' starts from a marker or a keyword, so a window without one holds nothing. The
    scanned text holds each window with a middle whole, and what either side of the seam without a middle a hit
    crossing it could take (or, with no middle, that window itself). 3,719 of 4,000 windows of the ingest bench's
    events held no hit, and the two scans of `_find` took 11 of `cursor_spans`' 22 us an event (bench/README.md,
    "Where a 200k collect's CPU goes")."""
    reach = _LONGEST_PATTERN
    seams: list[tuple[str, int]] = [(before + after, len(before))]
    seams += [(before + m + after, at) for m in middles for at in (len(before), len(before) + len(m))]
    if any(_literal_across(window, at) for window, at in seams):
        return False
    windows = [before + m + after for m in middles]
    text = "\0".join([*windows, before[-reach:] + after[:reach]]) if windows else before + after
    anchored, floating, keywords = _scan(text, lower_in_place(text))
    return not (anchored or floating or keywords)


def _literal_across(window: str, at: int) -> bool:
    """Whether a literal the high-entropy scan takes can cross the seam at `at`: token characters (or its quote)
    on both sides, in a run of 24 or more. A cursor sits inside a word on half the events, and the words are
    short: this check left 222 of 3,196 such windows to scan (of 6,000; 3,000 realistic events), 4% of ingest."""
    if not (0 < at < len(window) and window[at - 1] in _LITERAL_CHARS and window[at] in _LITERAL_CHARS):
        return False
    left = right = at
    while left > 0 and at - left < LITERAL_MIN_CHARS and window[left - 1] in _TOKEN_CHARS_SET:
        left -= 1
    while right < len(window) and right - left < LITERAL_MIN_CHARS and window[right] in _TOKEN_CHARS_SET:
        right += 1
    return right - left >= LITERAL_MIN_CHARS


def _merge(spans: list[Span], extra: list[Span]) -> list[Span]:
    """Both lists as one, in text order, overlapping spans joined into one (of the first one's kind)."""
    merged: list[Span] = []
    for start, end, kind in sorted([*spans, *extra]):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]), merged[-1][2])
        else:
            merged.append((start, end, kind))
    return merged


def scrub_fields(texts: list[str | None], counts: Counter[str] | None = None,
                 extra: list[list[Span]] | None = None) -> list[str | None]:
    """Scrub the text fields of one event, scanning for markers and keywords once over all of them; `extra`
    holds spans to replace in each field besides (`cursor_spans`). A value one field gives up as a secret is
    replaced where it shows again in any of them (`replace_repeats`): the prefix's `password = "..."` and a
    completion's `login("...")`."""
    present = [t for t in texts if t]
    extra = extra or [[] for _ in texts]
    if len(present) < 2:
        return [scrub(t, counts, None, more) if t else t for t, more in zip(texts, extra, strict=True)]
    joined = "\0".join(present)  # no marker or keyword holds NUL, so none can span two fields
    anchored, floating, keywords = _scan(joined, lower_in_place(joined))
    out: list[str | None] = []
    found: list[tuple[str, str]] = []
    start = 0
    a = k = 0
    for t, more in zip(texts, extra, strict=True):
        if not t:
            out.append(t)
            continue
        end = start + len(t)
        mine_anchored = []
        while a < len(anchored) and anchored[a][0] < end:
            if anchored[a][0] >= start:  # an anchored rule starting before this field (its `back`) is not here
                mine_anchored.append((anchored[a][0] - start, anchored[a][1]))
            a += 1
        mine = []
        while k < len(keywords) and keywords[k] < end:
            mine.append(keywords[k] - start)
            k += 1
        field, field_found = _scrubbed(t, counts, (mine_anchored, floating, mine), more)
        out.append(field)
        found += field_found
        start = end + 1
    if not found:
        return out
    return _repeats_across_cursor([replace_repeats(t, found, counts, edges=True) if t else t for t in out],
                                  found, counts)


def _repeats_across_cursor(texts: list[str | None], found: list[tuple[str, str]],
                           counts: Counter[str] | None) -> list[str | None]:
    """The fields of one event with each value in `found` replaced where the cursor cut it in two: one field ends
    with its start (`login("s3cr`), another starts with the rest (`etPass99")`), each after or before a quote
    unless the value reads as a key. Each part becomes a marker, as `cursor_spans` replaces each part of a
    pattern that a cursor cuts."""
    out = list(texts)
    for kind, value in _repeatable_values(found):
        quoted = not _key_like(value)
        ends = ("", *_QUOTES) if quoted else None
        for i, field in enumerate(out):
            if not field:
                continue
            for k in _cuts(field, value, quoted):
                rest = value[k:]
                pair = next(((j, other) for j, other in enumerate(out) if j != i and other and other.startswith(rest)
                             and (ends is None or other[len(rest):len(rest) + 1] in ends)), None)
                if pair is not None:
                    j, other = pair
                    out[i] = field[:-k] + f"<SECRET:{kind}>"
                    out[j] = f"<SECRET:{kind}>" + other[len(rest):]
                    if counts is not None:
                        counts[kind] += 1
                    break
    return out


def _cuts(field: str, value: str, quoted: bool) -> Iterator[int]:
    """Each count of `value`'s first characters that ends `field` (after a quote when `quoted`), longest first."""
    for k in range(min(len(value), len(field)) - 1, 0, -1):
        if field.endswith(value[:k]) and (not quoted or field[-k - 1:-k] in _QUOTES):
            yield k


def scrub_json(value: Any, counts: Counter[str] | None = None) -> Any:
    """A JSON value with every string in it scrubbed (keys excepted). A string under a secret-sounding key is
    read as that key's value, as the text `"password": "..."` would be: a tool call's parameters
    (`{"db_password": "..."}`) name their values by key, and a string alone names nothing. What any string gave
    up is replaced where another shows it again (`replace_repeats`)."""
    found: list[tuple[str, str]] = []

    def one(key: str | None, text: str) -> str:
        named = _named_by(key, text) if key is not None and text and _names_secret(key) else None
        out, gave = _scrubbed(text, counts, None, named)
        found.extend(gave)
        return out

    out = _map_strings(value, one)
    return _map_strings(out, lambda _, text: replace_repeats(text, found, counts)) if found else out


def _map_strings(value: Any, fn: Callable[[str | None, str], str], key: str | None = None) -> Any:
    """A JSON value with `fn(key, string)` in place of each string in it; `key` names a string that is an object's
    value (None in a list)."""
    if isinstance(value, str):
        return fn(key, value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, fn, k if isinstance(k, str) else None) for k, v in value.items()}
    return value


@functools.lru_cache(maxsize=1 << 10)
def _names_secret(key: str) -> bool:
    return name_strength(key) > 0


def _named_by(key: str, value: str) -> list[Span]:
    """The spans of `value` that the detector finds when it reads it as the value of `key` (`"key": "value"`)."""
    head = json.dumps(key, ensure_ascii=False) + ': "'
    at, end = len(head), len(head) + len(value)
    return [(max(s, at) - at, min(e, end) - at, kind) for s, e, kind in find_secrets(head + value + '"')
            if e > at and s < end]


FIM_FIELDS = ("prefix", "completion", "suffix")


def scrub_event(data: dict[str, Any], counts: Counter[str] | None = None) -> dict[str, Any]:
    """An editor's event (a JSON object, e.g. a Continue `data:` body) with every string scrubbed, its prefix,
    completion and suffix also read across the cursor as ingest reads a suggestion's: what is written to disk
    holds no more than the store will."""
    fim = [data.get(k) if isinstance(data.get(k), str) else None for k in FIM_FIELDS]
    out: dict[str, Any] = scrub_json({k: v for k, v in data.items() if k not in FIM_FIELDS or not isinstance(v, str)},
                                     counts)
    at_prefix, at_completion, at_suffix = cursor_spans(fim[0], [fim[1]], fim[2])
    for name, text in zip(FIM_FIELDS, scrub_fields(fim, counts, [at_prefix, at_completion, at_suffix]), strict=True):
        if text is not None:
            out[name] = text
    return {k: out[k] for k in data}  # the writer's key order


def is_excluded(path: str, globs: tuple[str, ...]) -> bool:
    """Whether a file path (plain, repo-relative or a file:// URI) matches an exclude glob.

    Each glob is tried against the whole path, the path with a leading "/" (so "**/secrets/**" also
    matches "secrets/x" at the repo root) and the file name (so ".env*" matches "app/.env.local").
    """
    return _is_excluded(path, globs)


@functools.lru_cache(maxsize=1 << 16)
def _is_excluded(path: str, globs: tuple[str, ...]) -> bool:
    # Cached: a developer's events name a few hundred files over and over (15 fnmatch calls each, uncached).
    if path.startswith("file://"):
        rest = path[len("file://"):]
        path = unquote(rest[rest.find("/"):] if "/" in rest else rest)  # drop the URI's host part
    path = path.replace("\\", "/")
    name = path.rsplit("/", 1)[-1]
    matcher = _globs(globs)
    return any(matcher(c) is not None for c in (path, "/" + path.lstrip("/"), name))


@functools.lru_cache(maxsize=16)
def _globs(globs: tuple[str, ...]) -> Any:
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs) or r"(?!)").match

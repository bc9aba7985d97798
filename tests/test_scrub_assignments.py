"""Values given to secret-sounding names, in the forms code, configuration files and shells write them, and
the look-alikes in ordinary code that are left alone."""

from __future__ import annotations

import pytest

from pipelines.ingest.scrub import cursor_spans, find_secrets, name_strength, scrub, scrub_fields

V = "Qm9vZ1e-9vLk2Tn4Xw"  # a password-like value with letters, digits and a dash
BRACES = "m{o)p${e]nob(dy[f>-_$#th1s}}"  # a password can hold any of these


@pytest.mark.parametrize("text", [
    f'if (api_key == "{V}") {{',
    f'if ("{V}" === db_password) return',
    f"if token != '{V}':",
    f"db_pass := {V}",
    f'apikey := "{V}"',
    f'DB_TOKEN ::= "{V}"',
    f'DB_TOKEN ?= "{V}"',
    f'$secretToken .= "{V}";',
    f'password "{V}";',
    f"curl --x-api-key {V} https://api.example.com",
    f"mytool --password={V} --verbose",
    f'NSString *password = @"{V}";',
    f'char secret[] = "{V}";',
    f'char secret[25] = "{V}";',
    f'std::string secret("{V}");',
    f'var apiToken string = "{V}"',
    f'password: str = "{V}"',
    f"smtp_pw = {V}",
    f'ldap_pass: "{V}"',
    f"sl_key = {V}",
    f"ibm-cloud-key: {V}",
    f'"{V}" == password',
    f'System.setProperty("DB_PASSWORD", "{V}")',
    f'os.environ.get("API_TOKEN", "{V}")',
    f"<password>{V}</password>",
    f"<apiToken>\n    {V}\n</apiToken>",
    f'<add key="ClearTextPassword" value="{V}" />',
    f'{{"name": "DB_PASSWORD", "value": "{V}"}}',
    f'{{"config.ini": "AIRTABLE_TOKEN={V}\\nBACKUP_ENABLED=true"}}',
    f"Server=db;Database=app;User Id=app;Password={V};",
    f"machine api.example.com login deploy password {V}",
    f"export AWS_SECRET_ACCESS_KEY={V}",
    f"PRIVATE_KEY_B64={V}",
    f'new NetworkCredential("ci@example.com", "{V}")',
])
def test_an_assignment_form_is_scrubbed(text: str) -> None:
    out = scrub(text)
    assert V not in out, (text, find_secrets(text))


@pytest.mark.parametrize(("text", "secret"), [
    ('password = "correct horse battery staple"', "correct horse battery staple"),  # spaces
    (f'password = "{BRACES}"', BRACES),  # $, braces, brackets, < and >
    (f"apikey = {BRACES}", BRACES),  # unquoted, to the end of the word
    ("db_password: three plain words", "three plain words"),  # YAML: to the end of the line
    ('SECRET_KEY = "django-insecure-_du9e^cmago!%(^+=gr@cu@v9-v7ulhbk2s3!w&39w4"', "django-insecure-_du9e"),
    ('password = "r00tpasswd"', "r00tpasswd"),  # holds the name's word and a digit: a value, not a name
])
def test_a_value_is_not_thrown_away_for_its_characters(text: str, secret: str) -> None:
    assert secret not in scrub(text), find_secrets(text)


@pytest.mark.parametrize("text", [
    'api_key = ""',
    "password = get_password(user)",
    "token = self.token2",
    "last_token = call_start",
    "password = auth[2]",
    'password = getpass.getpass("Password: ")',
    'password = input("Enter your password")',
    'token_type = "bearer"',
    'PASSWORD = "password"',
    'token = "access_token"',
    "password: ${DB_PASSWORD}",
    'password = "{{ vault_password }}"',
    'password = f"{prefix}{suffix}"',
    'token = "Bearer {}".format(tok)',
    "secret = '%s' % value",
    'password = "<your password here>"',
    'password = "changeme"',
    'api_key = "your-api-key"',
    'password = "somefakekey"',
    "sort(key=lambda x: x[1])",
    "primaryKey=XEyH0H4-4NsIIuMGFI-=sQX1O_0a.H",  # a database's key, not a credential
    'public_key = "9Cnzj4p4WGeKLs1Pt8QuKUpRKfFLfRYC9AIKjbJTWit"',
    '"AWS::KMS::Key": "2b447c471bc70388",',  # a CloudFormation type's path, not a variable
    "            token=text,",  # a keyword argument on its own line
    "s3_auth=s3_auth,",
    'fmt_pass = self.helper("_format_explanation", msg)',
    "    pass",
    "# the key: 'test/1/2/3.txt'",
    "TOKEN_ENDS = TSPECIALS | WSP",
    'MovedAttribute("HTTPPasswordMgr", "urllib2", "urllib.request"),',
])
def test_ordinary_code_is_left_alone(text: str) -> None:
    assert find_secrets(text) == [], find_secrets(text)


@pytest.mark.parametrize(("name", "strength"), [
    ("password", 2), ("DB_PASSWORD", 2), ("db_pass", 2), ("smtp_pw", 2), ("clientSecret", 2), ("api_key", 2),
    ("x-api-key", 2), ("token1", 2), ("PRIVATE_KEY_B64", 2), ("dbpassword", 2),
    ("sl_key", 1), ("MAILCHIMP_KEY", 1), ("auth", 1),
    ("password_hint", 0), ("token_type", 0), ("secret_name", 0), ("primary_key", 0), ("public_key", 0),
    ("tokenizer", 0), ("max_tokens", 0), ("csrf_token", 0), ("jsonwebtoken", 0),
])
def test_names_are_read_by_their_words(name: str, strength: int) -> None:
    assert name_strength(name) == strength


def test_a_flag_split_by_the_cursor_is_scrubbed() -> None:
    """The name and flag in the prefix, the value completed by the model."""
    prefix, completion, suffix = "run() {\n  mytool --api-key ", f"{V} \\\n", "    --verbose\n}\n"
    at_prefix, at_completion, at_suffix = cursor_spans(prefix, [completion], suffix)
    out = scrub_fields([prefix, completion, suffix], None, [at_prefix, at_completion, at_suffix])
    assert V not in "".join(t or "" for t in out)


# -- names and forms added from the rule sets' examples (issue 11, second round) ---------------------------------

KEY40 = "6d2FabeB6ADd229Bc199FabA28fD3efb57dF0bD3"


@pytest.mark.parametrize(("text", "secret"), [
    (f"sourcegraph: {KEY40}", KEY40),  # a vendor's name as the key
    ('postmark: "f59dffd2-83ea-47c7-ba8f-95e053a6d0ae",', "f59dffd2-83ea-47c7-ba8f-95e053a6d0ae"),
    (f'{{"facebook": "{KEY40[:32]}"}}', KEY40[:32]),
    (f'jfrog.set("artifactory", "{KEY40.lower()}{KEY40[:24].lower()}")', KEY40.lower()),
    (f"buildConfigField 'String', 'API_KEY', '\"{KEY40[:32]}\"'", KEY40[:32]),  # Gradle writes Java source
    ('conn.Open("Provider=SQLOLEDB.1;User ID=app; " & "Password =opensesame;Initial Catalog=Sales;")',
     "opensesame"),  # a connection string's field, spaces around "="
    ("ibm-cloud-pwd = shorter-version", "shorter-version"),  # no language names a variable with dashes
    # a JavaScript snippet inside a string: its quotes escaped twice
    (f"'\\\\n    clientSecret: \\\\'{KEY40}\\\\','+", KEY40),
    # another shape given to a Telegram name is judged as any value is
    (f'telegram_api_token = "{KEY40}"', KEY40),
    ('twitchToken = "zcvk56kf7t37v0pvri73e8q0ax7wt4"', "zcvk56kf7t37v0pvri73e8q0ax7wt4"),  # an API token
    ('password = "CorrectHorseBatteryStaple9"', "CorrectHorseBatteryStaple9"),  # a passphrase, glued
    (f'GITHUB_TOKEN = "ghp_{KEY40}"', KEY40),  # longer than the format knows: a kind it may not know yet
])
def test_a_vendor_name_or_a_data_form_marks_the_value(text: str, secret: str) -> None:
    assert secret not in scrub(text), find_secrets(text)


@pytest.mark.parametrize("text", [
    "github: https://github.com/org/repo",  # a vendor's name with a URL
    "docker: 20.10.7-ce-beta1",  # a version
    "sentry = sentry_sdk.init(dsn)",
    "twitter: h4ck3rn3ws",  # a handle: shorter than any vendor's key
    "password = shorter_version",  # a Python variable
    "for (i = 0; password = next; i++) {",  # a loop, not a connection string
])
def test_vendor_names_and_data_forms_leave_code_alone(text: str) -> None:
    assert find_secrets(text) == [], find_secrets(text)


@pytest.mark.parametrize("text", [
    'password = "rootpasswd"',  # no digit, and it names what it stands for
    'password = "thisismypassword"',
    "Server=db;User Id=app;Password=myPassword;",
    'new DirectoryEntry("LDAP://10.10.10.1", "domain\\\\user", "secret")',
    "REACT_APP_MAILER_PASSWORD=smtp_password # Enter your SMTP email password",
])
def test_a_stand_in_that_names_a_credential_is_kept(text: str) -> None:
    assert find_secrets(text) == [], find_secrets(text)


@pytest.mark.parametrize(("name", "strength"), [
    ("sourcegraph", 1), ("POSTMARK", 1), ("my_facebook", 1),
    ("facebook_app_id", 0), ("sentry_dsn", 0), ("compat", 0),
])
def test_vendor_names_are_weak_names(name: str, strength: int) -> None:
    assert name_strength(name) == strength

"""Credential formats the scrubber knows by their shape: each is scrubbed whole, and its near-misses (one
character too many, a suffix, a placeholder, a key that is public by design) are left alone.

The values are made up here in each format's exact shape; none is a real credential.
"""

from __future__ import annotations

import pytest

from pipelines.ingest.scrub import FileScrubber, find_secrets, scrub

R32 = "q8Lw2ZrX9vT4nB6mK1pD7sF3gH5jC0aE"  # 32 random-looking letters and digits
HEX32 = "9f3a0c7e51b24d86a0e3c9f17b5d2e48"
HEX64 = HEX32 + "c1d2e3f405a6b7c8d9e0f1a2b3c4d5e6"


def kinds(text: str) -> list[str]:
    return [kind for _, _, kind in find_secrets(text)]


@pytest.mark.parametrize(("kind", "secret"), [
    ("github_token", "ghp_" + R32 + "Ab3d"),
    ("github_token", "github_pat_11ABCDE2Y0" + "xK7mQ2pL9vR4tN8wB3cF6hJ1zD5sG0aE" * 2 + "q8Lw2ZrX"),
    ("gitlab_token", "glpat-" + "Xk9m2Qp7Lz4Rt8Vn1Bc6"),
    ("gitlab_token", "GR1348941" + "zX8qLmN4vB7cT2yK9wQp"),  # a runner registration token
    ("gitlab_token", "glrt-" + "Xk9m2Qp7Lz4Rt8Vn1Bc6"),
    ("artifactory_token", "AKCp" + "8jQ8sL3rJ5n1NfGZ2WVY4tkQ8s3Yhq6rDq6pYUGkF5zXRqyN6J2e8oG5a2TpwV8Q6cXDB"),
    ("aws_access_key", "AKIAQ3EGZ7VXRTYUPLMN"),
    ("google_api_key", "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"),
    ("azure_client_secret", "QtT8Q~9C-_Ij~RouHVpD2Tuf3oHWGh.DQ3kcjbAn"),
    ("slack_token", "xoxb-1234567890-0987654321-" + "AbCdEfGhIjKlMnOpQrStUvWx"),
    ("twilio_key", "SK" + HEX32),
    ("twilio_key", "AC" + HEX32),
    ("mailchimp_key", HEX32 + "-us30"),
    ("mailgun_key", "key-" + HEX32),
    ("sendgrid_key", "SG." + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Y" + "." + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Yh3Gs5Fw0Ej2Kq7Wm2Kx9L"),
    ("discord_bot_token", "MTk4NjIyNDgzNDcxOTI1MjQ4.Gk2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWsR3xQvYb8"),
    ("telegram_token", "110201543:AA" + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Yh3Gs5Fw0Ej2K"[:33]),
    ("stripe_key", "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"),
    ("npm_token", "npm_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
    ("pypi_token", "pypi-AgEIcHlwaS5vcmc" + "CJDk4ZjFkNjE0LWE3ZGItNDFkNS1iYzI5LTM2NmQ" + "x7Lp2Qm9"),
    ("databricks_token", "dapi" + HEX32),
    ("doppler_token", "dp.pt." + "bAqhcVzrhy5cRHkOlNTc0Ve6w5NUDCpcutm8vGE9myi"),
    ("anthropic_key", "sk-ant-api03-" + "Hk9Xm2Qp7Lz4Rt8Vn1Bc6Yh3Gs5Fw0Ej2Kq7Wm2Kx9Lp4Rz8Tn1Vb6"),
    ("huggingface_token", "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"),
    ("vault_token", "hvs." + "CAESIP2jTxc9S2K7Z6CtcFWQv7-044m_oSsxnPE1H3nF89l3GiYKHGh2cy5"),
    ("password_hash", "$2a$12$" + "R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW"),
    ("private_key", "AGE-SECRET-KEY-1" + "QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L"[::-1] + "GF2TVDW0S3JN54KHCE6MUA7LQP"),
])
def test_a_format_is_scrubbed_whole(kind: str, secret: str) -> None:
    for text in (secret, f'value = "{secret}"\n', f"  {secret},\n"):
        out = scrub(text)
        assert secret not in out and f"<SECRET:{kind}>" in out, (text, find_secrets(text))


@pytest.mark.parametrize("text", [
    "AKIAIOSFODNN7EXAMPLE1",  # one character too long for an AWS key id (and AWS's documented example)
    "ghp_" + R32 + "Ab3dEXTRA9",  # a GitHub token with a suffix
    "glpat-" + "Xk9m2Qp7Lz4Rt8Vn1Bc6" + "Q",  # 21 after the prefix: not the 20-character form
    "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWYabcd123",  # too long for a Google API key
    "twilio AC" + HEX32 + "f",  # 33 hex digits
    "sk-proj-" + "Xi8tdMjHV6pmbBbwilTeT4BlbkFJ3UDnpdEwNNm6wVBpYM0o",  # no T3BlbkFJ between its halves
    # a bot token's shape given to a Telegram name, and not a bot token: a 4-digit id, a word glued on
    'telegram_api_token = "3139:A06o8ewxaam17mgfizyz-9l8ip63gcvaulf"',
    'TELEGRAM_API_TOKEN = "30866154:Ahello0u5mi6rirvb7f-wirvs0ncsq91mfubhynp"',
    'nonMatchingToken := "sm_pat_sbbwz0ltgw"',  # a vendor's prefix, too short for its tokens (23)
    'GITHUB_TOKEN = "ghp_Xk9m2Qp7"',
    'token: "clm20002:AgencyIdentificationCodeContentType"',  # words glued: a type's name
])
def test_a_near_miss_of_a_format_is_not_that_format(text: str) -> None:
    assert scrub(text) == text


@pytest.mark.parametrize("text", [
    "ghp_" + "x" * 36,
    "AKIAXXXXXXXXXXXXXXXX",
    "xoxb-xxxxxxxxxxx-xxxxxxxxxxxxxxxxxxxxxxxx",
    'api_key: "AIzaSyabcdefghijklmnopqrstuvwxyz1234567"',  # an alphabet run (and a published Firebase sample)
    "sk-ant-api03-abc123xyz-456def789ghij-klmnopqrstuvwx-3456yza789bcde-1234fghijklmnopAA",
    "const stripe = Stripe('pk_live_" + "51HqLyjWDarjtT1zdp7dcXpXzjBj0a5a8');",  # publishable: public by design
    "STRIPE_PUBLISHABLE_KEY=pk_test_" + "TYooMQauvdEDq54NiTphI7jx",
    "https://indieweb.org/images/3/35/2018-250-xoxo-indieweb-1.jpg",
    "-----BEGIN OPENSSH PRIVATE KEY----------END OPENSSH PRIVATE KEY-----",  # an empty block in a doc
    "video_box.ico-7a388b69018576d24b59331fd60aab0c.png",  # a file name, not an Infracost token
])
def test_placeholders_and_public_values_are_kept(text: str) -> None:
    assert find_secrets(text) == [], find_secrets(text)


def test_jwts_signed_or_not_decoded_or_not() -> None:
    header, payload = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJhZG1pbiIsImlhdCI6MTUxNjIzOTAyMn0"
    for token in (f"{header}.{payload}.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV", f"{header}.{payload}.",
                  f"{header}.{payload}"):
        assert kinds(f"Authorization = {token!r}") == ["jwt"], token
    # a header that lost a character (it no longer decodes) still carries a signed payload
    broken = header[:-2] + "J." + payload + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV"
    assert kinds(broken) == ["jwt"]
    # eyJ and two segments that are not a JSON header and payload: no JWT
    assert "jwt" not in kinds("eyJhbasd9fGq2Lp7.bm90X3ZhbGlkX2pzb25fYXRfYWxs")


@pytest.mark.parametrize(("text", "secret"), [
    (f'curl -H "Authorization: Bearer {HEX32}" https://api.example.com', HEX32),
    ("Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
    ("curl -u deploy:Tr0ub4dor-3x https://ci.example.com", "Tr0ub4dor-3x"),
    ("curl --user 'api:d2LkV78zLx!t' https://api.example.com", "d2LkV78zLx!t"),
    ("https://hooks.zapier.com/hooks/catch/1234567/abcdEF12/?token=9fK2mQ7xLp4Rt8Vw", "9fK2mQ7xLp4Rt8Vw"),
    ("mongodb+srv://app:D1fficultP%40ssw0rd@cluster0.example.mongodb.net/db", "D1fficultP%40ssw0rd"),
    ("//registry.npmjs.org/:_authToken=1f9c3a4e-7b2d-4c8e-9a0f-5d6b7e8f9a0b", "1f9c3a4e-7b2d-4c8e-9a0f-5d6b7e8f9a0b"),
    ("psexec \\\\10.0.0.1 -u Administrator -p dev_4dmin cmd", "dev_4dmin"),
    ("BUNDLE_GEMS__CONTRIBSYS__COM: cafe0b1e:dead0bee", "cafe0b1e:dead0bee"),
])
def test_credentials_in_headers_urls_and_command_lines(text: str, secret: str) -> None:
    out = scrub(text)
    assert secret not in out, find_secrets(text)


@pytest.mark.parametrize("text", [
    "curl -u username:password https://test.com/endpoint",  # stand-ins
    'curl -XGET -u "${{needs.vault.outputs.account_id}}:${{needs.vault.outputs.account_password}}"',
    "docker run -u 1000:1000 image",  # a uid and a gid
    "PIP_INDEX_URL_FMT = '{scheme}://aws:{auth_token}@{netloc}{path}simple/'",  # format fields
    'headers = {"Authorization": f"Bearer {token}"}',
])
def test_templates_in_those_places_are_kept(text: str) -> None:
    assert find_secrets(text) == [], find_secrets(text)


MANIFEST = """apiVersion: v1
kind: Secret
metadata:
  name: registry
type: Opaque
data:
  .dockercfg: |
    eyJhdXRocyI6eyJodHRwczovL2V4YW1wbGUvdjEvIjp7ImF1dGgiOiJvcGVuc2VzYW1lIn19fQo=
  ca.pem: UyFCXCpkJHpEc2I9bXlwYXNzd29yZA==
  htpasswd: {{ htpasswd }}
"""


def test_every_value_of_a_kubernetes_secret_is_scrubbed() -> None:
    out = scrub(MANIFEST)
    assert "eyJhdXRocyI6" not in out and "UyFCXCpk" not in out and out.count("<SECRET:kubernetes_secret>") == 2
    assert "{{ htpasswd }}" in out  # a template is not a value
    # a ConfigMap's data is not secret
    config_map = MANIFEST.replace("kind: Secret", "kind: ConfigMap")
    assert "<SECRET:kubernetes_secret>" not in scrub(config_map)


def test_file_scrubber_agrees_on_the_new_forms() -> None:
    """Multi-line forms (a Kubernetes Secret, an XML element, a Vault unseal key) give the same result piece by
    piece as whole, also with blank lines added between them."""
    text = (MANIFEST + "\n\n<config>\n  <password>\n    s3cr3t-Passw0rd\n  </password>\n</config>\n\n"
            "Unseal Key 1: 0tZn+7QQCxphpHwTm7/dC3LpP5JGIbYl3PK8Sy81R+P2\n\nif (api_key == \"Qm9vZ1e-9vLk2Tn4Xw\") {}\n")
    scrubber = FileScrubber()
    for version in (text, text.replace("\ndata:", "\n\ndata:"), text.replace("<password>\n", "<password>\n\n")):
        assert scrubber.scrub(version) == scrub(version)
    assert "s3cr3t-Passw0rd" not in scrub(text) and "0tZn+7QQ" not in scrub(text) and "Qm9vZ1e" not in scrub(text)


# -- formats added from the rule sets' examples (issue 11, second round) -----------------------------------------

FB_SECRET = "Qm9vZ1e-9vLk2Tn4XwPa7Rb3Kc8Td"  # 29 characters: a Facebook app secret or client token's length


@pytest.mark.parametrize(("kind", "text", "secret"), [
    ("facebook_token", f"facebook 8273645519283746|{FB_SECRET}", f"8273645519283746|{FB_SECRET}"),
    ("facebook_token", f'{{"access_token":"827364551928374|{FB_SECRET}"}}', f"827364551928374|{FB_SECRET}"),
    ("facebook_token", f"https://graph.facebook.com/me?access_token=8273645519283746%7C{FB_SECRET}", FB_SECRET),
    ("sonar_token", f"sonar.login={HEX32}0a1b2c3d", f"{HEX32}0a1b2c3d"),
    ("sonar_token", f"sonar.login', '{HEX32}0a1b2c3d'", f"{HEX32}0a1b2c3d"),
    ("codeclimate_token", f"  CC_TEST_REPORTER_ID: {HEX64}", HEX64),
    ("jenkins_password", "Please use the following password to proceed to installation:\n\n"
                         f"{HEX32}\n\nThis may also be found at: /var/jenkins_home/secrets/initialAdminPassword",
     HEX32),
    ("adafruit_key", '#define IO_KEY "aio_' + R32[:28] + '"', "aio_" + R32[:28]),
    ("jina_key", "jina_" + R32 + R32[:28], "jina_" + R32 + R32[:28]),
    ("truenas_key", f'{{"msg": "method", "params": ["3-{R32}{R32}"]}}', f"3-{R32}{R32}"),
    ("secret_assignment", "2. Ensure the password for user 'postgres' is 'Tr0ub4dor' or change .env", "Tr0ub4dor"),
    ("secret_assignment", 'The default password is "kQ2m-Zx9p".', "kQ2m-Zx9p"),
])
def test_a_new_format_is_scrubbed(kind: str, text: str, secret: str) -> None:
    out = scrub(text)
    assert secret not in out and f"<SECRET:{kind}>" in out, (text, find_secrets(text))


@pytest.mark.parametrize("text", [
    f"facebook 82736455192837|{FB_SECRET}",  # a 14-digit id
    f"facebook 8273645519283746|{FB_SECRET[:26]}",  # 26 after the bar
    "flags = 1234567890123456 | MASK_ALL",  # a bitwise or
    "the sonar login token: https://docs.sonarqube.org/latest/user-guide/user-token/",
    f"CC_TEST_REPORTER_ID: {HEX64[:63]}",
    "aio_" + R32[:27],
    "The password is '$DB_PASSWORD'",  # a reference, not a value
    "the password for user 'postgres' is 'password'",  # a stand-in
    "The password is hashed with bcrypt.",
])
def test_a_near_miss_of_a_new_format_is_kept(text: str) -> None:
    assert find_secrets(text) == [], find_secrets(text)


def test_a_long_marker_after_a_dot_is_still_a_token() -> None:
    """`secrets.pypi-AgE...`: a dot before `pypi-AgE` does not make the token part of a dotted name, as it does
    for short markers (`video_box.ico-7a38...png` is a file name, not an Infracost token)."""
    token = "pypi-AgEIcHlwaS5vcmc" + "CJDk4ZjFkNjE0LWE3ZGItNDFkNS1iYzI5LTM2NmQ" + "x7Lp2Qm9"
    assert kinds(f"password: ${{{{ secrets.{token} }}}}") == ["pypi_token"]


@pytest.mark.parametrize("text", [
    'ageToken = "AGE-SECRET-KEY-1' + "Q" * 58 + '"',  # filler in an age key's shape
    'LOB_API_KEY = "test_pub_' + HEX32[:31] + '"',  # Lob's publishable keys are public by design
    '<add key="ClearTextPassword" value="33f!!lloppa" />',  # the NuGet docs' sample
    ',apiKey:"6fe4476ee5a1832882e326b506d14126",',  # the Algolia search key yarn ships
    '<input type="hidden" name="authenticity_token" value="7SWa-Fo1_hsC6oovfBsJFLGPUl2EhkSWPbJhWANwgaJ" />',
    'pub const SN_id_Gost28147_89_None_KeyMeshing = "id-Gost28147-89-None-KeyMeshing"',  # words joined: a name
])
def test_placeholders_published_and_public_values_are_kept(text: str) -> None:
    assert find_secrets(text) == [], find_secrets(text)


def test_a_random_literal_is_still_scrubbed_where_its_name_is_no_secret() -> None:
    """The checks above leave random values alone only for what their names or shapes say."""
    value = "7SWa-Fo1_hsC6oovfBsJFLGPUl2EhkSWPbJhWANwgaJ"
    assert kinds(f'<input type="hidden" name="widget_state" value="{value}" />') == ["high_entropy"]
    assert kinds(f'OID_NAME = "id-{value}"') == ["high_entropy"]


def test_text_beyond_ascii_gives_the_same_spans() -> None:
    """ASCII text is searched as bytes (a byte's offset is its character's); other text as characters."""
    line = f'token = "{R32}"  # ghp_{R32}Ab3d\n'
    for before in ("", "café, naïve: ", "İ\n", "日本語のコメント\n"):
        out = scrub(before + line)
        assert out.startswith(before) and R32 not in out and out.count("<SECRET:") == 2, out


def test_a_literal_split_by_the_cursor_is_still_found() -> None:
    """The windows around the cursor are scanned for literals only where a run of token characters long enough
    for one crosses the seam; a literal cut anywhere is found, a short word cut is left alone."""
    from pipelines.ingest.scrub import cursor_spans, scrub_fields

    for cut in range(1, len(R32)):
        prefix, completion, suffix = f'state = "{R32[:cut]}', f'{R32[cut:]}"\n', "print(state)\n"
        at_prefix, at_completion, at_suffix = cursor_spans(prefix, [completion], suffix)
        out = scrub_fields([prefix, completion, suffix], None, [at_prefix, at_completion, at_suffix])
        assert R32 not in "".join(t or "" for t in out), cut
    assert cursor_spans("result = comp", ["ute_total(items)\n"], "") == [[], [], []]


def test_file_scrubber_joins_the_jenkins_setup_log() -> None:
    """Jenkins prints its first admin's password after a blank line: a file cut at blank lines still finds it."""
    log = ("*" * 61 + "\n\nJenkins initial setup is required. An admin user has been created and a password "
           "generated.\nPlease use the following password to proceed to installation:\n\n" + HEX32 + "\n\n"
           "This may also be found at: /var/jenkins_home/secrets/initialAdminPassword\n")
    scrubber = FileScrubber()
    assert scrubber.scrub(log) == scrub(log) and HEX32 not in scrub(log)

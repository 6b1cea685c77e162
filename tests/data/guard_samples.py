"""Labelled secret/PII samples shared by the detector tests and bench/guard_bench.py.

POSITIVES: (rule id, text, the value that must be found). NEGATIVES: texts a coding
agent sends all day that must produce no finding at all (UUIDs, SHAs, base64 images,
versions, dates, `${DB_PASSWORD}` references, example/noreply addresses ...).
All values are synthetic (fake keys with valid shapes, test card numbers, RFC 5737 /
example IPs where a non-reportable address is meant).
"""

from __future__ import annotations

import base64

__all__ = ["NEGATIVES", "POSITIVES"]

ANTHROPIC = (
    "sk-ant-api03-" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9fG1hJ3kL5mN7pQ9rS1tU3v" + "-AA"
)
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7Yq3"
    + "Qx9+" * 20
    + "\n-----END RSA PRIVATE KEY-----"
)
GCP_PEM = (
    '"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBg'
    + "kqhk" * 15
    + '\\n-----END PRIVATE KEY-----\\n"'
)
AZURE = (
    "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey="
    + "Zm9v" * 21
    + "Ab==;EndpointSuffix=core.windows.net"
)

POSITIVES = [
    ("aws_access_key", "id AKIAQYLPMN5HFIQR7XYZ here", "AKIAQYLPMN5HFIQR7XYZ"),
    ("aws_access_key", "ASIAY34FZKBOKMUTVV7A", "ASIAY34FZKBOKMUTVV7A"),
    (
        "aws_secret_key",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYq1w2e3r4t5",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYq1w2e3r4t5",
    ),
    (
        "gcp_api_key",
        "key=AIzaSyD-1234567890abcdefghijklmnopqrstu",
        "AIzaSyD-1234567890abcdefghijklmnopqrstu",
    ),
    (
        "gcp_private_key_id",
        '"private_key_id": "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b"',
        "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b",
    ),
    ("pem_private_key", PEM, PEM),
    ("pem_private_key", GCP_PEM, GCP_PEM[16:-3]),
    ("azure_storage_key", AZURE, "Zm9v" * 21 + "Ab=="),
    (
        "azure_sas_signature",
        "https://a.blob.core.windows.net/c?sv=2022&sig=" + "aBcD1234" * 6 + "%3D",
        "aBcD1234" * 6 + "%3D",
    ),
    ("anthropic_api_key", f"ANTHROPIC_API_KEY={ANTHROPIC}", ANTHROPIC),
    (
        "openai_api_key",
        "OPENAI_API_KEY=sk-proj-abcDEF1234567890abcdEFGH1234567890xyzXYZ",
        "sk-proj-abcDEF1234567890abcdEFGH1234567890xyzXYZ",
    ),
    (
        "openai_api_key",
        "key: sk-T3BlbkFJ9a8b7c6d5e4f3g2h1i0jKLMNOPQRSTUV",
        "sk-T3BlbkFJ9a8b7c6d5e4f3g2h1i0jKLMNOPQRSTUV",
    ),
    (
        "huggingface_token",
        "HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh",
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh",
    ),
    ("stripe_key", "sk_live_51HqLy2Abc9Def8Ghi7Jkl6Mno", "sk_live_51HqLy2Abc9Def8Ghi7Jkl6Mno"),
    (
        "github_token",
        "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
        "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    ),
    (
        "github_token",
        "github_pat_" + "11ABCDEFG0" * 8 + "xy",
        "github_pat_" + "11ABCDEFG0" * 8 + "xy",
    ),
    ("gitlab_token", "glpat-xYz12AbC34dEf56GhI78", "glpat-xYz12AbC34dEf56GhI78"),
    (
        "slack_token",
        "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    ),
    (
        "slack_webhook",
        "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/aBcDeFgHiJkLmNoPqRsTuVwX",
        "https://hooks.slack.com/services/T0123ABCD/B0456EFGH/aBcDeFgHiJkLmNoPqRsTuVwX",
    ),
    (
        "npm_token",
        "//registry.npmjs.org/:_authToken=npm_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
        "npm_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    ),
    (
        "sendgrid_api_key",
        "SG.abcdefghijklmnopqrstuv.ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq",
        "SG.abcdefghijklmnopqrstuv.ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq",
    ),
    (
        "google_oauth_secret",
        "GOCSPX-AbCdEfGhIjKlMnOpQrStUvWxYz12",
        "GOCSPX-AbCdEfGhIjKlMnOpQrStUvWxYz12",
    ),
    ("jwt", f"Authorization: Bearer {JWT}", JWT),
    ("url_credentials", "postgres://admin:s3cr3tP4ss@db.internal:5432/app", "s3cr3tP4ss"),
    ("url_credentials", "redis://:Zq8wX2kP9m@cache:6379/0", "Zq8wX2kP9m"),
    (
        "bearer_token",
        "Authorization: Bearer a8Fz93kLmQ0pXv7Rt2Yw5nBcD4",
        "a8Fz93kLmQ0pXv7Rt2Yw5nBcD4",
    ),
    (
        "http_basic_auth",
        "Authorization: Basic " + base64.b64encode(b"alice:wonderland9").decode(),
        base64.b64encode(b"alice:wonderland9").decode(),
    ),
    ("password", "password = 'Tr0ub4dor&3x'", "Tr0ub4dor&3x"),
    ("password", "DB_PASSWORD=hunter2hunter", "hunter2hunter"),
    ("password", '{"passwd": "S3cure!pass"}', "S3cure!pass"),
    ("generic_secret", 'db: {"api_key": "a8Fz93kLmQ0pXv7Rt2Yw5nBc"}', "a8Fz93kLmQ0pXv7Rt2Yw5nBc"),
    (
        "generic_secret",
        "JWT_SECRET: 9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    ),
    ("email", "mail jane.doe@acme-corp.io today", "jane.doe@acme-corp.io"),
    ("phone", "call +1 (202) 555-0147", "+1 (202) 555-0147"),
    ("phone", "+44 20 7946 0958", "+44 20 7946 0958"),
    ("phone", "office 415-555-0132", "415-555-0132"),
    ("phone", "(212) 555-0199", "(212) 555-0199"),
    ("phone", "020 7946 0958", "020 7946 0958"),
    ("phone", "tel 06 12 34 56 78", "06 12 34 56 78"),
    ("credit_card", "card 4111 1111 1111 1111", "4111 1111 1111 1111"),
    ("credit_card", "5500-0000-0000-0004", "5500-0000-0000-0004"),
    ("credit_card", "amex 378282246310005.", "378282246310005"),
    ("iban", "IBAN GB82 WEST 1234 5698 7654 32", "GB82 WEST 1234 5698 7654 32"),
    ("iban", "DE89370400440532013000", "DE89370400440532013000"),
    ("us_ssn", "SSN 536-22-8714", "536-22-8714"),
    ("ipv4", "server 8.8.8.8 down", "8.8.8.8"),
    ("ipv4", "db at 10.1.2.3", "10.1.2.3"),
    ("ipv6", "dns 2001:4860:4860::8888 ok", "2001:4860:4860::8888"),
]


NEGATIVES = [
    "uuid 7c1f1e8a-3b9d-4b65-9e43-2f4c8a0d9b11 and 123e4567-e89b-12d3-a456-426614174000",
    "commit 9f3c2a1b7e6d5c4b3a29180716f5e4d3c2b1a098 (HEAD -> main)",
    "sha256:3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b",
    "image: data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAYAAAAf8/9hAAAAGXRFWHRTb2Z0",
    "version 1.2.3, python 3.11.7, envoy v1.40.0, node 20.11.1",
    "date 2025-03-14 time 12:30:45.123 tz +0100 2025-03-14T10:02:11Z",
    "line 123, col 45; tests/test_refunds.py:57; refunds.py:44",
    "password: ${DB_PASSWORD}",
    "password = os.environ['DB_PASSWORD']",
    "password=example",
    "password: changeme123",
    "api_key = settings.API_KEY",
    "token = get_token()",
    "GITHUB_TOKEN: ${{ secrets.GITHUB_TOKEN }}",
    "max_tokens: 32000",
    "secretName: my-app-secret",
    "password_hash = bcrypt(pw)",
    "postgresql://payments:${DB_PASSWORD}@db:5432/payments",
    "https://user:password@example.com",
    "Co-Authored-By: Claude <noreply@anthropic.com>",
    "dana@example.com and 49699333+dependabot[bot]@users.noreply.github.com",
    "git@github.com:org/repo.git and icon@2x.png and @types/node and @property",
    "127.0.0.1:8080 and 0.0.0.0 and ::1 and 255.255.255.255 and 192.0.2.10",
    "port 5432, pid 13491, 1250 minor units = 12.50 EUR, 1700000000000 ms",
    "4111111111111112 fails luhn; 0000 0000 0000 0000",
    "SSN-like 000-12-3456, 666-12-3456, 900-12-3456",
    "AKIAIOSFODNN7EXAMPLE is the AWS documentation key",
    "task-runner-configuration-manager-service and disk-usage-monitor",
    "hf_hub_download(repo_id='bert-base-uncased')",
    "sk-learn is not scikit-learn",
    "MAC 00:1a:2b:3c:4d:5e and time 10:20:30",
    "Authorization: Bearer {API_KEY}",
    "Authorization: Bearer $TOKEN",
]

"""Fake cloud providers that check what the real ones would, for tests.

- `AwsIdentity`: issues expiring AWS key pairs, as STS / the container endpoint do, and
  remembers them so a fake service can look a signature's key up.
- `FakeAwsCredentials`: the AWS credential endpoints botocore's chain calls: STS
  `AssumeRoleWithWebIdentity` (IRSA; point `AWS_ENDPOINT_URL_STS` here) and the container
  credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).
- `FakeBedrock`: Bedrock runtime InvokeModel. It recomputes each request's SigV4 signature
  from the request it received and the issued secret (botocore's signer as the oracle),
  checks the path `/model/{id}/invoke(-with-response-stream)`, the body (`anthropic_version:
  bedrock-2023-05-31`, no `model` or `stream`, `anthropic_beta` a list) and answers JSON or
  AWS event-stream (`application/vnd.amazon.eventstream`, payload `{"bytes": base64 event}`).
- `FakeGoogle`: Google's OAuth token endpoint (verifies the service account's RS256 JWT
  assertion against its public key, issues short-lived tokens) and Vertex AI's
  `:rawPredict` / `:streamRawPredict` (checks the bearer token is live, the `@`-versioned
  model id, `anthropic_version: vertex-2023-10-16`, no `model`).
- `FakeFoundry`: Microsoft Foundry's `/anthropic/v1/messages`, checking `x-api-key` or a
  bearer token.

Answers reuse `tests.fake_provider` so the content and usage match the Anthropic fake.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime as dt
import re
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import jwt
import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import ReadOnlyCredentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from extproc.cloud.upstreams import BEDROCK_BETAS
from tests import fake_provider as fp

Json = dict[str, Any]
SKEW_SECONDS = (
    300  # AWS refuses a signature dated more than 5 minutes off (15 in fact; 5 is stricter)
)
_AUTH_PREFIX = "AWS4-HMAC-SHA256 "
# Google checks a service account assertion's `aud` against its token URL (google-auth
# always uses this one, whatever the key's token_uri says).
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def _iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- event-stream


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return (
        bytes([len(raw_name)]) + raw_name + b"\x07" + struct.pack(">H", len(raw_value)) + raw_value
    )


def eventstream_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (lengths + CRC), string headers, payload, CRC."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack(">II", total, len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


def bedrock_chunk(event: Json) -> bytes:
    """A Bedrock `chunk` event carrying one Anthropic stream event, base64 in `bytes`."""
    payload = orjson.dumps({"bytes": base64.b64encode(orjson.dumps(event)).decode(), "p": "abcd"})
    headers = {
        ":event-type": "chunk",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return eventstream_message(headers, payload)


# --------------------------------------------------------------------------- AWS identity


@dataclass
class IssuedKey:
    access_key: str
    secret_key: str
    token: str
    expires_at: float


@dataclass
class AwsIdentity:
    """Key pairs as STS issues them: each expires; `lifetime` seconds from issue."""

    lifetime: float = 3600.0
    keys: dict[str, IssuedKey] = field(default_factory=dict)

    def issue(self) -> IssuedKey:
        key = IssuedKey(
            "ASIA" + secrets.token_hex(8).upper(),
            secrets.token_urlsafe(30),
            "FwoG" + secrets.token_urlsafe(40),
            time.time() + self.lifetime,
        )
        self.keys[key.access_key] = key
        return key

    def static(self, access_key: str, secret_key: str) -> IssuedKey:
        key = IssuedKey(access_key, secret_key, "", float("inf"))
        self.keys[access_key] = key
        return key


class _Server:
    """An aiohttp app on a free loopback port."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port = 0

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application(client_max_size=fp.MAX_BODY_BYTES)
        self.routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runner, self.port = runner, int(runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class FakeAwsCredentials(_Server):
    """STS AssumeRoleWithWebIdentity and the container credentials endpoint."""

    def __init__(self, identity: AwsIdentity, *, role_arn: str, web_token: str) -> None:
        super().__init__()
        self.identity, self.role_arn, self.web_token = identity, role_arn, web_token
        self.container_token = secrets.token_hex(8)
        self.calls: list[str] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/", self._sts)
        app.router.add_get("/container-credentials", self._container)

    async def _sts(self, request: web.Request) -> web.Response:
        form = {k: v[0] for k, v in parse_qs((await request.read()).decode()).items()}
        self.calls.append(form.get("Action", ""))
        if form.get("Action") != "AssumeRoleWithWebIdentity":
            return _sts_error(400, "InvalidAction", "only AssumeRoleWithWebIdentity")
        if form.get("RoleArn") != self.role_arn or form.get("WebIdentityToken") != self.web_token:
            return _sts_error(
                403, "AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity"
            )
        key = self.identity.issue()
        return web.Response(body=_sts_answer(key, self.role_arn), content_type="text/xml")

    async def _container(self, request: web.Request) -> web.Response:
        self.calls.append("container")
        if request.headers.get("Authorization") != self.container_token:
            return web.json_response({"message": "bad token"}, status=401)
        key = self.identity.issue()
        return web.json_response(
            {
                "AccessKeyId": key.access_key,
                "SecretAccessKey": key.secret_key,
                "Token": key.token,
                "Expiration": _iso(key.expires_at),
            }
        )


def _sts_answer(key: IssuedKey, role_arn: str) -> bytes:
    ns = "https://sts.amazonaws.com/doc/2011-06-15/"
    return f"""<AssumeRoleWithWebIdentityResponse xmlns="{ns}">
<AssumeRoleWithWebIdentityResult>
<Credentials><AccessKeyId>{key.access_key}</AccessKeyId><SecretAccessKey>{key.secret_key}</SecretAccessKey>
<SessionToken>{key.token}</SessionToken><Expiration>{_iso(key.expires_at)}</Expiration></Credentials>
<SubjectFromWebIdentityToken>system:serviceaccount:gw:extproc</SubjectFromWebIdentityToken>
<AssumedRoleUser><Arn>{role_arn}/s</Arn><AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>
</AssumeRoleWithWebIdentityResult>
<ResponseMetadata><RequestId>{secrets.token_hex(8)}</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>""".encode()


def _sts_error(status: int, code: str, message: str) -> web.Response:
    error = f"<Type>Sender</Type><Code>{code}</Code><Message>{message}</Message>"
    body = f"<ErrorResponse><Error>{error}</Error></ErrorResponse>"
    return web.Response(status=status, body=body.encode(), content_type="text/xml")


# --------------------------------------------------------------------------- SigV4 oracle


class _Oracle(SigV4Auth):
    """botocore's SigV4 with exactly the headers the request says it signed.

    botocore's signer never signs `user-agent` or `expect` (its own blacklist), but AWS
    verifies whatever `SignedHeaders` lists, and Envoy's filter does sign `user-agent`.
    """

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        header_map = HTTPHeaders()
        for name, value in request.headers.items():
            header_map[name.lower()] = value
        return header_map


class SignatureError(Exception):
    """The request's SigV4 signature is missing or wrong (AWS answers 403)."""


def _parse_authorization(value: str) -> dict[str, str]:
    if not value.startswith(_AUTH_PREFIX):
        raise SignatureError("Authorization header is not AWS4-HMAC-SHA256")
    parts = dict(p.strip().split("=", 1) for p in value[len(_AUTH_PREFIX) :].split(","))
    if set(parts) != {"Credential", "SignedHeaders", "Signature"}:
        raise SignatureError("Authorization header lacks Credential/SignedHeaders/Signature")
    return parts


def verify_sigv4(
    identity: AwsIdentity,
    *,
    service: str,
    region: str,
    method: str,
    raw_path: str,
    headers: dict[str, str],
    body: bytes,
) -> IssuedKey:
    """Recompute the signature from the received request with botocore; raise on mismatch."""
    parts = _parse_authorization(headers.get("authorization", ""))
    access_key, date, scope_region, scope_service, terminal = parts["Credential"].split("/")
    key = identity.keys.get(access_key)
    if key is None or time.time() >= key.expires_at:
        raise SignatureError("The security token included in the request is invalid or expired")
    if (scope_region, scope_service, terminal) != (region, service, "aws4_request"):
        raise SignatureError(
            f"credential scope {scope_region}/{scope_service} is not {region}/{service}"
        )
    amz_date = headers.get("x-amz-date", "")
    signed_at = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC).timestamp()
    if abs(time.time() - signed_at) > SKEW_SECONDS or not amz_date.startswith(date):
        raise SignatureError("Signature expired or dated in the future")
    if key.token and headers.get("x-amz-security-token") != key.token:
        raise SignatureError("session token missing or wrong")
    names = parts["SignedHeaders"].split(";")
    if "host" not in names or "x-amz-date" not in names:
        raise SignatureError("host and x-amz-date must be signed")
    signed = {name: headers.get(name, "") for name in names}
    request = AWSRequest(
        method=method, url=f"http://{headers['host']}{raw_path}", data=body, headers=signed
    )
    request.context["timestamp"] = amz_date
    auth = _Oracle(
        ReadOnlyCredentials(key.access_key, key.secret_key, key.token or None), service, region
    )
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    if not secrets.compare_digest(expected, parts["Signature"]):
        raise SignatureError(
            "The request signature we calculated does not match the signature you provided."
        )
    return key


# --------------------------------------------------------------------------- Bedrock


@dataclass(frozen=True)
class BedrockCall:
    """One request the fake Bedrock accepted."""

    model_id: str
    action: str
    headers: dict[str, str]
    body: Json
    access_key: str


class FakeBedrock(_Server):
    """Bedrock runtime InvokeModel / InvokeModelWithResponseStream for Anthropic models."""

    def __init__(
        self,
        identity: AwsIdentity,
        region: str = "us-east-1",
        service: str = "bedrock",
        *,
        verify: bool = True,
    ) -> None:
        super().__init__()
        self.identity, self.region, self.service = identity, region, service
        self.verify = verify  # False only for a benchmark's unsigned baseline
        self.api_keys: set[str] = set()  # Bedrock API keys (Authorization: Bearer ...)
        self.calls: list[BedrockCall] = []
        self.refused: list[str] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._serve)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        raw_path = request.rel_url.raw_path
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        try:
            if not self.verify or bearer in self.api_keys:
                return await self._unverified(request, raw_path, headers, body)
            key = verify_sigv4(
                self.identity,
                service=self.service,
                region=self.region,
                method=request.method,
                raw_path=raw_path,
                headers=headers,
                body=body,
            )
        except SignatureError as exc:
            self.refused.append(str(exc))
            return _aws_error(403, "InvalidSignatureException", str(exc))
        try:
            call = self._parse(request.method, raw_path, headers, body, key.access_key)
        except fp.ApiError as exc:
            self.refused.append(exc.message)
            kind = "ValidationException" if exc.status == 400 else "ResourceNotFoundException"
            return _aws_error(exc.status, kind, exc.message)
        self.calls.append(call)
        return await self._answer(request, call)

    async def _unverified(
        self, request: web.Request, raw_path: str, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        call = self._parse(request.method, raw_path, headers, body, "")
        self.calls.append(call)
        return await self._answer(request, call)

    def _parse(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes, access_key: str
    ) -> BedrockCall:
        segments = raw_path.split("/")
        if method != "POST" or len(segments) != 4 or segments[1] != "model":
            raise fp.ApiError(404, f"no route for {method} {raw_path}")
        model_id, action = unquote(segments[2]), segments[3]
        if action not in ("invoke", "invoke-with-response-stream"):
            raise fp.ApiError(404, f"unknown action {action}")
        payload = orjson.loads(body)
        if payload.get("anthropic_version") != "bedrock-2023-05-31":
            raise fp.ApiError(400, "anthropic_version: bedrock-2023-05-31 is required")
        for banned in ("model", "stream"):
            if banned in payload:
                raise fp.ApiError(400, f"extraneous key [{banned}] is not permitted")
        beta = payload.get("anthropic_beta")
        if beta is not None and not (
            isinstance(beta, list) and all(isinstance(b, str) for b in beta)
        ):
            raise fp.ApiError(400, "anthropic_beta must be a list of strings")
        if beta is not None and not set(beta) <= set(BEDROCK_BETAS):
            # What Bedrock answers for a flag it does not know (Anthropic-API-only ones).
            raise fp.ApiError(400, "invalid beta flag")
        return BedrockCall(model_id, action, headers, payload, access_key)

    async def _answer(self, request: web.Request, call: BedrockCall) -> web.StreamResponse:
        stream = call.action == "invoke-with-response-stream"
        payload = {**call.body, "model": anthropic_name(call.model_id), "stream": stream}
        body = orjson.dumps(payload)
        headers = {k: v for k, v in call.headers.items() if k.startswith("x-fake-")}
        fcall = fp.Call(
            "POST", "/v1/messages", {}, headers, body, fp.parse_controls(headers), "anthropic", ()
        )
        reply = fp.anthropic_messages(fcall.with_payload())
        ids = {"x-amzn-requestid": secrets.token_hex(16)}
        if not isinstance(reply, list):
            return web.json_response(reply, headers=ids)
        response = web.StreamResponse(
            headers={**ids, "content-type": "application/vnd.amazon.eventstream"}
        )
        await response.prepare(request)
        for event in reply:
            data = orjson.loads(event.data)
            if data.get("type") == "message_stop":
                data["amazon-bedrock-invocationMetrics"] = {
                    "inputTokenCount": 1,
                    "outputTokenCount": 1,
                }
            await response.write(bedrock_chunk(data))
        await response.write_eof()
        return response


def anthropic_name(model_id: str) -> str:
    """The model name Bedrock's answers carry: `us.anthropic.claude-x-20250929-v1:0` ->
    `claude-x-20250929` (AWS's InvokeModel examples answer with the Anthropic name)."""
    name = model_id.rsplit("anthropic.", 1)[-1]
    return re.sub(r"-v\d+(:\d+)?$", "", name)


def _aws_error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response(
        {"message": message}, status=status, headers={"x-amzn-errortype": kind}
    )


# --------------------------------------------------------------------------- Google


def service_account_key(
    token_uri: str, email: str = "gateway@proj.iam.gserviceaccount.com"
) -> tuple[Json, Any]:
    """A fresh service account JSON key (and its public key) whose token_uri is the fake."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "proj",
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    return info, private.public_key()


@dataclass(frozen=True)
class VertexCall:
    project: str
    region: str
    model_id: str
    action: str
    headers: dict[str, str]
    body: Json


class FakeGoogle(_Server):
    """Google's token endpoint (`POST /token`) and Vertex rawPredict on one server."""

    def __init__(self, token_lifetime: float = 3600.0) -> None:
        super().__init__()
        self.token_lifetime = token_lifetime
        self.accounts: dict[str, Any] = {}  # client_email -> RSA public key
        self.tokens: dict[str, float] = {}  # token -> expiry
        self.calls: list[VertexCall] = []
        self.refused: list[str] = []
        self.metadata_calls: list[str] = []

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def new_key(self) -> Json:
        """A service account key the token endpoint trusts."""
        info, public = service_account_key(self.token_uri)
        self.accounts[info["client_email"]] = public
        return info

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/{tail:.*}", self._vertex)
        app.router.add_get("/", self._metadata_ping)
        app.router.add_get("/computeMetadata/v1/{tail:.*}", self._metadata)

    # The GKE / Compute Engine metadata server: what Workload Identity gives a pod.
    async def _metadata_ping(self, request: web.Request) -> web.Response:
        return web.Response(headers={"Metadata-Flavor": "Google"})

    async def _metadata(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        self.metadata_calls.append(request.path)
        tail = request.match_info["tail"]
        flavor = {"Metadata-Flavor": "Google"}
        if tail == "project/project-id":
            return web.Response(text="proj", headers=flavor)
        if tail == "instance/service-accounts/default/":
            email = "gateway@proj.iam.gserviceaccount.com"
            answer = {"email": email, "scopes": [GOOGLE_SCOPE], "aliases": ["default"]}
            return web.json_response(answer, headers=flavor)
        if tail == "instance/service-accounts/default/token":
            return web.json_response(self._issue(), headers=flavor)
        return web.Response(status=404, headers=flavor)

    def _issue(self) -> Json:
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.tokens[token] = time.time() + self.token_lifetime
        return {
            "access_token": token,
            "expires_in": int(self.token_lifetime),
            "token_type": "Bearer",
        }

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            self._verify_assertion(str(form.get("assertion", "")))
        except (jwt.PyJWTError, KeyError, ValueError) as exc:
            self.refused.append(f"assertion: {exc}")
            return web.json_response(
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                status=400,
            )
        return web.json_response(self._issue())

    def _verify_assertion(self, assertion: str) -> None:
        issuer = jwt.decode(assertion, options={"verify_signature": False})["iss"]
        claims = jwt.decode(
            assertion, self.accounts[issuer], algorithms=["RS256"], audience=GOOGLE_TOKEN_AUDIENCE
        )
        if (
            "https://www.googleapis.com/auth/cloud-platform"
            not in str(claims.get("scope", "")).split()
        ):
            raise ValueError("scope cloud-platform missing")
        if int(claims["exp"]) - int(claims["iat"]) > 3600:
            raise ValueError("assertion lives over an hour")

    async def _vertex(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        if self.tokens.get(bearer, 0.0) <= time.time():
            self.refused.append("token")
            return _google_error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
            )
        try:
            call = self._parse(request.rel_url.raw_path, headers, await request.read())
        except fp.ApiError as exc:
            self.refused.append(exc.message)
            return _google_error(
                exc.status, "INVALID_ARGUMENT" if exc.status == 400 else "NOT_FOUND", exc.message
            )
        self.calls.append(call)
        return await self._answer(request, call)

    def _parse(self, raw_path: str, headers: dict[str, str], body: bytes) -> VertexCall:
        segments = raw_path.split("/")
        # /v1/projects/{p}/locations/{r}/publishers/anthropic/models/{id}:{action}
        if (
            len(segments) != 10
            or segments[2:9:2] != ["projects", "locations", "publishers", "models"]
            or segments[7] != "anthropic"
        ):
            raise fp.ApiError(404, f"no route for {raw_path}")
        model_id, _, action = unquote(segments[9]).partition(":")
        if action not in ("rawPredict", "streamRawPredict"):
            raise fp.ApiError(404, f"unknown method {action}")
        if "@" not in model_id:
            raise fp.ApiError(404, f"Publisher model {model_id} needs a version (@YYYYMMDD)")
        payload = orjson.loads(body)
        if payload.get("anthropic_version") != "vertex-2023-10-16":
            raise fp.ApiError(400, "anthropic_version: vertex-2023-10-16 is required")
        if "model" in payload:
            raise fp.ApiError(400, "model: Extra inputs are not permitted")
        return VertexCall(segments[3], segments[5], model_id, action, headers, payload)

    async def _answer(self, request: web.Request, call: VertexCall) -> web.StreamResponse:
        payload = {**call.body, "model": call.model_id.partition("@")[0]}
        headers = {k: v for k, v in call.headers.items() if k.startswith("x-fake-")}
        fcall = fp.Call(
            "POST",
            "/v1/messages",
            {},
            headers,
            orjson.dumps(payload),
            fp.parse_controls(headers),
            "anthropic",
            (),
        )
        reply = fp.anthropic_messages(fcall.with_payload())
        if not isinstance(reply, list):
            return web.json_response(reply)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for event in reply:
            await response.write(fp.encode_event(event))
        await response.write_eof()
        return response


def _google_error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": status, "message": message, "status": kind}}, status=status
    )


# --------------------------------------------------------------------------- Foundry


class FakeFoundry(_Server):
    """Foundry's `/anthropic/v1/messages` (an api key or an Entra bearer token) and the
    Entra v2.0 token endpoint (`/{tenant}/oauth2/v2.0/token`, client credentials with a
    secret or a federated workload-identity assertion) on one server."""

    def __init__(self, api_key: str, *, tenant: str = "tenant-1", client_id: str = "app-1") -> None:
        super().__init__()
        self.api_key, self.tenant, self.client_id = api_key, tenant, client_id
        self.client_secret: str | None = None
        self.federated_token: str | None = None
        self.token_lifetime = 3600.0
        self.tokens: dict[str, float] = {}
        self.received: list[dict[str, str]] = []
        self.refused: list[str] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/anthropic/v1/messages", self._messages)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        problem = self._token_problem(
            request.match_info["tenant"], {k: str(v) for k, v in form.items()}
        )
        if problem:
            self.refused.append(problem)
            return web.json_response(
                {"error": "invalid_client", "error_description": problem}, status=401
            )
        token = "eyJ0eXAi.entra-" + secrets.token_urlsafe(16)
        self.tokens[token] = time.time() + self.token_lifetime
        answer = {
            "token_type": "Bearer",
            "expires_in": int(self.token_lifetime),
            "access_token": token,
        }
        return web.json_response(answer)

    def _token_problem(self, tenant: str, form: dict[str, str]) -> str | None:
        if tenant != self.tenant or form.get("client_id") != self.client_id:
            return "AADSTS700016: application not found in the directory"
        if (
            form.get("grant_type") != "client_credentials"
            or form.get("scope") != "https://ai.azure.com/.default"
        ):
            return "AADSTS70011: invalid grant or scope"
        if (
            self.federated_token is not None
            and form.get("client_assertion") == self.federated_token
        ):
            ok = (
                form.get("client_assertion_type")
                == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            )
            return None if ok else "AADSTS700024: bad assertion type"
        if self.client_secret is not None and form.get("client_secret") == self.client_secret:
            return None
        return "AADSTS7000215: invalid client secret or assertion"

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(headers)
        key = headers.get("x-api-key") or headers.get("api-key")
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        if key != self.api_key and self.tokens.get(bearer, 0.0) <= time.time():
            self.refused.append("auth")
            message = "Access denied due to invalid subscription key."
            return web.json_response({"error": {"code": "401", "message": message}}, status=401)
        body = await request.read()
        call = fp.Call(
            "POST", "/v1/messages", {}, headers, body, fp.parse_controls(headers), "anthropic", ()
        )
        reply = fp.anthropic_messages(call.with_payload())
        if isinstance(reply, list):
            data = b"".join(fp.encode_event(e) for e in reply)
            return web.Response(body=data, content_type="text/event-stream")
        return web.json_response(reply)


__all__ = [
    "AwsIdentity",
    "FakeAwsCredentials",
    "FakeBedrock",
    "FakeClaudePlatformAws",
    "FakeFoundry",
    "FakeGoogle",
    "SignatureError",
    "bedrock_chunk",
    "eventstream_message",
    "serving",
    "verify_sigv4",
]
_ = (binascii, dataclasses)


class FakeClaudePlatformAws(_Server):
    """Claude Platform on AWS: `/v1/messages`, SigV4 for `aws-external-anthropic` recomputed
    from the request, and a required `anthropic-workspace-id`."""

    def __init__(self, identity: AwsIdentity, region: str = "us-west-2") -> None:
        super().__init__()
        self.identity, self.region = identity, region
        self.received: list[dict[str, str]] = []
        self.refused: list[str] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = await request.read()
        try:
            verify_sigv4(
                self.identity,
                service="aws-external-anthropic",
                region=self.region,
                method=request.method,
                raw_path=request.rel_url.raw_path_qs,
                headers=headers,
                body=body,
            )
        except SignatureError as exc:
            self.refused.append(str(exc))
            return web.json_response({"message": str(exc)}, status=403)
        if not headers.get("anthropic-workspace-id"):
            self.refused.append("workspace")
            return web.json_response({"message": "anthropic-workspace-id is required"}, status=400)
        self.received.append(headers)
        call = fp.Call(
            "POST", "/v1/messages", {}, headers, body, fp.parse_controls(headers), "anthropic", ()
        )
        reply = fp.anthropic_messages(call.with_payload())
        if isinstance(reply, list):
            data = b"".join(fp.encode_event(e) for e in reply)
            return web.Response(body=data, content_type="text/event-stream")
        return web.json_response(reply)


@contextlib.contextmanager
def serving(*servers: _Server) -> Iterator[None]:
    """Run fake servers on their own event loop in a daemon thread (for sync clients)."""
    ready = threading.Event()
    failure: list[BaseException] = []
    loop_and_stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop_and_stop.append((asyncio.get_running_loop(), stop))
        try:
            for server in servers:
                await server.start()
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            ready.set()
        try:
            await stop.wait()
        finally:
            for server in servers:
                await server.stop()

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="cloud-fakes", daemon=True)
    thread.start()
    ready.wait(30)
    if failure:
        raise RuntimeError("cloud fakes failed to start") from failure[0]
    try:
        yield
    finally:
        loop, stop = loop_and_stop[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)

"""A loopback OpenID Connect provider for the sign-in tests, as strict as a real one.

It stands in for the company's IdP (Keycloak, Okta) and checks what they check:
the registered client id and secret (HTTP Basic or form), the registered redirect
URI (at /authorize and again at /token), PKCE S256 (a code without the right
verifier is refused), single-use authorization codes, and it signs id_tokens with
RS256 under a published JWKS, with the login's nonce. Instead of a login form it
signs in `next_user` (set by the test) at once.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import rsa

CLIENT_ID = "claude-gateway"
CLIENT_SECRET = "s3cret-of-the-gateway"


@dataclass
class User:
    email: str
    groups: list[str]


@dataclass
class Issuer:
    url: str = ""
    redirect_uris: set[str] = field(default_factory=set)
    next_user: User = field(default_factory=lambda: User("ana@example.com", ["eng"]))
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def jwks(self) -> dict[str, Any]:
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**public, "kid": "test-key", "use": "sig", "alg": "RS256"}]}

    def metadata(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "authorization_endpoint": f"{self.url}/authorize",
            "token_endpoint": f"{self.url}/token",
            "jwks_uri": f"{self.url}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        }

    def authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """A redirect back with a code, or an error status for a bad request."""
        problem = self._authorize_problem(query)
        if problem:
            self.refused.append(problem)
            return 400, problem
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.codes[code] = {**query, "user": self.next_user, "at": time.time()}
        back = {"code": code, "state": query["state"]}
        return 302, query["redirect_uri"] + "?" + urllib.parse.urlencode(back)

    def _authorize_problem(self, query: dict[str, str]) -> str | None:
        if query.get("client_id") != CLIENT_ID:
            return "unknown client_id"
        if query.get("redirect_uri") not in self.redirect_uris:
            return "redirect_uri is not registered"
        if query.get("response_type") != "code" or "openid" not in query.get("scope", "").split():
            return "response_type=code and scope openid are required"
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return "PKCE S256 is required"
        if not query.get("state") or not query.get("nonce"):
            return "state and nonce are required"
        return None

    def token(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if authorization.startswith("Basic "):
            pair = base64.b64decode(authorization[6:]).decode()
            client_id, _, secret = (urllib.parse.unquote(p) for p in pair.partition(":"))
        if client_id != CLIENT_ID or secret != CLIENT_SECRET:
            return self._refuse(401, "invalid_client")
        with self.lock:
            grant = self.codes.pop(form.get("code", ""), None)
        if form.get("grant_type") != "authorization_code" or grant is None:
            return self._refuse(400, "invalid_grant")
        if form.get("redirect_uri") != grant["redirect_uri"]:
            return self._refuse(400, "invalid_grant")
        verifier = form.get("code_verifier", "").encode()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
        if challenge.decode() != grant["code_challenge"]:
            return self._refuse(400, "invalid_grant")
        return 200, {
            "access_token": secrets.token_urlsafe(16),
            "token_type": "Bearer",
            "expires_in": 300,
            "id_token": self._id_token(grant),
        }

    def _refuse(self, status: int, error: str) -> tuple[int, dict[str, Any]]:
        self.refused.append(error)
        return status, {"error": error}

    def _id_token(self, grant: dict[str, Any]) -> str:
        user: User = grant["user"]
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": CLIENT_ID,
            "sub": "sub-" + user.email,
            "iat": now,
            "exp": now + 300,
            "nonce": grant["nonce"],
            "email": user.email,
            "groups": user.groups,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "test-key"})


def _handler(issuer: Issuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in {**headers, "content-length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/.well-known/openid-configuration":
                return self._send(
                    200, orjson.dumps(issuer.metadata()), {"content-type": "application/json"}
                )
            if path == "/jwks":
                return self._send(
                    200, orjson.dumps(issuer.jwks()), {"content-type": "application/json"}
                )
            if path == "/authorize":
                status, where = issuer.authorize(dict(urllib.parse.parse_qsl(query)))
                if status == 302:
                    return self._send(302, b"", {"location": where})
                return self._send(status, where.encode(), {"content-type": "text/plain"})
            return self._send(404, b"not found", {})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            if self.path != "/token":
                return self._send(404, b"not found", {})
            status, body = issuer.token(form, self.headers.get("authorization", ""))
            return self._send(status, orjson.dumps(body), {"content-type": "application/json"})

    return Handler


@contextmanager
def running() -> Iterator[Issuer]:
    issuer = Issuer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(issuer))
    issuer.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield issuer
    finally:
        server.shutdown()
        server.server_close()

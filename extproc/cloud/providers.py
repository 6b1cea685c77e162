"""Credential providers for cloud upstreams: what authorizes a request on its way out.

Each has the upstream credential protocol's shape (`authorize(request)` returning the
headers to set, `describe()` for logs). The request is the one that leaves: its final
path, authority and body bytes, so a SigV4 signature covers exactly what is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from extproc.cloud import sigv4
from extproc.cloud.config import (
    BedrockSettings,
    ClaudePlatformAwsSettings,
    CloudSettings,
    EntraSettings,
    FoundrySettings,
    VertexSettings,
)
from extproc.cloud.refresh import Refreshing
from extproc.credentials import Credential, CredentialSource

if TYPE_CHECKING:
    from extproc.cloud import aws

# botocore and google-auth are imported only when a cloud provider is configured: they
# add ~0.5 s of imports and tens of MB of objects every full GC pass would walk, which a
# gateway without cloud providers must not pay (the guard flood test measures the pauses).

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, str]]


class OutgoingRequest(Protocol):
    """What a credential provider reads of the request (`UpstreamRequest` has it)."""

    @property
    def method(self) -> str: ...
    @property
    def authority(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    def final_headers(self) -> dict[str, str]: ...


async def warm(source: Refreshing[Any], provider: str, what: str) -> None:
    """Fetch once at start, so the first request does not wait and a broken identity is
    logged at once (the request path still refuses cleanly if it stays broken)."""
    try:
        await source.ensure()
        log.info("provider %s: %s ready", provider, what)
    except Exception as exc:  # reported, never fatal: the identity may appear later (IRSA)
        log.error(
            "provider %s: %s not available yet: %s: %.300s", provider, what, type(exc).__name__, exc
        )


class SigV4Provider:
    """Signs with the AWS chain's current credentials (refreshed ahead of expiry)."""

    def __init__(self, credentials: aws.AwsCredentials, service: str, region: str) -> None:
        self.credentials, self.service, self.region = credentials, service, region

    async def warm(self, provider: str) -> None:
        await warm(self.credentials, provider, self.describe())

    async def authorize(self, request: OutgoingRequest) -> Headers:
        keys = await self.credentials.get()
        content_type = request.final_headers().get("content-type", "application/json")
        # Envoy's dispatch route sends `host` as the cluster's host name without a port
        # (auto_host_rewrite), so that is what is signed (the same on the default port).
        host = (
            request.authority.rsplit(":", 1)[0]
            if "]" not in request.authority
            else request.authority
        )
        url = f"https://{host}{request.path}"
        signed = sigv4.sign_with(
            keys, self.service, self.region, request.method, url, request.body, content_type
        )
        return (("content-type", content_type), *signed.items())

    def describe(self) -> str:
        return f"AWS SigV4 ({self.service}, {self.region}) from the standard credential chain"


class BearerProvider:
    """An OAuth access token (Google, Entra) as `authorization: Bearer`."""

    def __init__(self, token: Refreshing[str], what: str) -> None:
        self.token, self.what = token, what

    async def warm(self, provider: str) -> None:
        await warm(self.token, provider, self.what)

    async def authorize(self, request: OutgoingRequest) -> Headers:
        return (("authorization", f"Bearer {await self.token.get()}"),)

    def describe(self) -> str:
        return self.what


class HeaderKey:
    """A held api key in one or more headers (Foundry: `x-api-key` and `api-key`; a
    Bedrock API key: `authorization` with the `Bearer ` prefix)."""

    def __init__(self, credential: Credential, headers: tuple[str, ...], prefix: str = "") -> None:
        self.credential, self.headers, self.prefix = credential, headers, prefix

    async def authorize(self, request: OutgoingRequest) -> Headers:
        secret = self.prefix + self.credential.get()
        return tuple((name, secret) for name in self.headers)

    def describe(self) -> str:
        return f"key in {', '.join(self.headers)}"


class WithHeaders:
    """Another provider's headers plus fixed ones (Claude Platform on AWS's workspace id)."""

    def __init__(self, inner: SigV4Provider | HeaderKey, extra: Headers) -> None:
        self.inner, self.extra = inner, tuple(extra)

    async def authorize(self, request: OutgoingRequest) -> Headers:
        return (*self.extra, *await self.inner.authorize(request))

    async def warm(self, provider: str) -> None:
        if isinstance(self.inner, SigV4Provider):
            await self.inner.warm(provider)

    def describe(self) -> str:
        return self.inner.describe()


CloudCredential = SigV4Provider | BearerProvider | HeaderKey | WithHeaders


def _entra(settings: EntraSettings, environ: Mapping[str, str] | None) -> BearerProvider:
    from extproc.cloud import azure

    secret = settings.client_secret
    read = Credential(secret, environ).get if secret is not None else None
    fetch = azure.token_fetcher(
        settings.tenant_id,
        settings.client_id,
        federated_token_file=settings.federated_token_file,
        client_secret=read,
        authority=settings.authority,
    )
    return BearerProvider(azure.EntraToken(fetch), "Entra ID token (client credentials)")


def credential_for(
    settings: CloudSettings,
    key: CredentialSource | None,
    environ: Mapping[str, str] | None = None,
) -> CloudCredential | None:
    """The credential provider a cloud provider's config builds; None: the caller's passes."""
    if isinstance(settings, BedrockSettings) and not settings.sigv4:
        if key is None:
            return None
        return HeaderKey(Credential(key, environ), ("authorization",), "Bearer ")
    if isinstance(settings, BedrockSettings):
        from extproc.cloud import aws

        chain = aws.AwsCredentials(profile=settings.profile)
        return SigV4Provider(chain, sigv4.BEDROCK_SERVICE, settings.region)
    if isinstance(settings, VertexSettings):
        from extproc.cloud import google

        token = google.GoogleToken(key_file=settings.key_file)
        return BearerProvider(token, "Google OAuth token (google-auth)")
    if isinstance(settings, FoundrySettings) and settings.entra is not None:
        return _entra(settings.entra, environ)
    if isinstance(settings, ClaudePlatformAwsSettings):
        return _claude_platform_aws(settings, key, environ)
    if key is None:
        return None
    return HeaderKey(Credential(key, environ), ("x-api-key", "api-key"))


def _claude_platform_aws(
    settings: ClaudePlatformAwsSettings,
    key: CredentialSource | None,
    environ: Mapping[str, str] | None,
) -> CloudCredential | None:
    """SigV4 (`aws-external-anthropic`) or an api key, plus the configured workspace id."""
    inner: SigV4Provider | HeaderKey
    if settings.sigv4:
        from extproc.cloud import aws

        chain = aws.AwsCredentials(profile=settings.profile)
        inner = SigV4Provider(chain, sigv4.CLAUDE_PLATFORM_SERVICE, settings.region)
    elif key is not None:
        inner = HeaderKey(Credential(key, environ), ("x-api-key",))
    else:
        return None
    if settings.workspace_id is None:  # the caller's anthropic-workspace-id passes through
        return inner
    return WithHeaders(inner, (("anthropic-workspace-id", settings.workspace_id),))

"""An upstream adapter per provider kind: how a request leaves for that provider.

The provider's `api:` in the config names its kind. Its adapter (a module-level
singleton, `adapter_for(kind)`) owns:

- `dialect`: the provider's wire schema (its answers are read through it);
- `headers`: the routing header Envoy's dispatch route reads, the path rebased onto
  the provider's base URL, `accept-encoding: identity` (the gateway reads every
  answer), and the credential's headers replacing the caller's;
- `credential_for`: the `CredentialProvider` a provider's config builds (a held key
  in the kind's key header today; SigV4, OAuth token sources next);
- `answer_framing`: the framing of its streamed answers, by content type;
- the translator between a client's dialect and its own (`extproc.upstream.translate`).

Register a new kind with `register_adapter` (and its name in `extproc.apis.kind`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.apis.dialect import ANTHROPIC, OPENAI, Dialect
from extproc.apis.framing import Framing, framing_for
from extproc.apis.kind import ApiKind
from extproc.cloud.providers import credential_for as cloud_credential
from extproc.config import Config, ProviderConfig
from extproc.credentials import Credential
from extproc.decisions import HeaderChanges
from extproc.upstream.credentials import CredentialProvider, StaticKey
from extproc.upstream.translate import Translator, translator_for

__all__ = [
    "CALLER_AUTH",
    "ROUTING_HEADER",
    "AnthropicUpstream",
    "OpenAIUpstream",
    "UpstreamAdapter",
    "adapter_for",
    "default_provider",
    "register_adapter",
]

ROUTING_HEADER = "x-gateway-cluster"
# Where a caller's credential travels (a gateway key, an SSO token, its own provider key):
# with a held credential none of them reaches the provider unless the credential sets it.
CALLER_AUTH = ("x-api-key", "authorization")


class UpstreamAdapter:
    kind: ClassVar[ApiKind]
    dialect: ClassVar[Dialect]
    key_header: ClassVar[str]  # where a held key goes
    key_prefix: ClassVar[str] = ""

    def credential_for(
        self, provider: ProviderConfig, environ: Mapping[str, str] | None = None
    ) -> CredentialProvider | None:
        """The provider's credential as configured; None: the caller's own passes through."""
        if provider.credential is None:
            return None
        return StaticKey(Credential(provider.credential, environ), self.key_header, self.key_prefix)

    def prepare(
        self,
        provider: ProviderConfig,
        body: dict[str, Any],
        path: str,
        headers: Mapping[str, str],
    ) -> tuple[dict[str, Any], str]:
        """The provider's body and path for a translated request (cloud providers reshape
        it: the model into the URL, headers into the body); identity by default."""
        return body, path

    def key_headers(self, secret: str) -> tuple[tuple[str, str], ...]:
        return ((self.key_header, self.key_prefix + secret),)

    def route(self, cluster: str, provider: ProviderConfig, path: str) -> list[tuple[str, str]]:
        """Send the request to the provider's cluster, on its path, uncompressed."""
        changes = [(ROUTING_HEADER, cluster), ("accept-encoding", "identity")]
        prefix = provider.path_prefix
        if prefix:
            changes.append((":path", prefix + path))
        return changes

    def headers(
        self, route: list[tuple[str, str]], auth: Sequence[tuple[str, str]] | None
    ) -> HeaderChanges:
        """The routing changes plus the credential's headers, which replace the caller's."""
        if auth is None:
            return HeaderChanges(set=tuple(route))
        return HeaderChanges(set=(*route, *auth), remove=replaced_auth(auth))

    def answer_framing(self, content_type: str) -> Framing | None:
        return framing_for(content_type)

    def translator(self, client: ApiKind) -> Translator | None:
        return translator_for(client, self.kind)


class AnthropicUpstream(UpstreamAdapter):
    kind = "anthropic"
    dialect = ANTHROPIC
    key_header = "x-api-key"

    def credential_for(
        self, provider: ProviderConfig, environ: Mapping[str, str] | None = None
    ) -> CredentialProvider | None:
        """Foundry and Claude Platform on AWS are the Anthropic API with a cloud credential."""
        if provider.cloud is not None:
            return cloud_credential(provider.cloud, provider.credential, environ)
        return super().credential_for(provider, environ)


class OpenAIUpstream(UpstreamAdapter):
    """OpenAI and every OpenAI-compatible server (vLLM, Ollama, LiteLLM, ...)."""

    kind = "openai"
    dialect = OPENAI
    key_header = "authorization"
    key_prefix = "Bearer "


def replaced_auth(auth: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The caller's credential headers that a held credential's `auth` leaves to remove."""
    given = {name for name, _ in auth}
    return tuple(name for name in CALLER_AUTH if name not in given)


_ADAPTERS: dict[str, UpstreamAdapter] = {a.kind: a for a in (AnthropicUpstream(), OpenAIUpstream())}


def register_adapter(adapter: UpstreamAdapter) -> None:
    _ADAPTERS[adapter.kind] = adapter


def adapter_for(kind: str) -> UpstreamAdapter:
    return _ADAPTERS[kind]


# Where a cloud client's requests go when no provider speaks its own schema: Claude on
# the Anthropic API, else on the other cloud (cross-serving, `upstream.cloud_clients`).
_SERVED_BY: Mapping[str, tuple[str, ...]] = {
    "bedrock": ("anthropic", "vertex"),
    "vertex": ("anthropic", "bedrock"),
}


def default_provider(config: Config, client: ApiKind) -> str | None:
    """The first provider that speaks the client's schema (for a Bedrock or Vertex
    client, else one that serves Claude): where its requests go when no rule names one."""
    for kind in (client, *_SERVED_BY.get(client, ())):
        name = next((name for name, p in config.providers.items() if p.api == kind), None)
        if name is not None:
            return name
    return None

"""Provider credentials behind one protocol: what signs a request on its way out.

A `CredentialProvider` sees the request as it will leave (`UpstreamRequest`: method,
authority, final path, headers, final body bytes) and returns the headers that
authorize it. `StaticKey` puts a held key (env, file or inline value: `Credential`,
re-read on rotation) into the provider kind's key header. A SigV4 signer (it hashes
the body and signs the final path and headers) or an OAuth token source (it refreshes
a token, asynchronously) is one more class with the same `authorize`; the upstream
adapter of a provider kind says which one its config builds (`credential_for`).
Raising `CredentialMissing` refuses the request (503 `no_credential`, not retried).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from extproc.credentials import Credential, CredentialMissing
from extproc.slots import slot_init

__all__ = ["CredentialMissing", "CredentialProvider", "StaticKey", "UpstreamRequest"]

Headers = Sequence[tuple[str, str]]


@slot_init
@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """A request as it leaves for the provider (everything a signature covers)."""

    provider: str  # the provider's name in the config
    method: str
    authority: str  # host[:port] of the provider
    path: str  # the path sent, with its query
    headers: Mapping[str, str]  # the caller's headers, as received
    changes: Headers  # the headers the gateway sets on top (routing, path)
    removed: tuple[str, ...]  # the headers the gateway removes
    body: bytes  # the body sent (b"" for none)

    def final_headers(self) -> dict[str, str]:
        """The headers as sent (pseudo-headers included), built on demand."""
        out = {k: v for k, v in self.headers.items() if k not in self.removed}
        out.update(self.changes)
        return out


class CredentialProvider(Protocol):
    async def authorize(self, request: UpstreamRequest) -> Headers:
        """The headers that authorize `request`; `CredentialMissing` when there is none."""
        ...

    def describe(self) -> str:
        """Where the credential comes from, for logs (never its value)."""
        ...


class StaticKey:
    """A held key in one header (`x-api-key: K`, `authorization: Bearer K`)."""

    __slots__ = ("_credential", "_description", "header", "prefix")

    def __init__(self, credential: Credential, header: str, prefix: str = "") -> None:
        self._credential = credential
        self.header = header
        self.prefix = prefix
        self._description = f"key in {header}"

    async def authorize(self, request: UpstreamRequest) -> Headers:
        return ((self.header, self.prefix + self._credential.get()),)

    def describe(self) -> str:
        return self._description

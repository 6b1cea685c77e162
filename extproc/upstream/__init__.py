"""The upstream side of a request: provider adapters, credentials, translators.

See `adapter.py` (one adapter per provider kind), `credentials.py` (the
`CredentialProvider` protocol) and `translate.py` (the client <-> provider slot).
"""

from extproc.upstream import cloud_clients as _cloud_clients  # noqa: F401  (registers them)
from extproc.upstream import clouds as _clouds  # noqa: F401  (registers Bedrock, Vertex)
from extproc.upstream.adapter import (
    ROUTING_HEADER,
    UpstreamAdapter,
    adapter_for,
    default_provider,
    register_adapter,
)
from extproc.upstream.credentials import CredentialProvider, StaticKey, UpstreamRequest
from extproc.upstream.translate import (
    IDENTITY,
    HeaderTranslator,
    Transcoder,
    Translator,
    register_translator,
    translator_for,
)

__all__ = [
    "IDENTITY",
    "ROUTING_HEADER",
    "CredentialProvider",
    "HeaderTranslator",
    "StaticKey",
    "Transcoder",
    "Translator",
    "UpstreamAdapter",
    "UpstreamRequest",
    "adapter_for",
    "default_provider",
    "register_adapter",
    "register_translator",
    "translator_for",
]

"""The one token estimate (before a provider has counted anything)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IMAGE_TOKENS = 1600  # a full-size image; documents are charged like their text
_BYTES_PER_TOKEN = 3


def tokens_for_bytes(size: int) -> int:
    """UTF-8 bytes over three, rounded up (an over-estimate for prose and code in every
    language the providers document, ~4 characters a token)."""
    return -(-max(size, 0) // _BYTES_PER_TOKEN)


def estimate_input_tokens(body: Mapping[str, Any], size: int) -> int:
    """An over-estimate of the input tokens of a request body of `size` bytes: base64
    images (`messages[].content[].source.data`) count at a fixed size, not their bytes."""
    images, blob_bytes = 0, 0
    messages = body.get("messages")  # a worker may have left it serialized (offload.py)
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            source = block.get("source") if isinstance(block, dict) else None
            data = source.get("data") if isinstance(source, dict) else None
            if isinstance(data, str) and block.get("type") == "image":
                images, blob_bytes = images + 1, blob_bytes + len(data)
    return max(1, tokens_for_bytes(size - blob_bytes) + images * IMAGE_TOKENS)

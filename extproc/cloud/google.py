"""Google OAuth access tokens for Vertex AI, from google-auth, refreshed off the hot path.

Two sources, as google-auth resolves them:

- a service account JSON key (`key_file`): google-auth signs an RS256 JWT assertion with
  the key and trades it at the key's `token_uri` for a one-hour access token;
- Application Default Credentials (no `key_file`): `GOOGLE_APPLICATION_CREDENTIALS`, GKE
  Workload Identity / Compute Engine through the metadata server, or an external-account
  (workload identity federation) config.

Refreshing is blocking HTTP in google-auth; `Refreshing` runs it in a worker thread before
the token's expiry, and the request path only reads the token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC as _UTC
from pathlib import Path
from typing import Any

import google.auth
import google.auth.transport.urllib3
import urllib3
from google.oauth2 import service_account

from extproc.cloud.refresh import Refreshing, Snapshot

SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def _load(key_file: Path | None) -> Any:
    if key_file is not None:
        load = service_account.Credentials.from_service_account_file
        return load(str(key_file), scopes=[SCOPE])  # type: ignore[no-untyped-call]
    credentials, _project = google.auth.default(scopes=[SCOPE])
    return credentials


def token_fetcher(key_file: Path | None = None) -> Callable[[], Snapshot[str]]:
    """A blocking fetch of a fresh access token (run it in a thread)."""
    credentials = None
    http = urllib3.PoolManager()

    def fetch() -> Snapshot[str]:
        nonlocal credentials
        if credentials is None:  # read the key / resolve ADC in the thread, not at start
            credentials = _load(key_file)
        credentials.refresh(google.auth.transport.urllib3.Request(http))  # type: ignore[no-untyped-call]
        expiry = credentials.expiry  # naive UTC datetime, or None
        expires_at = expiry.replace(tzinfo=_UTC).timestamp() if expiry is not None else None
        return Snapshot(str(credentials.token), expires_at)

    return fetch


class GoogleToken(Refreshing[str]):
    """The current OAuth access token for Vertex, refreshed before it expires."""

    def __init__(
        self,
        fetch: Callable[[], Snapshot[str]] | None = None,
        *,
        key_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__("google", fetch or token_fetcher(key_file), clock=clock)

    def headers(self) -> dict[str, str]:
        """The authorization header for the upstream request."""
        return {"authorization": f"Bearer {self.current()}"}

"""A credential snapshot that a background task refreshes before it expires.

Fetching cloud credentials is blocking network I/O (STS, the instance metadata service,
Google's token endpoint). It runs in a worker thread, ahead of expiry, so a request never
waits for it: the hot path reads the last snapshot, and refuses only when the snapshot has
really expired (the refresher then failed for the whole margin and is logged loudly).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from extproc.credentials import CredentialMissing

log = logging.getLogger(__name__)

T = TypeVar("T")

# Refresh this long before expiry: tokens live 15 min to 12 h; five minutes covers a slow
# STS or metadata server and a refresher that missed one tick.
REFRESH_MARGIN_SECONDS = 300.0
# A failed refresh started by a request is retried by a later request after this long.
RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class Snapshot(Generic[T]):
    """One fetched credential; `expires_at` is wall-clock seconds, None for no expiry."""

    value: T
    expires_at: float | None


class Refreshing(Generic[T]):
    """Holds the latest snapshot from `fetch` (a blocking call, run in a thread).

    `clock` is wall-clock seconds (expiry times from clouds are absolute); tests inject one.
    """

    def __init__(
        self,
        name: str,
        fetch: Callable[[], Snapshot[T]],
        *,
        clock: Callable[[], float] = time.time,
        margin: float = REFRESH_MARGIN_SECONDS,
    ) -> None:
        self.name = name
        self._fetch = fetch
        self._clock = clock
        self._margin = margin
        self._snapshot: Snapshot[T] | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failed_at = float("-inf")

    def current(self) -> T:
        """The snapshot's value; `CredentialMissing` before the first fetch or after expiry."""
        snap = self._snapshot
        if snap is None:
            raise CredentialMissing(f"{self.name}: no credentials fetched yet")
        if snap.expires_at is not None and self._clock() >= snap.expires_at:
            raise CredentialMissing(f"{self.name}: credentials expired and were not refreshed")
        return snap.value

    def usable(self) -> bool:
        """Whether the snapshot can still sign a request (fetched and not expired)."""
        snap = self._snapshot
        return snap is not None and (snap.expires_at is None or self._clock() < snap.expires_at)

    async def get(self) -> T:
        """The value for a request: refreshed ahead of expiry without waiting for it.

        Within the margin the refresh starts in the background and this request still uses
        the current snapshot; only with nothing usable (first use, or expired after the
        refreshes failed for the whole margin) does the request wait, and then in a thread,
        never blocking other requests. A failed background refresh is retried at most once
        per `RETRY_SECONDS`.
        """
        if self.due():
            if not self.usable():
                await self._refresh_or_refuse()
            elif self._task is None and self._clock() - self._failed_at >= RETRY_SECONDS:
                self._task = asyncio.create_task(self._background())
        return self.current()

    async def _refresh_or_refuse(self) -> None:
        """Refresh for a request that has nothing usable; any failure refuses it cleanly
        (`CredentialMissing`: 503 `no_credential`), never as an internal error."""
        try:
            await self.ensure()
        except CredentialMissing:
            raise
        except Exception as exc:  # STS, metadata server, token endpoint: all the same to a caller
            log.error("%s: credential fetch failed: %s: %.300s", self.name, type(exc).__name__, exc)
            raise CredentialMissing(f"{self.name}: fetching credentials failed") from exc

    async def _background(self) -> None:
        try:
            await self.ensure()
        except Exception as exc:  # logged; the current snapshot keeps serving
            self._failed_at = self._clock()
            log.error(
                "%s: credential refresh failed: %s: %.300s", self.name, type(exc).__name__, exc
            )
        finally:
            self._task = None

    def due(self) -> bool:
        """Whether a refresh should run now (nothing yet, or within the margin of expiry)."""
        snap = self._snapshot
        if snap is None:
            return True
        return snap.expires_at is not None and self._clock() >= snap.expires_at - self._margin

    async def refresh(self) -> None:
        """Fetch a new snapshot in a worker thread, whether due or not."""
        async with self._lock:
            self._snapshot = await asyncio.to_thread(self._fetch)

    async def ensure(self) -> None:
        """Refresh when due. Callers arriving together share one fetch: the due check is
        repeated under the lock, so a burst of cold requests makes one STS call, not N."""
        if not self.due():
            return
        async with self._lock:
            if self.due():
                self._snapshot = await asyncio.to_thread(self._fetch)

"""The per-process runtime: config compiled once into the objects every request shares.

`Gateway` is built at start from a validated `Config` and handed to each
`RequestStream`. Side effects (clock, audit sink, metrics) come in through the
constructor so tests can substitute them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from extproc.config import Config, ProfileConfig
from extproc.credentials import Credential
from extproc.fallback import AttemptLog
from extproc.offload import Offload
from extproc.policies.auth import KeyDirectory
from extproc.policies.budget.spending import Spending
from extproc.policies.cache import ResponseCache
from extproc.policies.guard import Guard, ProfileGuard
from extproc.policies.profiles import ProfileResolver
from extproc.signin.otlp import OtlpRelay
from extproc.signin.service import SignIn
from extproc.store import Clock, Store, open_store
from extproc.telemetry.audit import AuditSink, open_sink
from extproc.telemetry.labels import LabelBounds
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.otel import NoOtel, OtelProcess, open_otel
from extproc.upstream import CredentialProvider, adapter_for

_MEMO_LIMIT = 4096  # memoized per-profile values; cleared when full


@dataclass
class Gateway:
    config: Config
    metrics: Metrics
    audit: AuditSink
    credentials: Mapping[str, CredentialProvider]  # per provider name: held credentials
    store: Store
    keys: KeyDirectory
    profiles: ProfileResolver
    cache: ResponseCache
    spending: Spending
    guard: Guard | None = None
    signin: SignIn | None = None
    otlp: OtlpRelay | None = None
    offload: Offload | None = None  # heavy bodies are checked in a worker process
    otel: OtelProcess | NoOtel = field(default_factory=NoOtel)
    # Fallback attempts of requests in flight (extproc.fallback), by request id.
    attempts: AttemptLog = field(default_factory=AttemptLog)
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    open_streams: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Config values every request reads, copied once: a pydantic attribute read costs
    # ~10x a plain one (its __getattr__ defeats the interpreter's attribute cache).
    cloud_prefixes: tuple[tuple[str, Literal["bedrock", "vertex"]], ...] = field(init=False)
    max_body_bytes: int = field(init=False)
    record_text: bool = field(init=False)  # audit.record_text

    def __post_init__(self) -> None:
        self.cloud_prefixes = self.config.cloud_paths.prefixes()
        self.max_body_bytes = self.config.limits.max_body_bytes
        self.record_text = self.config.audit.record_text
        self._records_text: dict[int, tuple[ProfileConfig, bool]] = {}

    def records_text(self, profile: ProfileConfig) -> bool:
        """`profile.records_text(audit.record_text)`, memoized by identity (the entry
        keeps its profile, so a reused id is never mistaken for it)."""
        found = self._records_text.get(id(profile))
        if found is None or found[0] is not profile:
            if len(self._records_text) >= _MEMO_LIMIT:
                self._records_text.clear()
            found = (profile, profile.records_text(self.record_text))
            self._records_text[id(profile)] = found
        return found[1]

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        metrics: Metrics | None = None,
        audit: AuditSink | None = None,
        environ: Mapping[str, str] | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
    ) -> Gateway:
        """`clock`: one test clock for what policy decides by time (rate windows, budget
        windows and holds, cache TTL and age, the key cache and revocations, SSO token
        expiry and revocations, request timing); a `store` passed in should run on it
        too. None: the real clocks."""
        monotonic = clock.time if clock is not None else time.monotonic
        wall = clock.time if clock is not None else time.time
        credentials = {
            name: credential
            for name, provider in config.providers.items()
            if (credential := adapter_for(provider.api).credential_for(provider, environ))
            is not None
        }
        store = store or open_configured_store(config, environ, clock)
        metrics = metrics or Metrics()
        hash_key = _hash_key(config, environ)
        metrics.bounds = LabelBounds.from_config(config)
        return cls(
            config=config,
            metrics=metrics,
            audit=audit or open_sink(config.audit, environ, metrics.registry),
            credentials=credentials,
            store=store,
            keys=KeyDirectory(config.auth, store, monotonic, wall),
            profiles=ProfileResolver(config),
            cache=ResponseCache(store, config.cache, wall),
            spending=Spending(config, store, metrics),
            signin=_signin(config, store, environ, wall, monotonic),
            otlp=OtlpRelay(config.otlp_relay),
            guard=Guard(config.guard, hash_key=hash_key) if config.guard is not None else None,
            offload=Offload(config.guard, hash_key),
            otel=open_otel(config, environ, on_drop=metrics.otel_dropped.inc),
            clock=monotonic,
            wall_clock=wall,
        )

    def stream_opened(self) -> None:
        self.open_streams += 1
        self.idle.clear()

    def stream_closed(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a closed stream's `work` (settle, audit) as a task that outlives a cancelled
        RPC; shutdown waits for it."""
        task = asyncio.ensure_future(work)
        self.pending.add(task)
        task.add_done_callback(self._done)
        self.open_streams -= 1
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.pending.discard(task)
        if not self.pending and not self.open_streams:
            self.idle.set()

    async def settle_pending(self, seconds: float) -> None:
        """Wait until every stream has closed and its work is done (at most `seconds`)."""
        if self.pending or self.open_streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), seconds)

    def guard_for(self, profile: str | None) -> ProfileGuard | None:
        return self.guard.profile(profile) if self.guard is not None else None

    async def close(self) -> None:
        if self.offload is not None:
            self.offload.close()
        self.audit.close()
        # Flushing the last spans and metrics may wait on the collector: not on the loop.
        await asyncio.to_thread(self.otel.shutdown)
        await self.store.close()


def _hash_key(config: Config, environ: Mapping[str, str] | None) -> bytes | None:
    source = config.guard.hash_key if config.guard is not None else None
    return Credential(source, environ).get().encode() if source is not None else None


def _signin(
    config: Config,
    store: Store,
    environ: Mapping[str, str] | None,
    wall: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> SignIn | None:
    sso = config.sso
    if sso is None:
        return None
    from extproc.signin.oidc import OidcClient
    from extproc.signin.tokens import TokenSigner, load_private_key

    pem = Credential(sso.signing_key, environ).get() if sso.signing_key is not None else None
    previous = [load_private_key(Credential(s, environ).get()) for s in sso.previous_signing_keys]
    issuer = sso.public_url or "extproc-gateway"
    signer = TokenSigner(load_private_key(pem), issuer, sso.access_token_seconds, wall, previous)
    secret = Credential(sso.oidc.client_secret, environ)
    oidc = OidcClient(sso.oidc, secret.get)
    return SignIn(sso, store, signer, oidc, config.auth.cache_seconds, wall, monotonic)


def open_configured_store(
    config: Config, environ: Mapping[str, str] | None = None, clock: Clock | None = None
) -> Store:
    """The config's store, with its password resolved from `store_password`."""
    source = config.store_password
    password = Credential(source, environ).get() if source is not None else None
    return open_store(config.store, password=password, clock=clock)

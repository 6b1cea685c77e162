"""One pipelined Redis connection for every store call: RESP written by hand, read by hiredis.

The budget and rate-limit scripts and the response cache's reads, writes and lock are
on every request's path, and redis-py's asyncio client spends ~60-250 µs of Python per
call (pool checkout, per-argument encoding, retry and observability wrappers): more than
the round trip itself. A `Pipe` keeps one connection per process and lets every coroutine
write its command at once (pipelining: nobody waits for a free connection); replies come
back in order, so each is matched to the oldest waiting future. hiredis parses them in C.
A call costs one `transport.write` and one future.

Bounded failure:

* dialling (TCP, TLS or a unix socket; AUTH and SELECT pipelined behind it) is bounded by
  the timeout; a refused or failed dial raises `ConnectionError` at once;
* a reply that takes longer than the timeout means the connection is hung (replies come
  in order, so everything queued behind it is stuck too): one timer, armed only while
  calls are waiting, aborts the connection and fails every waiting call with
  `TimeoutError`. The next call dials again, so a reply to a timed-out call can never
  reach a later one;
* a lost connection fails its waiting calls with `ConnectionError`; the next call
  redials. A waiting call is never resent: its script or write may have run.

Error replies arrive as `hiredis.ReplyError` values; `call` raises them as `ReplyError`
(NOSCRIPT as `NoScript`) for the store to map in one place.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis

__all__ = ["Endpoint", "NoScript", "Pipe", "ReplyError", "bulk", "command", "evalsha"]


class ReplyError(Exception):
    """Redis answered the command with an error reply (the message is Redis' own)."""


class NoScript(ReplyError):
    """EVALSHA named a script this server does not have (restart, SCRIPT FLUSH)."""


def bulk(part: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(part), part)


def command(*parts: bytes) -> bytes:
    """One RESP command (an array of bulk strings)."""
    return b"*%d\r\n" % len(parts) + b"".join(bulk(p) for p in parts)


def evalsha(sha: bytes, count: int, keys: Sequence[bytes], args: Sequence[str | bytes]) -> bytes:
    """`EVALSHA sha count keys... args...`; `keys` are `count` keys already RESP-encoded
    (callers memoize the encoding of keys they send again and again); `args` as text or
    bytes (a spec already encoded by orjson)."""
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n" % (3 + count + len(args), sha)
    encoded = [bulk(a if isinstance(a, bytes) else a.encode()) for a in args]
    return b"".join([head, bulk(b"%d" % count), *keys, *encoded])


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: a TCP host and port (optionally TLS) or a unix socket."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    ssl: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0

    def handshake(self) -> list[bytes]:
        """The commands sent before any call (their replies must be +OK)."""
        out: list[bytes] = []
        if self.password is not None:
            user = (self.username.encode(),) if self.username else ()
            out.append(command(b"AUTH", *user, self.password.encode()))
        if self.db:
            out.append(command(b"SELECT", b"%d" % self.db))
        return out


class _Connection(asyncio.Protocol):
    """One socket: writes commands, parses replies, resolves waiting futures in order."""

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._transport: asyncio.Transport | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._failure: Exception | None = None
        self.closed = False

    def on_running_loop(self) -> bool:
        """False when used from another event loop than the one it was dialled on (a
        store reused across `asyncio.run` calls): then it is dialled again."""
        return self._loop is asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, payload: bytes, replies: int = 1) -> list[asyncio.Future[Any]]:
        """Write `payload` (holding `replies` commands); one future per reply."""
        assert self._transport is not None
        deadline = self._loop.time() + self._timeout
        futures = [self._loop.create_future() for _ in range(replies)]
        self._waiting.extend((f, deadline) for f in futures)
        self._transport.write(payload)
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(deadline, self._watch)
        return futures

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                future, _ = self._waiting.popleft()
                if not future.done():  # a cancelled caller's reply is dropped here
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self._abort(ConnectionError(f"redis protocol error: {exc}"))

    def _watch(self) -> None:
        """The oldest waiting call is overdue: the connection is hung; give up on it."""
        self._watchdog = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]
        if deadline <= self._loop.time():
            self._abort(TimeoutError(f"redis did not answer within {self._timeout:g}s"))
        else:
            self._watchdog = self._loop.call_at(deadline, self._watch)

    def _abort(self, failure: Exception) -> None:
        self._failure = failure
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        self._fail_waiting()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._failure is None:
            self._failure = ConnectionError(f"redis connection lost: {exc or 'closed by peer'}")
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        failure = self._failure or ConnectionError("redis connection closed")
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(failure)

    def close(self) -> None:
        self._failure = ConnectionError("the store is closed")
        self.closed = True
        if self._loop.is_closed():  # its loop is gone: nothing can run there any more
            self._waiting.clear()  # (its transport and socket go with the dead loop)
            return
        if self._transport is not None:
            self._transport.close()
        self._fail_waiting()


class Pipe:
    """The shared connection: dialled on first use and after a loss, then pipelined."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self._endpoint = endpoint
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._dialling: asyncio.Future[_Connection] | None = None
        self._closed = False

    async def call(self, payload: bytes) -> Any:
        """Send one command; its reply (bytes, int, list, None). Raises `ReplyError`,
        `ConnectionError` or `TimeoutError`."""
        connection = self._connection
        if connection is None or connection.closed or not connection.on_running_loop():
            connection = await self._reconnect()
        return _checked(await connection.send(payload)[0])

    async def call_many(self, payload: bytes, replies: int) -> list[Any]:
        """Send several commands in one write; every reply, in order (errors raised)."""
        connection = self._connection
        if connection is None or connection.closed or not connection.on_running_loop():
            connection = await self._reconnect()
        futures = connection.send(payload, replies)
        return [_checked(await f) for f in futures]

    async def _reconnect(self) -> _Connection:
        stale = self._connection
        if stale is not None and not stale.closed and not stale.on_running_loop():
            stale.close()  # dialled on an event loop that has ended
            self._connection, self._dialling = None, None
        return await self._connect()

    async def _connect(self) -> _Connection:
        """One dial at a time; concurrent callers share it (a cancelled caller leaves it
        running for the others)."""
        if self._dialling is None:
            self._dialling = asyncio.ensure_future(self._dial())
            self._dialling.add_done_callback(self._dialled)
        return await asyncio.shield(self._dialling)

    def _dialled(self, dialling: asyncio.Future[_Connection]) -> None:
        self._dialling = None
        if not dialling.cancelled():
            dialling.exception()  # retrieved here: every waiter may have gone

    async def _dial(self) -> _Connection:
        loop = asyncio.get_running_loop()
        e = self._endpoint
        async with asyncio.timeout(self._timeout):
            if e.path is not None:
                _, connection = await loop.create_unix_connection(
                    lambda: _Connection(self._timeout), e.path
                )
            else:
                _, connection = await loop.create_connection(
                    lambda: _Connection(self._timeout),
                    e.host,
                    e.port,
                    ssl=e.ssl,
                    server_hostname=e.host if e.ssl is not None else None,
                )
            try:
                await _handshake(connection, e.handshake())
            except BaseException:
                connection.close()
                raise
        if self._closed:  # closed while dialling: do not leave a socket behind
            connection.close()
            raise ConnectionError("the store is closed")
        self._connection = connection
        return connection

    def close(self) -> None:
        self._closed = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None


async def _handshake(connection: _Connection, commands: list[bytes]) -> None:
    """AUTH and SELECT; a refusal is a connection failure (as redis-py reports it)."""
    if not commands:
        return
    for future in connection.send(b"".join(commands), len(commands)):
        try:
            _checked(await future)
        except ReplyError as exc:
            raise ConnectionError(f"redis refused the connection: {exc}") from exc


def _checked(reply: Any) -> Any:
    if isinstance(reply, hiredis.ReplyError):
        message = str(reply)
        if message.startswith("NOSCRIPT"):
            raise NoScript(message)
        raise ReplyError(message)
    return reply

"""The gRPC server: listening sockets, one `Connection` per peer, calls routed by
`:path` to their `Method`, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import grpc

from extproc.transport.connection import Connection, Limits, Stream, StreamHandler
from extproc.transport.grpc import Call, Method, parse_timeout, refuse, reject_http
from extproc.transport.headers import Headers

log = logging.getLogger(__name__)


class _Ignored:
    """The inbound side of a stream that was answered at once."""

    def data(self, payload: bytes) -> None:
        pass

    def end(self) -> None:
        pass

    def reset(self) -> None:
        pass


_IGNORED = _Ignored()


class GrpcServer:
    """Serves `methods` (keyed by `/package.Service/Method`) over cleartext HTTP/2."""

    def __init__(
        self, methods: dict[str, Method], *, max_message: int, limits: Limits | None = None
    ) -> None:
        self.methods = methods
        self.max_message = max_message
        self.limits = limits or Limits()
        self.connections: set[Connection] = set()
        self.calls: set[Call] = set()
        self._sockets: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []

    # -- App -------------------------------------------------------------------------------

    def open(self, stream: Stream, headers: Headers) -> StreamHandler:
        fields = dict(headers)
        if not fields.get("content-type", "").startswith("application/grpc"):
            reject_http(stream, 415)
            return _IGNORED
        method = self.methods.get(fields.get(":path", ""))
        if method is None or fields.get(":method") != "POST":
            refuse(stream, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {fields.get(':path')}")
            return _IGNORED
        encoding = fields.get("grpc-encoding", "identity")
        if encoding != "identity":
            refuse(stream, grpc.StatusCode.UNIMPLEMENTED, f"grpc-encoding {encoding}")
            return _IGNORED
        call = Call(stream, headers, method, self.max_message)
        self.calls.add(call)
        timeout = fields.get("grpc-timeout")
        call.start(parse_timeout(timeout) if timeout else None)
        assert call.task is not None
        call.task.add_done_callback(lambda _: self.calls.discard(call))
        return call

    # -- sockets ---------------------------------------------------------------------------

    def _connection(self) -> Connection:
        conn = Connection(self, self.limits, self.connections.discard)
        self.connections.add(conn)
        return conn

    def bind(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Bind host:port (port 0: a free one) now, to serve from `start`; the port bound.
        `reuse_port`: SO_REUSEPORT, so that worker processes share the port."""
        sock = _socket(host, port, reuse_port)
        self._sockets.append(sock)
        bound: int = sock.getsockname()[1]
        return bound

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            self._servers.append(await loop.create_server(self._connection, sock=sock))
        self._sockets = []

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """`bind` and `start` in one."""
        bound = self.bind(host, port, reuse_port=reuse_port)
        await self.start()
        return bound

    async def stop(self, grace: float) -> None:
        """Close the ports, GOAWAY every connection, give open calls `grace` seconds,
        cancel what remains, close the connections."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.goaway()
        tasks = [call.task for call in self.calls if call.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            conn.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)


def _socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock

"""A native asyncio HTTP/2 gRPC server for the ext_proc and health services.

`frames` (the HTTP/2 frame codec), `headers` (HPACK), `connection` (one HTTP/2
connection: streams, flow control), `grpc` (one call: messages, status, the servicer
context), `server` (sockets, routing by method, graceful stop), `health` (the gRPC
health service). See the README's "gRPC transport" section for why it replaces grpc.aio.
"""

from extproc.transport.grpc import Abort, Call, Method
from extproc.transport.health import Health
from extproc.transport.server import GrpcServer

__all__ = ["Abort", "Call", "GrpcServer", "Health", "Method"]

"""The gRPC health service (grpc.health.v1.Health): `Check` for Envoy's and Kubernetes'
gRPC health checks and `extproc up`'s start-up wait, `Watch` for clients that follow."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from extproc.transport.grpc import Call, Method

SERVICE = "grpc.health.v1.Health"
_Status = health_pb2.HealthCheckResponse


class Health:
    """Each service's serving status ("" is the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._closed = False

    def set(self, service: str, serving: bool) -> None:
        self._status[service] = _Status.SERVING if serving else _Status.NOT_SERVING
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """End every `Watch` (server shutdown), after it has sent the latest status."""
        self._closed = True
        self._changed.set()

    async def check(self, requests: Call, context: Call) -> None:
        request = await _single(requests)
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service}")
        await context.write(_Status(status=status))

    async def watch(self, requests: Call, context: Call) -> None:
        request = await _single(requests)
        last = None
        while True:
            status = self._status.get(request.service, _Status.SERVICE_UNKNOWN)
            if status != last:
                await context.write(_Status(status=status))
                last = status
            if self._closed:
                return
            await self._changed.wait()

    def methods(self) -> dict[str, Method]:
        def method(handler: Any) -> Method:
            return Method(
                health_pb2.HealthCheckRequest.FromString, _Status.SerializeToString, handler
            )

        return {f"/{SERVICE}/Check": method(self.check), f"/{SERVICE}/Watch": method(self.watch)}


async def _single(requests: Call) -> Any:
    """A unary call's one request."""
    async for request in requests:
        return request
    await requests.abort(grpc.StatusCode.INTERNAL, "no request message")

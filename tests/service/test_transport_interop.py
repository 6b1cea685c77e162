"""extproc.transport against grpcio's own client: the generated ExternalProcessorStub
and HealthStub, many concurrent streams, 20 MiB messages each way, metadata,
statuses, and the health states at start and stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.config import Config, HostPort
from extproc.server import PROCESS, process_method
from extproc.transport import Call, GrpcServer, Health

_MiB = 1024 * 1024


async def mirror(requests: Call, context: Call) -> None:
    """Answers each message with a response whose body is the request's body, and
    aborts when asked to (a request body of b"abort")."""
    metadata = dict(context.invocation_metadata())
    async for request in requests:
        if request.request_body.body == b"abort":
            await context.abort(grpc.StatusCode.INTERNAL, "ext_proc phases out of order")
        reply = pb.ProcessingResponse()
        reply.request_body.response.body_mutation.body = request.request_body.body
        reply.request_body.response.header_mutation.set_headers.add().header.key = metadata.get(
            "x-gateway-attempt", "-"
        )
        await context.write(reply)


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Health, GrpcServer]]:
    health = Health()
    methods = {PROCESS: process_method(mirror)} | health.methods()
    server = GrpcServer(methods, max_message=24 * _MiB)
    port = await server.listen("127.0.0.1", 0)
    health.set("", serving=True)
    yield f"127.0.0.1:{port}", health, server
    await server.stop(1)


def body_request(body: bytes) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest()
    request.request_body.body = body
    return request


async def test_many_concurrent_streams_and_big_messages(
    served: tuple[str, Health, GrpcServer],
) -> None:
    address, _, _ = served
    options = [
        ("grpc.max_receive_message_length", 32 * _MiB),
        ("grpc.max_send_message_length", 32 * _MiB),
    ]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def one(n: int) -> list[bytes]:
            bodies = [f"{n}-{i}".encode() * 10 for i in range(4)]
            call = stub.Process(
                iter(map(body_request, bodies)), metadata=(("x-gateway-attempt", str(n)),)
            )
            replies = [reply async for reply in call]
            assert all(
                r.request_body.response.header_mutation.set_headers[0].header.key == str(n)
                for r in replies
            )
            return [r.request_body.response.body_mutation.body for r in replies]

        results = await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(64))), 30)
        assert results[7] == [f"7-{i}".encode() * 10 for i in range(4)]
        big = bytes(range(256)) * (20 * _MiB // 256)  # each way, beyond our 16 MiB stream window
        replies = [r async for r in stub.Process(iter([body_request(big), body_request(b"x")]))]
        assert replies[0].request_body.response.body_mutation.body == big
        assert len(replies) == 2


async def test_statuses_reach_the_grpc_client(served: tuple[str, Health, GrpcServer]) -> None:
    address, _, _ = served
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as aborted:
            _ = [r async for r in stub.Process(iter([body_request(b"abort")]))]
        assert aborted.value.code() == grpc.StatusCode.INTERNAL
        assert aborted.value.details() == "ext_proc phases out of order"
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            _ = [r async for r in stub.Process(iter([body_request(b"z" * 25 * _MiB)]))]
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        unknown = channel.unary_unary(
            "/nope.Nope/Nope", request_serializer=bytes, response_deserializer=bytes
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await unknown(b"")
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_check_and_watch(served: tuple[str, Health, GrpcServer]) -> None:
    address, health, _ = served
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == serving
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="other"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert (await watch.read()).status == serving
        health.set("", serving=False)
        assert (await watch.read()).status == not_serving
        health.close()  # shutdown ends every Watch
        assert await watch.read() is grpc.aio.EOF  # type: ignore[attr-defined]
        assert await watch.code() == grpc.StatusCode.OK


def test_server_health_is_serving_then_not_serving_at_shutdown() -> None:
    """`Server` (the gateway's): supervisor.wait_grpc_serving's grpcio Check sees SERVING,
    and NOT_SERVING once shutdown starts (while the drain keeps the port open)."""
    from extproc import server, supervisor
    from extproc.gateway import Gateway
    from tests.harness import free_port

    config = Config(grpc_listen=HostPort(host="127.0.0.1", port=free_port()))

    async def main() -> None:
        running = server.Server(config, Gateway.from_config(config))
        await running.start()
        assert await asyncio.to_thread(supervisor.wait_grpc_serving, config.grpc_listen, 10)
        stopping = asyncio.create_task(running.stop(grace=1, drain=0.5))
        await asyncio.sleep(0.1)
        status = await asyncio.to_thread(_check, str(config.grpc_listen))
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping

    asyncio.run(main())


def _check(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        status: int = reply.status
        return status

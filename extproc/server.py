"""The ext_proc gRPC server: servicer, health, graceful shutdown, worker processes.

With `envoy_api`, the only module that touches Envoy's protobufs. Each gRPC
stream is one HTTP request; the servicer feeds its messages to a
`RequestStream` and writes back what it decides. The gRPC transport is the
project's own (`extproc.transport`: HTTP/2 on asyncio), not grpc.aio: a
do-nothing server on it costs 27-44% of grpc.aio's CPU per request (README, "gRPC
transport").

Shutdown (SIGTERM/SIGINT): the health service turns NOT_SERVING at once, the
server keeps accepting streams for `drain` seconds so Envoy's health checks (or
Kubernetes readiness) move new requests to other replicas without a failed
one, then the port closes and in-flight streams get `grace` seconds to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import start_http_server

from extproc import envoy_api
from extproc.config import Config
from extproc.decisions import BodyMode, Decision, Respond
from extproc.fallback import ATTEMPT_METADATA, AttemptStream
from extproc.gateway import Gateway
from extproc.phases import Event, ResponseBody, ResponseHeaders
from extproc.policies.budget.spending import anonymous_unlimited
from extproc.stream import ProtocolError, RequestStream
from extproc.telemetry.otel import NoOtel
from extproc.transport import GrpcServer, Health, Method

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
PROCESS = f"/{SERVICE_NAME}/Process"
_GRPC_OVERHEAD = 1024 * 1024


class ExternalProcessor:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> None:
        async def extend(seconds: float) -> None:
            await context.write(envoy_api.extend_timeout(seconds))

        if _is_attempt(context):
            await self._attempt(request_iterator, context)
            return
        traced = not isinstance(self.gateway.otel, NoOtel)
        trace_context = _trace_context(context) if traced else None
        stream = RequestStream(self.gateway, extend=extend, trace_context=trace_context)
        jwt = self.gateway.config.auth.jwt
        jwt_namespace = jwt.metadata_namespace if jwt is not None else None
        self.gateway.stream_opened()
        cancelled = False
        try:
            async for request in request_iterator:
                event = envoy_api.event_of(request, jwt_namespace)
                if event is None:
                    continue
                decision = await stream.handle(event)
                await context.write(envoy_api.to_response(event.phase, decision))
                if _last_reply(event, decision):
                    # End the RPC ourselves (status OK: Envoy goes on without us). Left
                    # open, an Envoy without ext_proc_graceful_grpc_close resets it when
                    # the HTTP request ends: a cancelled handler, not a finished one.
                    break
        except ProtocolError as exc:
            # Nothing after an out-of-order phase would be screened or accounted: fail
            # the RPC, so Envoy does what failure_mode_allow says (503, or through with
            # gateway keys stripped), and audit it.
            log.warning("ext_proc protocol error, request %s: %s", stream.request_id, exc)
            stream.protocol_failed()
            await context.abort(grpc.StatusCode.INTERNAL, "ext_proc phases out of order")
        except asyncio.CancelledError:
            # Envoy reset the RPC (a message timeout; without the graceful close also any
            # cut stream). It does not say who cut it: see stream._cut_short_outcome.
            cancelled = True
            raise
        finally:
            # Settling the budget and writing the audit record run as a task the gateway
            # tracks (shutdown waits for it), not in this handler: the RPC's status goes
            # out at once, before Envoy resets the stream, and a reset (cancelled) RPC is
            # not kept waiting (nor its work cut short).
            self.gateway.stream_closed(stream.close(cancelled=cancelled))

    async def _attempt(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: Any
    ) -> None:
        """One attempt of a fallback chain (the upstream filter's stream; extproc.fallback)."""
        gw = self.gateway
        attempt = AttemptStream(gw.config, gw.credentials, gw.attempts, gw.clock)
        try:
            async for request in request_iterator:
                event = envoy_api.event_of(request)
                if event is None:
                    continue
                host = envoy_api.host_metadata_of(envoy_api.attributes_of(request))
                decision = await attempt.handle(event, host)
                await context.write(envoy_api.to_response(event.phase, decision))
                if isinstance(event, ResponseHeaders):
                    break  # the attempt's filter asks for nothing after its answer's headers
        finally:
            attempt.close()


def _is_attempt(context: Any) -> bool:
    metadata = context.invocation_metadata() if hasattr(context, "invocation_metadata") else ()
    # A set comprehension, not any(generator): this runs on every request.
    return ATTEMPT_METADATA in {key for key, _ in metadata or ()}


def _last_reply(event: Event, decision: Decision) -> bool:
    """Whether Envoy will send this stream nothing more we need: an immediate response,
    the end of the response, or response headers with no body phase to follow."""
    if isinstance(decision, Respond):
        return True
    if isinstance(event, ResponseBody):
        return event.end_of_stream
    if isinstance(event, ResponseHeaders):
        streamed = (BodyMode.BUFFERED, BodyMode.STREAMED)
        return event.end_of_stream or decision.response_body_mode not in streamed
    return False


def _trace_context(context: Any) -> dict[str, str]:
    """W3C trace context Envoy sends with the ext_proc call when its tracing is on: the
    context of Envoy's span for this call, so the gateway's span becomes its child."""
    metadata = context.invocation_metadata() if hasattr(context, "invocation_metadata") else ()
    return {k: v for k, v in metadata or () if k in ("traceparent", "tracestate")}


def max_message(config: Config) -> int:
    """The largest gRPC message either way: a whole body plus its envelope."""
    return config.limits.max_body_bytes + _GRPC_OVERHEAD


def process_method(handler: Any) -> Method:
    """The ext_proc `Process` method with `handler(requests, context)` behind it."""
    return Method(pb.ProcessingRequest.FromString, pb.ProcessingResponse.SerializeToString, handler)


def process_server(handler: Any, config: Config) -> GrpcServer:
    """A server of `Process` alone (no health), e.g. the benches' reference servers."""
    return GrpcServer({PROCESS: process_method(handler)}, max_message=max_message(config))


class Server:
    """A running ext_proc server (one process)."""

    def __init__(self, config: Config, gateway: Gateway, *, reuse_port: bool = False) -> None:
        self.config = config
        self.gateway = gateway
        self.health = Health()
        methods = {PROCESS: process_method(ExternalProcessor(gateway).Process)}
        self.server = GrpcServer(methods | self.health.methods(), max_message=max_message(config))
        address = config.grpc_listen
        try:
            self.port = self.server.bind(address.host, address.port, reuse_port=reuse_port)
        except OSError as exc:
            raise OSError(f"cannot listen on {address} (grpc_listen); is it in use? {exc}") from exc

    async def start(self) -> None:
        await self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, serving=True)

    async def stop(self, grace: float, drain: float = 0.0) -> None:
        for service in ("", SERVICE_NAME):
            self.health.set(service, serving=False)
        if drain > 0:
            await asyncio.sleep(drain)
        self.health.close()
        await self.server.stop(grace)
        await self.gateway.settle_pending(grace)
        await self.gateway.close()


def install_event_loop_policy() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _warm_credentials(gateway: Gateway) -> set[asyncio.Task[None]]:
    """Fetch refreshing cloud credentials (SigV4, OAuth) once at start, in the background."""
    tasks = set()
    for name, credential in gateway.credentials.items():
        warm = getattr(credential, "warm", None)
        if warm is not None:
            tasks.add(asyncio.create_task(warm(name)))
    return tasks


async def serve(
    config: Config,
    *,
    grace: float,
    drain: float = 0.0,
    reuse_port: bool = False,
    serve_metrics: bool = True,
) -> None:
    """Run one server process until SIGTERM or SIGINT."""
    gateway = Gateway.from_config(config)
    if anonymous_unlimited(config):
        log.warning(
            "auth.required is false and a provider credential is held by the gateway, but no "
            "rate limit applies to anonymous callers: set rate_limits.key or "
            "rate_limits.default_tier (they apply per client address, rate_limits.anonymous)"
        )
    if serve_metrics and config.metrics_listen is not None:
        address = config.metrics_listen
        start_http_server(address.port, addr=address.host, registry=gateway.metrics.registry)
    server = Server(config, gateway, reuse_port=reuse_port)
    await server.start()
    log.info("ext_proc listening on %s (pid %d)", config.grpc_listen, os.getpid())
    warming = _warm_credentials(gateway)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in warming:  # a fetch still hanging at shutdown is abandoned
        task.cancel()
    log.info("shutting down: draining %.1f s, then %.0f s for in-flight streams", drain, grace)
    await server.stop(grace, drain)

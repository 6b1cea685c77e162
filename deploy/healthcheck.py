"""gRPC health check for the ext_proc container: exit 0 when the server reports SERVING.

    python /opt/extproc/healthcheck.py [HOST:PORT] [--service NAME] [--timeout SECONDS]

The Dockerfile's HEALTHCHECK and docker-compose.yml run it; Kubernetes uses its native
gRPC probe instead. It asks the standard gRPC health service (`grpc.health.v1.Health`)
that `extproc serve` registers, for service "" by default. A draining server (after
SIGTERM) answers NOT_SERVING, so the container shows unhealthy while it drains, which is
what a load balancer polling it should see. Only the gRPC packages the image already has
are used, so no separate grpc_health_probe binary has to be fetched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name the server reports, or UNREACHABLE."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return f"UNREACHABLE ({code.name if code else exc})"
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051")
    parser.add_argument("--service", default="")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())

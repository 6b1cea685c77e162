"""Helpers shared by the benchmark scripts in bench/: processes, wrk, machine facts, reports.

Importing this module puts the repository root on `sys.path`, so a script run as
`python bench/NAME.py` can import `extproc` and `tests.harness`.

- `require_tools` checks for load generators (wrk, py-spy) and can apt/pip-install them.
- `EnvoyProcess` runs one Envoy from a bootstrap dict and stops it (also on Ctrl-C, and
  with the bench via PR_SET_PDEATHSIG).
- `run_wrk` runs wrk with a Lua script whose `done()` hook prints one JSON line.
- `CpuMeter` reads per-process (and per-thread) CPU time from /proc around a run.
- `machine_facts`, `write_section` and `table` build the RESULTS.md report.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from extproc import supervisor  # noqa: E402
from extproc.config import HostPort  # noqa: E402

_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Debian package (or pip package for py-spy) that provides each tool.
_PROVIDERS = {
    "wrk": ("apt", "wrk"),
    "h2load": ("apt", "nghttp2-client"),
    "py-spy": ("pip", "py-spy"),
}


class BenchError(Exception):
    """The benchmark cannot run or produced an invalid result."""


# -- tools ------------------------------------------------------------------------------


def _install(tool: str) -> None:
    kind, package = _PROVIDERS[tool]
    if kind == "pip":
        command = [sys.executable, "-m", "pip", "install", "-q", package]
        subprocess.run(command, check=True, timeout=300)
        return
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, timeout=300)


def _which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found is None:
        local = Path(sys.executable).parent / tool
        found = str(local) if local.exists() else None
    return found


def require_tools(tools: Iterable[str], install: bool) -> dict[str, str]:
    """Paths of `tools`; installs missing ones when `install`, else raises naming the fix."""
    paths: dict[str, str] = {}
    for tool in tools:
        path = _which(tool)
        if path is None and install:
            _install(tool)
            path = _which(tool)
        if path is None:
            kind, package = _PROVIDERS[tool]
            how = f"apt-get install -y {package}" if kind == "apt" else f"pip install {package}"
            raise BenchError(f"{tool} is required: run `{how}` or pass --install-deps")
        paths[tool] = path
    return paths


# -- processes --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EnvoyProcess:
    """One Envoy started from a bootstrap dict; `stop()` ends it."""

    def __init__(self, name: str, bootstrap: Mapping[str, Any], workdir: Path) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    @property
    def admin(self) -> HostPort:
        socket_address = self.bootstrap["admin"]["address"]["socket_address"]
        return HostPort(host=socket_address["address"], port=socket_address["port_value"])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *extra: str) -> EnvoyProcess:
        path = self.workdir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(dict(self.bootstrap)), encoding="utf-8")
        command = [supervisor.envoy_binary(), "-c", str(path), "-l", "warning"]
        command += ["--disable-hot-restart", "--base-id", str(free_port()), *extra]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        if not supervisor.wait_envoy_ready(self.admin, 30, self.process):
            self.stop()
            raise BenchError(f"Envoy {self.name} did not start:\n{self.log_path.read_text()}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            supervisor.stop([self.process], grace=5)
            self.process = None


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the bench process dies."""
    supervisor._die_with_parent()


def stop_all(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    supervisor.stop([p for p in processes if p.poll() is None], grace=5)


# -- CPU accounting ---------------------------------------------------------------------


def _stat_fields(path: Path) -> tuple[str, list[str]]:
    text = path.read_text()
    name = text[text.index("(") + 1 : text.rindex(")")]
    return name, text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a whole process (all threads)."""
    _, fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


MAIN_THREAD = "main thread"


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (summed over threads sharing a name); the process's
    first thread is reported as `MAIN_THREAD`."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, fields = _stat_fields(task / "stat")
        except (OSError, ValueError):
            continue
        name = MAIN_THREAD if task.name == str(pid) else f"{name} threads"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


@dataclass
class CpuUse:
    """CPU used by each watched process during one measured interval."""

    wall: float
    seconds: dict[str, float]
    threads: dict[str, dict[str, float]]

    def cores(self, name: str) -> float:
        return self.seconds.get(name, 0.0) / self.wall if self.wall else 0.0

    def total(self) -> float:
        """CPU seconds of every watched process and of the load generator."""
        return sum(self.seconds.values())


class CpuMeter:
    """Measures CPU seconds of named processes (and of child processes) over an interval."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._start: tuple[float, dict[str, float], dict[str, dict[str, float]], float] | None
        self._start = None

    def _children(self) -> float:
        usage = os.times()
        return usage.children_user + usage.children_system

    def begin(self) -> None:
        totals = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        threads = {name: thread_cpu(pid) for name, pid in self.pids.items()}
        self._start = (time.monotonic(), totals, threads, self._children())

    def end(self) -> CpuUse:
        assert self._start is not None
        started, totals, threads, children = self._start
        seconds = {name: cpu_seconds(pid) - totals[name] for name, pid in self.pids.items()}
        seconds["load generator"] = self._children() - children
        per_thread = {}
        for name, pid in self.pids.items():
            now = thread_cpu(pid)
            before = threads[name]
            per_thread[name] = {k: v - before.get(k, 0.0) for k, v in now.items()}
        return CpuUse(time.monotonic() - started, seconds, per_thread)


# -- wrk --------------------------------------------------------------------------------

_WRK_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%.0f,"duration_us":%.0f,"p50_us":%.0f,"p90_us":%.0f,' ..
    '"p99_us":%.0f,"max_us":%.0f,"status_errors":%.0f,"socket_errors":%.0f}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def wrk_script(method: str, body: bytes, headers: Mapping[str, str]) -> str:
    """A wrk Lua script sending one fixed request and reporting JSON from `done()`."""
    text = body.decode()
    if "]==]" in text:
        raise BenchError("request body cannot be embedded in a Lua long string")
    lines = [f'wrk.method = "{method}"', f"wrk.body = [==[{text}]==]"]
    lines += [f'wrk.headers["{key}"] = "{value}"' for key, value in headers.items()]
    return "\n".join(lines) + "\n" + _WRK_DONE


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _parse_wrk(output: str) -> WrkResult:
    line = next((ln for ln in output.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise BenchError(f"wrk printed no result:\n{output}")
    data = json.loads(line.removeprefix("BENCH "))
    return WrkResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors=int(data["status_errors"] + data["socket_errors"]),
    )


def wrk_command(
    wrk: str, url: str, script: Path, threads: int, connections: int, seconds: float
) -> list[str]:
    duration = f"{max(1, round(seconds))}s"
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}", "--timeout", "5s"]
    return [*command, "-s", str(script), url]


def run_wrk(command: Sequence[str], seconds: float) -> WrkResult:
    """Run wrk; raise if it fails or any response was an error."""
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"wrk failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    parsed = _parse_wrk(result.stdout)
    if parsed.errors:
        raise BenchError(f"wrk saw {parsed.errors} failed responses:\n{result.stdout}")
    return parsed


# -- statistics and machine facts -------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _output(command: Sequence[str]) -> str:
    try:
        result = subprocess.run(
            list(command), capture_output=True, text=True, timeout=30, check=False, cwd=ROOT
        )
    except OSError:
        return "unknown"
    return (result.stdout or result.stderr).strip() or "unknown"


def _git_commit() -> str:
    commit = _output(["git", "rev-parse", "--short=12", "HEAD"])
    dirty = _output(["git", "status", "--porcelain", "--untracked-files=no"])
    return commit + (" (+ uncommitted changes)" if dirty not in ("", "unknown") else "")


def machine_facts(tools: Mapping[str, str]) -> dict[str, str]:
    envoy_version = _output([supervisor.envoy_binary(), "--version"]).splitlines()[-1]
    facts = {
        "cores (nproc)": str(os.cpu_count()),
        "CPU": _cpu_model(),
        "memory": _memory(),
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "Envoy": envoy_version.split("version:", 1)[-1].strip(),
        "extproc commit": _git_commit(),
    }
    for tool, path in tools.items():
        facts[tool] = _output([path, "--version"]).splitlines()[0]
    return facts


def _memory() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


# -- report -----------------------------------------------------------------------------


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(path: Path, name: str, text: str, title: str) -> None:
    """Replace the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`.

    The rest of the file (hand-written analysis) is kept; a missing file or
    section is created.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else f"# {title}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new, encoding="utf-8")

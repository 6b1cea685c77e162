"""Helpers shared by the benchmark scripts in bench/: processes, wrk, machine facts, reports.

Importing this module puts the repository root on `sys.path`, so a script run as
`python bench/NAME.py` can import `extproc` and `tests.harness`.

- `require_tools` checks for load generators (wrk, py-spy) and can apt/pip-install them.
- `EnvoyProcess` runs one Envoy from a bootstrap dict and stops it (also on Ctrl-C, and
  with the bench via PR_SET_PDEATHSIG).
- `run_wrk` runs wrk with a Lua script whose `done()` hook prints one JSON line.
- `CpuMeter` reads per-process (and per-thread) CPU time from /proc around a run.
- `machine_facts`, `write_section` and `table` build the RESULTS.md report.
- `wrk_rounds`, `lua_responder`, `start_redis`, `machine_table` and `guarded` serve
  cache_bench, budget_bench and guard_ttft_bench (alternating runs with CPU, a Lua
  responder, a throwaway redis-server, the machine table, clean Ctrl-C/time-limit exits).
- `process_tree`, `tree_cpu_seconds`, `Marked` and `unique_wrk_script` serve anchor_bench
  (CPU of a process and all its descendants; a body sent with a different token each
  request, so a response cache sees only misses).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from extproc import server, supervisor  # noqa: E402
from extproc.config import Config, HostPort  # noqa: E402
from tests.harness import free_port as free_port  # noqa: E402  (re-exported)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_T = TypeVar("_T")

# Debian package (or pip package for py-spy) that provides each tool.
_PROVIDERS = {
    "wrk": ("apt", "wrk"),
    "h2load": ("apt", "nghttp2-client"),
    "py-spy": ("pip", "py-spy"),
    "nginx": ("apt", "nginx-light"),
    "redis-server": ("apt", "redis-server"),
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
            self.process = supervisor.spawn(command, stdout=log, stderr=subprocess.STDOUT)
        if not supervisor.wait_envoy_ready(self.admin, 30, self.process):
            self.stop()
            raise BenchError(f"Envoy {self.name} did not start:\n{self.log_path.read_text()}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            supervisor.stop([self.process], grace=5)
            self.process = None


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


# -- rigs and runs shared by cache_bench, budget_bench and guard_ttft_bench --------------


def address(port: int) -> dict[str, Any]:
    """An Envoy `address` on loopback."""
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def hcm_of(bootstrap: Mapping[str, Any]) -> dict[str, Any]:
    """The http_connection_manager config of a bootstrap's first listener."""
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


# Reads the whole request body before answering: a reply sent on the headers alone makes
# Envoy close an HTTP/1.1 connection whose body is unread (no keep-alive).
_LUA_RESPONDER = """
function envoy_on_request(handle)
  handle:body()
  handle:respond({[":status"] = "200", ["content-type"] = "%s"}, [==[%s]==])
end
"""


def lua_responder(body: bytes, content_type: str) -> dict[str, Any]:
    """An HTTP filter answering every request with 200 and `body` (after reading the request)."""
    text = body.decode()
    if "]==]" in text or '"' in content_type:
        raise BenchError("the body cannot be embedded in a Lua long string")
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": _LUA_RESPONDER % (content_type, text)},
        },
    }


def wait_port(port: int, process: subprocess.Popen[bytes], seconds: float = 30) -> bool:
    """True once 127.0.0.1:`port` accepts connections; False if `process` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), 1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server on a free loopback port that dies with the bench.

    Same settings as tests/redis_server.py (no persistence), plus PR_SET_PDEATHSIG.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is required: run `apt-get install -y redis-server`")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    command += ["--protected-mode", "no", "--loglevel", "warning"]
    log_path = workdir / "redis.log"
    with log_path.open("ab") as log:
        process = supervisor.spawn(command, stdout=log, stderr=subprocess.STDOUT)
    if not wait_port(port, process, 10):
        stop_all([process])
        raise BenchError(f"redis-server did not start:\n{log_path.read_text()}")
    return process, f"redis://127.0.0.1:{port}/0"


@dataclass(frozen=True)
class Measured:
    """One wrk run and the CPU the watched processes used during it."""

    wrk: WrkResult
    cpu: CpuUse | None

    def us_per_request(self, name: str, thread: str | None = None) -> float:
        """CPU µs per completed request of process `name` (or of one of its threads)."""
        if self.cpu is None or not self.wrk.requests:
            return float("nan")
        if thread is None:
            seconds = self.cpu.seconds.get(name, 0.0)
        else:
            seconds = self.cpu.threads.get(name, {}).get(thread, 0.0)
        return seconds / self.wrk.requests * 1e6


def wrk_rounds(
    wrk: str,
    cases: Mapping[str, tuple[str, Path]],
    connections: int,
    seconds: float,
    rounds: int,
    pids: Mapping[str, int] | None = None,
) -> dict[str, list[Measured]]:
    """wrk runs of `seconds` per case (name -> (url, script)), cases alternating round by
    round so background load drifts over all of them alike; with `pids`, the CPU each
    of those processes used during each run."""
    threads = 1 if connections == 1 else 2
    out: dict[str, list[Measured]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (url, script) in cases.items():
            command = wrk_command(wrk, url, script, threads, connections, seconds)
            meter = CpuMeter(pids) if pids else None
            if meter is not None:
                meter.begin()
            result = run_wrk(command, seconds)
            out[name].append(Measured(result, meter.end() if meter is not None else None))
    return out


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def machine_table(facts: Mapping[str, str], load_before: str, load_after: str) -> str:
    """The machine facts and load averages as a Markdown table, with a note if not idle."""
    rows = [[k, f"`{v}`" if k == "extproc commit" else v] for k, v in facts.items()]
    rows += [["load average (1/5/15 min) before", load_before]]
    rows += [["load average (1/5/15 min) after", load_after]]
    one = max(float(load_before.split("/")[0]), float(load_after.split("/")[0]))
    cores = os.cpu_count() or 1
    note = "The machine looked idle around the run."
    if one >= 0.3 * cores:
        note = (
            f"**The machine was not idle** (1-minute load average up to {one:.2f} on {cores} "
            "cores around the run, other engineers' tests included): absolute numbers are "
            "pessimistic and noisy; compare the cases of one run with each other."
        )
    return table(["machine", ""], rows) + "\n\n" + note


class Interrupted(Exception):
    """SIGINT or SIGTERM reached the bench."""


def guarded(name: str, time_limit: int, work: Callable[[], _T]) -> _T | int:
    """Run `work` with Ctrl-C/SIGTERM and a time limit turned into clean failures.

    Returns `work()`'s value, or an exit code (1: failed, 130: interrupted) after
    printing why. `work` must stop what it started in `finally` blocks.
    """

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(f"signal {signum}")

    def out_of_time(_signum: int, _frame: FrameType | None) -> None:
        raise BenchError(f"the run took longer than {time_limit} s; stopped")

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(time_limit)
    try:
        return work()
    except (Interrupted, KeyboardInterrupt):
        print(f"{name}: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_and_report(
    name: str,
    time_limit: int,
    work: Callable[[], _T],
    render: Callable[[_T], str],
    output: Path | None,
    section: str,
) -> int:
    """`guarded(work)`, then print the rendered report and, unless `output` is None,
    write it as `section` of that file. Returns the exit code."""
    run = guarded(name, time_limit, work)
    if isinstance(run, int):
        return run
    report = render(run)
    print("\n" + report)
    if output is not None:
        write_section(output, section, report, "Benchmark results")
        print(f"\nwrote {output}")
    return 0


def serve_ext_proc(port: int, servicer: Any) -> None:
    """Run an ext_proc servicer on 127.0.0.1:`port` with the gateway's gRPC options, event
    loop policy and signal handling until SIGTERM or SIGINT (reference servers)."""
    server.install_event_loop_policy()

    async def main() -> None:
        grpc_server = server.process_server(servicer.Process, Config())
        await grpc_server.listen("127.0.0.1", port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await grpc_server.stop(1)

    asyncio.run(main())


# -- process trees and unique bodies (anchor_bench) -------------------------------------


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process (the kernel here has no /proc/.../children)."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            _, fields = _stat_fields(entry / "stat")
        except (OSError, ValueError):
            continue
        out[int(entry.name)] = int(fields[1])
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (workers, offload pools)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of processes `pids` (vanished ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            continue
    return total


TOKEN_LETTERS = 12  # the per-request token: 4 letters of run salt + thread, 8 of counter


@dataclass(frozen=True)
class Marked:
    """A request body with a placeholder of `TOKEN_LETTERS` letters replaced per request."""

    prefix: bytes
    suffix: bytes

    @classmethod
    def of(cls, body: bytes, placeholder: bytes) -> Marked:
        if len(placeholder) != TOKEN_LETTERS or body.count(placeholder) != 1:
            raise BenchError("the placeholder must occur once and have TOKEN_LETTERS letters")
        prefix, suffix = body.split(placeholder)
        return cls(prefix, suffix)

    def body(self, salt: int, counter: int) -> bytes:
        return self.prefix + token(salt, counter).encode() + self.suffix


def _letters(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, digit = divmod(n, 26)
        out.append(chr(97 + digit))
    return "".join(reversed(out))


def token(salt: int, counter: int) -> str:
    """Lower-case letters only: a guard flags no secret or PII in them."""
    return _letters(salt, 4) + _letters(counter, 8)


_WRK_UNIQUE = """
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local function letters(n, width)
  local out = {}
  for i = width, 1, -1 do
    out[i] = string.char(97 + n % 26)
    n = math.floor(n / 26)
  end
  return table.concat(out)
end

local counter = 0
function request()
  counter = counter + 1
  local token = letters(salt * 16 + tid, 4) .. letters(counter, 8)
  return wrk.format(nil, nil, nil, prefix .. token .. suffix)
end
"""


def unique_wrk_script(body: Marked, salt: int, headers: Mapping[str, str]) -> str:
    """A wrk Lua script POSTing `body` with a token no other request of the bench used:
    `salt` (one per wrk run, < 26**4 / 16), the wrk thread and a per-thread counter."""
    prefix, suffix = body.prefix.decode(), body.suffix.decode()
    if "]==]" in prefix + suffix:
        raise BenchError("request body cannot be embedded in a Lua long string")
    lines = ['wrk.method = "POST"', f"prefix = [==[{prefix}]==]", f"suffix = [==[{suffix}]==]"]
    lines += [f"salt = {salt}"]
    lines += [f'wrk.headers["{key}"] = "{value}"' for key, value in headers.items()]
    return "\n".join(lines) + "\n" + _WRK_UNIQUE + _WRK_DONE

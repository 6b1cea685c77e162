"""Guardrails: time to first token added by screening a streamed answer.

A streaming upstream (gateway_bench's: message_start, content_block_start and a first
`content_block_delta` with the ordinary text "Hello" written at once, the rest 2 ms
later) is reached through four front proxies, all with the same Envoy bootstrap:

- *bare Envoy*: no ext_proc (reference);
- *no guard*: Envoy + `extproc serve`, no `guard:` section;
- *guard, output screening off*: a guard profile that screens the prompt but not
  the answer (`output: {strip_secrets: false}`, no deny rules); the SSE stream still
  goes through the text rewriter;
- *guard, output screening on*: the same profile with `strip_secrets: true` (all
  built-in secret rules) and a deny phrase.

TTFT is timed from sending a 2 KB streamed /v1/messages to receiving the first
`content_block_delta` byte, one keep-alive connection per path, samples alternating
between paths. The screener holds back only text that could still become a match;
"Hello" cannot, so the hold-back is zero here and what is measured is the screening
work itself. (Deny *regex* rules hold back their `max_len` characters by design; they
are left out for that reason.) Target: output screening adds <= 1 ms TTFT (p50) beyond
the hold-back. Also reported: the in-process cost of rewriting the first SSE chunk.

    python bench/guard_ttft_bench.py            # ~45 s, writes the guard-ttft-bench section
    python bench/guard_ttft_bench.py --quick    # ~20 s smoke run, prints only

Every process started (the SSE upstream, its Envoy, four front Envoys, three ext_proc
servers) is stopped on exit, Ctrl-C or SIGTERM, and dies with the script.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common as c
import gateway_bench as gb

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.policies.guard.run import GuardRun
from extproc.telemetry.audit import NullSink
from extproc.telemetry.metrics import Metrics
from tests.harness import Stack

BARE, NO_GUARD = "bare Envoy", "no guard"
OFF, ON = "guard, output screening off", "guard, output screening on"
GUARDS: dict[str, dict[str, Any] | None] = {
    NO_GUARD: None,
    OFF: {"profiles": {"default": {"output": {"strip_secrets": False}}}},
    ON: {
        "profiles": {
            "default": {
                "output": {
                    "strip_secrets": True,
                    "deny": [{"id": "no_rm_rf", "phrase": "rm -rf /", "action": "block"}],
                }
            }
        }
    },
}
TARGET_ADDED_MS = 1.0
RESULTS = c.ROOT / "bench" / "RESULTS.md"
SECTION = "guard-ttft-bench"
TIME_LIMIT = 120


# -- the rig ----------------------------------------------------------------------------


@dataclass
class Rig:
    workdir: Path
    envoys: list[c.EnvoyProcess] = field(default_factory=list)
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stacks: dict[str, Stack] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)

    def close(self) -> None:
        for envoy in reversed(self.envoys):
            envoy.stop()
        for stack in self.stacks.values():
            stack.close()
        c.stop_all(self.helpers)


def start_rig(rig: Rig) -> None:
    sse_port, port = c.free_port(), c.free_port()
    rig.helpers.append(gb.start_helper("sse-upstream", sse_port, rig.workdir))
    upstream = gb.upstream_bootstrap(port, c.free_port(), sse_port)
    rig.envoys.append(c.EnvoyProcess("upstream", upstream, rig.workdir).start())
    gateway: dict[str, Any] = {}
    for name, guard in GUARDS.items():
        config = gb.bench_config(f"http://127.0.0.1:{port}")
        if guard is not None:
            config["guard"] = guard
        workdir = rig.workdir / name.replace(" ", "-").replace(",", "")
        workdir.mkdir()
        rig.stacks[name] = stack = Stack(config, workdir)
        stack.start()
        rig.urls[name] = stack.url
        gateway = stack.bootstrap()
    bare_port = c.free_port()
    bare = gb.bare_bootstrap(gateway, bare_port)
    rig.envoys.append(c.EnvoyProcess("bare", bare, rig.workdir).start())
    rig.urls = {BARE: f"http://127.0.0.1:{bare_port}", **rig.urls}
    for name, url in rig.urls.items():
        gb.probe(url, through_gateway=name != BARE)


@contextlib.contextmanager
def running_rig(workdir: Path) -> Iterator[Rig]:
    rig = Rig(workdir)
    try:
        start_rig(rig)
        yield rig
    finally:
        rig.close()


def guard_audits(stack: Stack) -> list[dict[str, Any]]:
    """The `guard` parts of the audit records of streamed requests so far."""
    records = stack.audit_records()
    return [r["guard"] for r in records if r.get("streamed") and "guard" in r]


# -- in-process cost of the first chunk -------------------------------------------------


def first_chunk_cost(runs: int) -> dict[str, list[float]]:
    """µs to rewrite the upstream's first SSE write (three events) per guard profile."""
    first, _ = gb.sse_parts()
    providers = gb.bench_config("http://127.0.0.1:1")["providers"]
    out: dict[str, list[float]] = {}
    for name in (OFF, ON):
        config = parse_config({"providers": providers, "guard": GUARDS[name]})
        gateway = Gateway.from_config(config, metrics=Metrics(), audit=NullSink())
        policy = gateway.guard_for(None)
        assert policy is not None
        metrics = Metrics()

        def once(policy: Any = policy, metrics: Metrics = metrics) -> bytes:
            return GuardRun(policy, "anthropic", metrics).rewriter().feed(first)

        if b"Hello" not in once():
            raise c.BenchError(f"{name}: the first delta was held back")
        out[name] = _time_us(once, runs)
    return out


def _time_us(fn: Callable[[], object], runs: int) -> list[float]:
    for _ in range(min(100, runs)):
        fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


# -- measurement ------------------------------------------------------------------------


@dataclass
class Run:
    command: str
    facts: dict[str, str]
    load_before: str
    args: argparse.Namespace
    load_after: str = ""
    ttft: dict[str, list[float]] = field(default_factory=dict)
    chunk: dict[str, list[float]] = field(default_factory=dict)
    audits: dict[str, int] = field(default_factory=dict)


def measure_ttft(urls: dict[str, str], samples: int, budget: float) -> dict[str, list[float]]:
    """TTFT samples per path, alternating paths so background noise hits all alike."""
    clients = {name: gb.SseClient(url) for name, url in urls.items()}
    out: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for _ in range(50):
            for client in clients.values():
                client.ttft_ms()
        deadline = time.monotonic() + budget
        while len(out[BARE]) < samples and time.monotonic() < deadline:
            for name, client in clients.items():
                out[name].append(client.ttft_ms())
    finally:
        for client in clients.values():
            client.close()
    return out


def measure(args: argparse.Namespace, workdir: Path) -> Run:
    command = ("python bench/guard_ttft_bench.py " + shlex.join(sys.argv[1:])).strip()
    run = Run(command, c.machine_facts({}), c.load_average(), args)
    with running_rig(workdir) as rig:
        run.ttft = measure_ttft(rig.urls, args.samples, args.budget)
        for name, samples in run.ttft.items():
            print(f"  {name:30} TTFT p50 {c.percentile(samples, 50):.3f} ms", flush=True)
        for name, stack in rig.stacks.items():
            audits = guard_audits(stack)
            if (name == NO_GUARD) != (not audits):
                raise c.BenchError(f"{name}: {len(audits)} streamed requests audited with a guard")
            run.audits[name] = len(audits)
    run.chunk = first_chunk_cost(500 if args.quick else 5000)
    run.load_after = c.load_average()
    return run


# -- report -----------------------------------------------------------------------------


def _p(samples: list[float], q: float) -> float:
    return c.percentile(samples, q)


def ttft_table(run: Run) -> str:
    none = run.ttft[NO_GUARD]
    rows = [
        [
            name,
            f"{len(samples):,}",
            f"{_p(samples, 50):.3f}",
            f"{_p(samples, 90):.3f}",
            f"{_p(samples, 99):.3f}",
            f"{_p(samples, 50) - _p(none, 50):+.3f}",
            f"{_p(samples, 99) - _p(none, 99):+.3f}",
        ]
        for name, samples in run.ttft.items()
    ]
    header = ["path", "samples", "TTFT p50 ms", "p90 ms", "p99 ms", "Δp50 vs no guard"]
    return c.table([*header, "Δp99 vs no guard"], rows)


def verdict_table(run: Run) -> str:
    on, off, none = (_p(run.ttft[name], 50) for name in (ON, OFF, NO_GUARD))
    rows = [
        [
            f"output screening adds <= {TARGET_ADDED_MS:g} ms TTFT p50 (on vs no guard)",
            f"{on - none:+.3f} ms",
            "met" if on - none <= TARGET_ADDED_MS else "**missed**",
        ],
        [
            "the screening rules alone (on vs off: same rewriter, rules on)",
            f"{on - off:+.3f} ms",
            "met" if on - off <= TARGET_ADDED_MS else "**missed**",
        ],
    ]
    return c.table(["target (hold-back is 0 for this text)", "measured", "verdict"], rows)


def chunk_table(run: Run) -> str:
    rows = [
        [name, f"{_p(s, 50):.1f}", f"{_p(s, 99):.1f}", f"{sum(s) / len(s):.1f}"]
        for name, s in run.chunk.items()
    ]
    note = (
        "In-process: a fresh `GuardRun` rewriter fed the upstream's first write "
        "(message_start, content_block_start, the first delta; what the gateway screens "
        "before the first token can leave), µs:\n\n"
    )
    return note + c.table(["profile", "p50 µs", "p99 µs", "mean µs"], rows)


def render(run: Run) -> str:
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    audited = ", ".join(f"{name}: {n:,}" for name, n in run.audits.items())
    method = (
        f"Up to {run.args.samples:,} samples per path (within {run.args.budget:g} s) after 50 "
        "warm-up requests per path, paths alternating, one keep-alive connection each; "
        "request body 2,048 bytes. Guard profiles: "
        f"off `{GUARDS[OFF]}`, on `{GUARDS[ON]}` (prompt screening runs with defaults in "
        "both). Streamed requests audited with a guard verdict, per path: "
        f"{audited} (the no-guard path must have none)."
    )
    return "\n\n".join(
        [
            "## Guard: time to first token (generated by bench/guard_ttft_bench.py)",
            f"Run {now}:\n\n```\n{run.command}\n```",
            c.machine_table(run.facts, run.load_before, run.load_after),
            method,
            "### Targets\n\n" + verdict_table(run),
            "### TTFT, streamed /v1/messages, 1 connection per path\n\n" + ttft_table(run),
            chunk_table(run),
        ]
    )


# -- main -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run; prints only")
    parser.add_argument("--samples", type=int, help="TTFT samples per path (2000)")
    parser.add_argument("--output", type=Path, help=f"report file (default {RESULTS})")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    args.samples = args.samples or (200 if args.quick else 2000)
    args.budget = 8.0 if args.quick else 45.0
    args.write = not args.no_write and (args.output is not None or not args.quick)
    args.output = args.output or RESULTS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> Run:
        with tempfile.TemporaryDirectory(prefix="guard-ttft-bench-") as workdir:
            return measure(args, Path(workdir))

    output = args.output if args.write else None
    return c.run_and_report("guard_ttft_bench", TIME_LIMIT, work, render, output, SECTION)


if __name__ == "__main__":
    raise SystemExit(main())

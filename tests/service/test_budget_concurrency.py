"""Budget reservations from several OS processes against one real Redis.

Each worker is a separate Python process with its own connection pool; all of
them wait on a "go" line and then fire their reservations at once at a budget
that only some of them fit in.

The bound being checked (see `extproc.policies.budget`): for every counter,

    settled spend <= limit + sum(max(0, actual_i - estimate_i))

over the admitted requests, provided no hold expires before its settle. With
actual == estimate the excess term is zero and spend never passes the limit;
with overspending settles, spend stays within the stated excess.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from extproc.policies.budget import BudgetConfig, BudgetLedger, Scope
from extproc.store import ManualClock
from extproc.store.redis import RedisStore
from tests.redis_server import RedisServer
from tests.store_fixtures import flush, redis_server

__all__ = ["redis_server"]  # fixture used by name below

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 1_000_000  # $1.00 in micro-USD
ESTIMATE = 37_000  # floor(1_000_000 / 37_000) = 27 reservations fit
WORKERS = 4
PER_WORKER = 20  # 80 concurrent reservations in all

WORKER = """
import asyncio, json, os, random, sys
from extproc.policies.budget import Amount, BudgetConfig, BudgetLedger, Denied, Scope
from extproc.store import open_store

async def main(url, worker, count, estimate, excess, crash, ttl):
    config = BudgetConfig.model_validate({
        "reservation_ttl_seconds": ttl,
        "rules": [
            {"scope": "team", "window": "lifetime", "usd": 1},
            {"scope": "key", "window": "lifetime", "usd": 100},
        ],
    })
    # A cold burst of 20 new connections per process on a loaded CI box can pass the
    # 1 s production bound; this test is about the budget bound, not latency.
    store = open_store(url, timeout_seconds=10.0)
    ledger = BudgetLedger(config, store)
    checks = ledger.checks_for([Scope("team", "t"), Scope("key", f"k{worker % 2}")])
    await store.ping()
    print("ready", flush=True)
    sys.stdin.readline()

    async def one(i):
        result = await ledger.reserve(f"w{worker}-{i}", checks, Amount(estimate))
        if isinstance(result, Denied):
            return [False, 0]
        await asyncio.sleep(random.uniform(0, 0.02))
        if crash:
            return [True, 0]
        actual = estimate + (excess if i % 3 == 0 else 0)
        await ledger.settle(result, Amount(actual))
        return [True, actual]

    results = await asyncio.gather(*(one(i) for i in range(count)))
    print(json.dumps(results), flush=True)
    if crash:
        os._exit(1)  # no settle, no release, no cleanup: the holds must expire alone

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                 int(sys.argv[5]), sys.argv[6] == "1", float(sys.argv[7])))
"""


def _spawn(url: str, worker: int, excess: int, crash: bool, ttl: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [url, worker, PER_WORKER, ESTIMATE, excess, int(crash), ttl]
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _run_workers(
    url: str, excess: int = 0, crash: bool = False, ttl: float = 60
) -> tuple[list[Any], float]:
    """Run the workers; return their results and the moment they were told to go."""
    procs = [_spawn(url, w, excess, crash, ttl) for w in range(WORKERS)]
    for p in procs:  # every process is connected before anyone starts
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    go_at = time.monotonic()  # no reservation exists before this moment
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == (1 if crash else 0), err
        results += json.loads(out.strip().splitlines()[-1])
    return results, go_at


async def _team_usage(url: str, clock: ManualClock | None = None) -> int:
    """The team's usage as a gateway whose clock reads `clock` would see it (the store
    decides expiry by the caller's time, so a reader can look from past a hold's TTL)."""
    config = BudgetConfig.model_validate(
        {"rules": [{"scope": "team", "window": "lifetime", "usd": 1}]}
    )
    store = RedisStore.from_url(url, clock=clock)
    try:
        return (await BudgetLedger(config, store).status([Scope("team", "t")]))[0].used
    finally:
        await store.close()


async def test_exact_estimates_never_pass_the_limit(redis_server: RedisServer) -> None:
    await flush(redis_server.url)
    results, _ = await asyncio.to_thread(_run_workers, redis_server.url)
    admitted = [r for r in results if r[0]]
    assert len(results) == WORKERS * PER_WORKER
    assert len(admitted) == LIMIT // ESTIMATE  # exactly the 27 that fit, from all processes
    spend = await _team_usage(redis_server.url)
    assert spend == sum(actual for _, actual in admitted) == 27 * ESTIMATE <= LIMIT


async def test_overspend_stays_within_the_sum_of_excess(redis_server: RedisServer) -> None:
    await flush(redis_server.url)
    excess = 50_000
    results, _ = await asyncio.to_thread(_run_workers, redis_server.url, excess)
    admitted = [actual for ok, actual in results if ok]
    total_excess = sum(actual - ESTIMATE for actual in admitted)
    spend = await _team_usage(redis_server.url)
    assert spend == sum(admitted)  # every settle landed exactly once
    assert spend <= LIMIT + total_excess
    assert 0 < len(admitted) < len(results)  # the edge of the budget was reached


async def test_crashed_processes_holds_count_as_spent(redis_server: RedisServer) -> None:
    """Holds of dead processes expire into spend at their estimate: nothing stays held,
    and what the provider may have generated for them is not forgotten."""
    await flush(redis_server.url)
    ttl = 2.0
    results, go_at = await asyncio.to_thread(_run_workers, redis_server.url, 0, True, ttl)
    done = time.monotonic()  # every reservation was made between go_at and now
    assert sum(1 for ok, _ in results if ok) == LIMIT // ESTIMATE
    held = await _team_usage(redis_server.url)
    if time.monotonic() < go_at + ttl:  # (a very slow machine may be past the TTL already)
        assert held == 27 * ESTIMATE  # still held on behalf of the dead processes
    # Every hold was made before `done`; a reader whose clock is past done + ttl sees them
    # all expired, without waiting for the TTL to pass.
    later = ManualClock(time.time() + (done - time.monotonic()) + ttl + 0.1)
    assert await _team_usage(redis_server.url, later) == 27 * ESTIMATE  # expired into spend

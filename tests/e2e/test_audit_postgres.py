"""The durable audit store through real Envoy and `extproc serve`: PostgreSQL is killed
mid-load and the gateway restarted while it is down, and still every request answered
is one row, once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import psycopg

from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config
from tests.postgres_server import PostgresServer, pg_url, postgres

__all__ = ["pg_url", "postgres"]

MODEL = "claude-opus-4-8"


def rows(url: str) -> list[tuple[Any, ...]]:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            return conn.execute(
                "SELECT request_id, outcome, status, user_name, input_tokens FROM extproc_audit"
            ).fetchall()
    except psycopg.Error:  # down, or no table before the first batch
        return []


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


class Load:
    """Requests through the stack from a few threads; the gateway's request ids answered."""

    def __init__(self, stack: Stack) -> None:
        self.client = anthropic.Anthropic(api_key="k", base_url=stack.url, max_retries=0)
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def one(self, n: int) -> None:
        raw = self.client.messages.with_raw_response.create(
            model=MODEL,
            max_tokens=16,
            messages=[{"role": "user", "content": f"request {n}"}],
            extra_headers={"x-claude-code-session-id": f"s{n % 4}"},
        )
        assert raw.status_code == 200
        with self.lock:
            self.ids.append(raw.headers["x-gateway-request-id"])

    def run(self, numbers: range, during: Callable[[], None] | None = None) -> None:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(self.one, n) for n in numbers]
            if during is not None:
                wait_for(lambda: len(self.ids) >= numbers.start + len(numbers) // 3, 30)
                during()
            for future in futures:
                future.result()


def test_postgres_outage_and_gateway_restart_lose_nothing(
    fake: FakeProvider, postgres: PostgresServer, pg_url: str
) -> None:
    stack = Stack(gateway_config(fake.url))
    audit = {"sink": pg_url, "spool_dir": str(stack.workdir / "spool")}
    stack = Stack(
        gateway_config(fake.url, audit={**audit, "flush_seconds": 0.1, "retry_seconds": 0.3}),
        workdir=stack.workdir,
    )
    load = Load(stack)
    try:
        stack.start()
        load.run(range(0, 30))
        wait_for(lambda: len(rows(pg_url)) == 30, 15)
        load.run(range(30, 90), during=postgres.crash)  # Postgres dies mid-load
        stack.stop_process("extproc")  # graceful: the queue goes to the spool
        assert list((stack.workdir / "spool").glob("audit-*.jsonl"))
        stack.start_extproc()  # the new process finds the spool; Postgres still down
        load.run(range(90, 120))
        postgres.start()
        wait_for(lambda: len(rows(pg_url)) >= 120, 30)
    finally:
        if postgres.process is None:
            postgres.start()
        stack.close()
    stored = rows(pg_url)
    assert len(load.ids) == 120
    assert sorted(r[0] for r in stored) == sorted(load.ids)  # every request, once
    assert {(r[1], r[2], r[3]) for r in stored} == {("ok", 200, None)}
    assert all(r[4] > 0 for r in stored)
    assert not list((stack.workdir / "spool").glob("audit-*.jsonl"))

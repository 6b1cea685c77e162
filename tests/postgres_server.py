"""A real PostgreSQL server for tests: initdb in a temp dir, loopback TCP on a free port.

`PostgresServer` runs the Debian package's `postgres` binary directly (no cluster
manager), as `nobody` when the tests run as root (postgres refuses root), with
fsync off and trust authentication on 127.0.0.1 only. `pause()` / `resume()` hang and release it
(SIGSTOP/SIGCONT on the postmaster and its backends); `crash()` is an immediate
shutdown (SIGQUIT: backends die without a checkpoint, clients see their connections
drop), `start()` brings it back on the same port with its data.

Fixtures (import them into a test module): `postgres`, one server per session, and
`pg_url`, a fresh database on it for one test.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from types import TracebackType

import psycopg
import pytest

from tests.harness import child_pids, free_port

__all__ = ["PostgresServer", "pg_url", "postgres", "postgres_bin_dir"]


def postgres_bin_dir() -> str | None:
    """The newest /usr/lib/postgresql/N/bin holding initdb and postgres, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return os.path.dirname(found[-1]) if found else None


def _nobody() -> tuple[int, int] | None:
    """(uid, gid) to run postgres as when we are root (it refuses root), else None."""
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


def _as_nobody(command: list[str]) -> list[str]:
    """`command` run as nobody when we are root, through util-linux `setpriv` rather than
    Popen's user/group arguments: those make subprocess fork instead of vfork, which runs
    gRPC's fork handlers in the child once this process runs gRPC (a child may then die
    before exec: see extproc.supervisor.with_death_signal)."""
    ids = _nobody()
    if ids is None:
        return command
    uid, gid = ids
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *command]


class PostgresServer:
    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin_dir = bin_dir
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pg-test-")
        self.data = os.path.join(self.dir, "data")
        self.process: subprocess.Popen[bytes] | None = None
        ids = _nobody()
        if ids is not None:
            os.chown(self.dir, *ids)
        self._initdb()

    def _initdb(self) -> None:
        command = [f"{self.bin_dir}/initdb", "-D", self.data, "-U", "postgres", "-A", "trust"]
        command += ["--no-sync", "-E", "UTF8", "--locale", "C"]
        subprocess.run(_as_nobody(command), check=True, capture_output=True, cwd=self.dir)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 20.0) -> None:
        log = open(os.path.join(self.dir, "postgres.log"), "ab")  # noqa: SIM115 - owned by Popen
        command = [f"{self.bin_dir}/postgres", "-D", self.data, "-p", str(self.port)]
        command += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
        command += ["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=50"]
        self.process = subprocess.Popen(_as_nobody(command), stdout=log, stderr=log, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start on {self.port}:\n{self.log_text()}")
            time.sleep(0.05)

    def ready(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def log_text(self) -> str:
        with open(os.path.join(self.dir, "postgres.log"), errors="replace") as stream:
            return stream.read()

    def create_database(self) -> str:
        """A fresh database for one test; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def crash(self) -> None:
        """Immediate shutdown: no checkpoint, every connection drops."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            self.process.wait(15)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP the server and every backend: ports stay open, nothing answers."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def _pids(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid, *child_pids(self.process.pid)]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _started() -> PostgresServer:
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (scripts/test installs the Debian package)")
    for _ in range(3):  # a free port can be taken between probe and bind
        server = PostgresServer()
        try:
            server.start()
        except RuntimeError:
            server.close()
            continue
        return server
    raise RuntimeError("could not start postgres")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; tests take a database of their own."""
    server = _started()
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh database on the session's server (which a previous test may have crashed)."""
    if postgres.process is None or postgres.process.poll() is not None:
        postgres.start()
    return postgres.create_database()

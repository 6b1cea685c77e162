"""Failure modes with the ext_proc server gone, the Envoy YAML in envoy/, and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from extproc import supervisor
from tests.fake_provider import FakeProvider
from tests.harness import Stack, child_pids, gateway_config

ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "client-key"}


@pytest.mark.parametrize("fail_open", [False, True])
def test_ext_proc_unreachable(fake: FakeProvider, fail_open: bool) -> None:
    stack = Stack(gateway_config(fake.url, failure_mode_allow=fail_open))
    try:
        stack.start()
        with httpx.Client(base_url=stack.url, timeout=30) as client:
            assert client.post("/v1/messages", json=BODY, headers=HEADERS).status_code == 200
            stack.stop_process("extproc")
            fake.clear()
            response = client.post("/v1/messages", json=BODY, headers=HEADERS)
    finally:
        stack.close()
    if fail_open:
        # Policies are skipped; the request reaches the default provider as sent.
        assert response.status_code == 200
        assert fake.received[0].headers["x-api-key"] == "client-key"
    else:
        assert response.status_code == 503
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "api_error"
        assert fake.received == []


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "envoy").glob("*.yaml")))
def test_every_envoy_yaml_validates(path: str) -> None:
    result = subprocess.run(
        [supervisor.envoy_binary(), "--mode", "validate", "-c", path, "-l", "critical"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_as_written_is_the_default_render() -> None:
    """envoy/front-proxy.yaml documents the default config: rendering changes nothing."""
    from extproc import envoy_config
    from extproc.config import Config

    template = envoy_config.load_template(ROOT / "envoy" / "front-proxy.yaml")
    assert envoy_config.render(Config(), template) == template


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_check_config_reports_key_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listen: nowhere\nproviders:\n  a:\n    api: gopher\n    base_url: ftp://x\nstroe: x\n"
    )
    result = _run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert "listen: 'nowhere' is not 'host:port'" in result.stderr
    assert "providers.a.api" in result.stderr
    assert "providers.a.base_url" in result.stderr
    assert "stroe: unknown key" in result.stderr


def test_check_config_accepts_a_good_config(tmp_path: Path, fake: FakeProvider) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(gateway_config(fake.url)))
    result = _run_cli("check-config", str(good))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_workers_refused_with_memory_store() -> None:
    result = _run_cli("serve", "--workers", "2")
    assert result.returncode == 2
    assert "shared store" in result.stderr


def _wait_ready(log: Path, process: subprocess.Popen[bytes]) -> None:
    """Until `extproc up` announces that Envoy and the ext_proc server are both ready."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if "gateway ready" in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"extproc up did not become ready:\n{log.read_text(errors='replace')}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = (
        Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else "X"
    )
    return status != "Z"


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Whether every pid has exited, polling (bounded) instead of sleeping and hoping."""
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(pid) for pid in pids)


def _start_up(tmp_path: Path, fake: FakeProvider) -> tuple[subprocess.Popen[bytes], Stack, Path]:
    stack = Stack(gateway_config(fake.url), workdir=tmp_path)
    log = tmp_path / "up.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "extproc", "up", "--config", str(stack.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=output,
        )
    _wait_ready(log, process)
    return process, stack, log


def test_up_serves_and_ctrl_c_leaves_nothing_behind(tmp_path: Path, fake: FakeProvider) -> None:
    process, stack, _log = _start_up(tmp_path, fake)
    children = child_pids(process.pid)
    assert len(children) == 2
    response = httpx.post(f"{stack.url}/v1/messages", json=BODY, headers=HEADERS, timeout=10)
    assert response.status_code == 200
    assert "x-gateway-request-id" in response.headers
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert _gone(children)


def test_up_stops_the_other_when_one_dies(tmp_path: Path, fake: FakeProvider) -> None:
    process, _stack, log = _start_up(tmp_path, fake)
    server, envoy = child_pids(process.pid)
    os.kill(envoy, signal.SIGKILL)
    assert process.wait(timeout=30) == 1
    assert "Envoy exited with code" in log.read_text()
    assert _gone([server])

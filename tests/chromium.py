"""Headless Chromium driven over the DevTools protocol, for checking rendered pages.

`inspect_page(url, screenshot)` opens the page in a fresh headless Chromium on a free
loopback debugging port, and returns what a person would check by hand: console
errors and warnings, uncaught exceptions, failed loads, every URL the page requested,
its visible text, and a full-page PNG screenshot. (New-style headless Chromium no
longer prints console messages with --enable-logging, hence the protocol.)
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import free_port

__all__ = ["PageReport", "chromium_binary", "inspect_page"]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageReport:
    problems: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    text: str = ""
    svg_count: int = 0
    png: bytes = b""


def _debugger_url(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as reply:
                targets = json.loads(reply.read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("Chromium did not open its DevTools port")


def inspect_page(url: str, screenshot: Path, width: int = 1400, height: int = 1000) -> PageReport:
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("Chromium is not installed (apt-get install chromium)")
    port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-test-")
    command = [
        binary,
        *("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"),
        *("--no-first-run", "--no-default-browser-check", "--disable-extensions"),
        f"--remote-debugging-port={port}",
        "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ws_url = _debugger_url(port, process)
        report = asyncio.run(asyncio.wait_for(_drive(ws_url, url, width), 60))
        screenshot.write_bytes(report.png)
        return report
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(profile, ignore_errors=True)


class _Session:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.receive_str())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)

    async def until(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(await self.ws.receive_str()))


async def _drive(ws_url: str, url: str, width: int) -> PageReport:
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
        session = _Session(ws)
        for domain in ("Page", "Runtime", "Log", "Network"):
            await session.call(f"{domain}.enable")
        await session.call("Page.navigate", url=url)
        await session.until("Page.loadEventFired")
        text = await session.call("Runtime.evaluate", expression="document.body.innerText")
        svgs = await session.call(
            "Runtime.evaluate", expression="document.querySelectorAll('svg').length"
        )
        full = await session.call(
            "Runtime.evaluate", expression="document.documentElement.scrollHeight"
        )
        height = int(full["result"]["value"])
        await session.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = await session.call("Page.captureScreenshot", format="png")
        report = PageReport(text=str(text["result"]["value"]), svg_count=svgs["result"]["value"])
        report.png = base64.b64decode(shot["data"])
        _collect(session.events, report)
        return report


def _collect(events: list[dict[str, Any]], report: PageReport) -> None:
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in (
            "error",
            "warning",
            "assert",
        ):
            values = [str(a.get("value", a.get("description"))) for a in params.get("args", [])]
            report.problems.append(f"console.{params['type']}: {' '.join(values)}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            thrown = details.get("exception", {}).get("description") or details.get("text")
            report.problems.append(f"exception: {thrown}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            report.problems.append(f"log {params['entry']['level']}: {params['entry']['text']}")
        elif method == "Network.loadingFailed":
            report.problems.append(f"load failed: {params.get('errorText')}")
        elif method == "Network.requestWillBeSent":
            report.requested.append(params["request"]["url"])

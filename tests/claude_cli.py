"""The Claude Code CLI as a test client: where it is and the environment it runs in.

`scripts/test` installs the pinned CLI into `.tools/` (npm). Tests run it with a
throwaway HOME so no developer's login or settings leak in, and with the
non-essential traffic (telemetry, auto-update, error reporting) turned off: the
only network it may use is the gateway on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def claude_path() -> str | None:
    """The CLI's executable, or None when it is not installed."""
    local = ROOT / ".tools" / "node_modules" / ".bin" / "claude"
    if local.exists():
        return str(local)
    return shutil.which("claude")


def claude_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for one CLI run; `extra` sets e.g. ANTHROPIC_BASE_URL."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TERM": "dumb",
        "CI": "true",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    env.update(extra)
    return env


def run_claude(
    home: Path, *args: str, cwd: Path | str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`claude <args>` in `claude_env(home, **env)`, bounded to two minutes; never raises on
    a non-zero exit (tests assert on it). Callers skip first when `claude_path()` is None."""
    cli = claude_path()
    assert cli is not None, "the Claude Code CLI is not installed (scripts/test installs it)"
    return subprocess.run(
        [cli, *args],
        cwd=cwd,
        env=claude_env(home, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

"""Provider credentials held by the gateway: read from an env var, a file or the config.

A file is re-read when its modification time changes, so a rotated Kubernetes
Secret takes effect without a restart; the check is a `stat` at most once a
second. Values are never logged; `CredentialMissing` names the source, not the value.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator

_RECHECK_SECONDS = 1.0


class CredentialSource(BaseModel):
    """Where a provider credential comes from: exactly one of env, file or value.

    A file is re-read when its modification time changes (mounted Kubernetes
    Secrets are rotated in place).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    env: str | None = None
    file: Path | None = None
    value: SecretStr | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialSource:
        given = [k for k in ("env", "file", "value") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of env, file or value")
        return self

    def describe(self) -> str:
        if self.env is not None:
            return f"env {self.env}"
        if self.file is not None:
            return f"file {self.file}"
        return "inline value"


class CredentialMissing(Exception):
    """The configured source has no credential (unset variable, missing or empty file)."""


class Credential:
    def __init__(
        self,
        source: CredentialSource,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._environ = environ if environ is not None else os.environ
        self._clock = clock
        self._value: str | None = None
        self._mtime: float | None = None
        self._checked = float("-inf")

    def get(self) -> str:
        """The current credential value; raises `CredentialMissing`."""
        source = self._source
        if source.value is not None:
            return source.value.get_secret_value()
        if source.env is not None:
            value = self._environ.get(source.env, "").strip()
            if not value:
                raise CredentialMissing(f"environment variable {source.env} is not set")
            return value
        assert source.file is not None
        return self._from_file(source.file)

    def _from_file(self, path: Path) -> str:
        now = self._clock()
        if self._value is not None and now - self._checked < _RECHECK_SECONDS:
            return self._value
        self._checked = now
        try:
            mtime = path.stat().st_mtime
            if self._value is None or mtime != self._mtime:
                self._value, self._mtime = path.read_text(encoding="utf-8").strip(), mtime
        except OSError as exc:
            raise CredentialMissing(f"cannot read credential file {path}: {exc.strerror}") from exc
        if not self._value:
            raise CredentialMissing(f"credential file {path} is empty")
        return self._value

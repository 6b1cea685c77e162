"""The `audit:` config: sink kinds and the Postgres store's settings."""

from __future__ import annotations

import pytest

from extproc.config import ConfigError, parse_config


@pytest.mark.parametrize(
    ("sink", "postgres"),
    [
        ("stdout", False),
        ("/var/log/extproc/audit.jsonl", False),
        ("postgresql://extproc@db:5432/gateway", True),
        ("postgres://extproc@db/gateway", True),
    ],
)
def test_sink_kinds(sink: str, postgres: bool) -> None:
    assert parse_config({"audit": {"sink": sink}}).audit.postgres is postgres


@pytest.mark.parametrize(
    ("audit", "key"),
    [
        ({"table": "Audit; DROP TABLE x"}, "audit.table"),
        ({"retention_days": 0}, "audit.retention_days"),
        ({"queue_max": 10}, "audit.queue_max"),
        ({"password": {"env": "A", "file": "/b"}}, "audit.password"),
        ({"spool": "/x"}, "audit.spool"),
    ],
)
def test_bad_settings_name_their_key(audit: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"audit": {"sink": "postgresql://db/x", **audit}})
    assert any(key in problem for problem in caught.value.problems), caught.value.problems

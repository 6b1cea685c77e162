"""`telemetry.otel`: off by default, validated at start, headers from env/file/value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from extproc.config import Config, ConfigError, parse_config
from extproc.credentials import CredentialMissing
from extproc.gateway import Gateway
from extproc.telemetry import otel
from extproc.telemetry.otel import NoOtel, OtelProcess, OtelUnavailable, open_otel


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def test_off_by_default_and_nothing_is_propagated() -> None:
    config = Config()
    assert config.telemetry.otel is None
    telemetry = open_otel(config)
    assert isinstance(telemetry, NoOtel)
    assert telemetry.start({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None


@pytest.mark.parametrize(
    ("otel", "fragment"),
    [
        ({}, "telemetry.otel.endpoint: Field required"),
        ({"endpoint": "collector:4317"}, "telemetry.otel.endpoint: 'collector:4317' must be"),
        ({"endpoint": "http://c:4317", "protocol": "udp"}, "telemetry.otel.protocol"),
        ({"endpoint": "http://c:4317", "sample_ratio": 1.5}, "telemetry.otel.sample_ratio"),
        ({"endpoint": "http://c:4317", "export_interval_seconds": 0}, "export_interval_seconds"),
        ({"endpoint": "http://c:4317", "headers": {"bad name": {"value": "x"}}}, "header name"),
        ({"endpoint": "http://c:4317", "headers": {"k": {"env": "A", "value": "x"}}}, "one of"),
        ({"endpoint": "http://c:4317", "exporter": "x"}, "telemetry.otel.exporter: unknown key"),
    ],
)
def test_bad_otel_config_names_the_key(otel: dict[str, Any], fragment: str) -> None:
    found = problems({"telemetry": {"otel": otel}})
    assert any(fragment in p for p in found), found


def test_headers_come_from_env_and_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-file\n")
    config = parse_config(
        {
            "telemetry": {
                "otel": {
                    "endpoint": "http://127.0.0.1:4318/",
                    "protocol": "http",
                    "headers": {"x-api-key": {"env": "OTLP_KEY"}, "x-team": {"file": str(token)}},
                }
            }
        }
    )
    assert config.telemetry.otel is not None
    assert config.telemetry.otel.endpoint == "http://127.0.0.1:4318"
    telemetry = open_otel(config, {"OTLP_KEY": "from-env"})
    assert isinstance(telemetry, OtelProcess)
    telemetry.shutdown()
    with pytest.raises(CredentialMissing, match="OTLP_KEY"):
        Gateway.from_config(config, environ={})


def test_a_stale_opentelemetry_proto_is_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.proto.common.v1 import common_pb2

    monkeypatch.delattr(common_pb2, "InstrumentationScope")
    config = parse_config({"telemetry": {"otel": {"endpoint": "http://127.0.0.1:4317"}}})
    with pytest.raises(OtelUnavailable, match="force-reinstall --no-deps opentelemetry-proto"):
        otel.open_otel(config)


def test_the_gateway_process_never_imports_the_sdk() -> None:
    """The SDK runs in the telemetry process; the gateway's interpreter stays lean."""
    script = (
        "import sys\n"
        "from extproc.config import parse_config\n"
        "from extproc.gateway import Gateway\n"
        "config = parse_config({'telemetry': {'otel': {'endpoint': 'http://127.0.0.1:9'}}})\n"
        "gateway = Gateway.from_config(config)\n"
        "gateway.otel.shutdown()\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"

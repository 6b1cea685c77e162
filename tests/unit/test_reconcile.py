"""Envoy's access log reconciled with the audit log (issue 11 item 7)."""

from __future__ import annotations

from pathlib import Path

from extproc import envoy_config
from extproc.config import parse_config
from extproc.telemetry.reconcile import cause, read_json_lines, reconcile


def test_flags_name_the_side_that_ended_the_stream() -> None:
    assert cause("DC") == "client_abort"
    assert cause("UR") == "provider_reset"
    assert cause("UC,DC") == "provider_reset"  # the provider went first
    assert cause("-") is None
    assert cause(None) is None


def test_requests_only_envoy_saw_get_a_record_and_wrong_causes_are_corrected() -> None:
    access = [
        {"request_id": "a", "path": "/v1/messages?beta=true", "status": 0, "flags": "DC"},
        {"request_id": "b", "status": 200, "flags": "UR"},
        {"request_id": "c", "status": 200, "flags": "-"},
        {"request_id": "d", "status": 200, "flags": "DC"},
        {"request_id": "-", "status": 400, "flags": "-"},
    ]
    audit = [
        {"request_id": "b", "outcome": "client_abort"},
        {"request_id": "c", "outcome": "ok"},
        {"request_id": "d", "outcome": "client_abort"},  # agrees: nothing to say
    ]
    added = list(reconcile(access, audit))
    assert added[0]["request_id"] == "a"
    assert (added[0]["outcome"], added[0]["path"], added[0]["source"]) == (
        "client_abort",
        "/v1/messages",
        "envoy",
    )
    assert added[1] == {
        "request_id": "b",
        "outcome": "provider_reset",
        "flags": "UR",
        "reconciled": "cause",
    }
    assert len(added) == 2


def test_envoy_log_lines_that_are_not_json_are_skipped(tmp_path: Path) -> None:
    log = tmp_path / "envoy.log"
    log.write_text('[info] starting\n{"request_id": "x"}\n{broken\n', encoding="utf-8")
    assert list(read_json_lines(log)) == [{"request_id": "x"}]


def test_first_byte_timeout_and_access_log_are_rendered_from_the_config() -> None:
    config = parse_config(
        {"limits": {"first_byte_timeout_seconds": 45}, "envoy": {"access_log": "/var/log/a"}}
    )
    bootstrap = envoy_config.render(config, envoy_config.load_template(envoy_config._REPO_TEMPLATE))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    dispatch = next(r for r in routes if r["name"] == "dispatch")
    assert dispatch["route"]["retry_policy"]["per_try_timeout"] == "45s"
    assert dispatch["route"]["timeout"] == "0s"  # a long stream is never cut by a deadline
    (log,) = hcm["typed_config"]["access_log"]
    assert log["typed_config"]["path"] == "/var/log/a"

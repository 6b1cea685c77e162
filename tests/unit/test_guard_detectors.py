"""Detector true/false positives, including the tricky negatives coding agents produce."""

from __future__ import annotations

import pytest

from extproc.policies.guard.detectors import (
    BUILTIN_RULES,
    Detector,
    DetectorOptions,
    iban_ok,
    luhn_ok,
    ssn_ok,
)
from tests.data.guard_samples import NEGATIVES, POSITIVES

DET = Detector(BUILTIN_RULES)


@pytest.mark.parametrize(("rule", "text", "value"), POSITIVES)
def test_true_positive(rule: str, text: str, value: str) -> None:
    found = [(f.rule, text[f.start : f.end]) for f in DET.scan(text)]
    assert (rule, value) in found


@pytest.mark.parametrize("text", NEGATIVES)
def test_false_positive_free(text: str) -> None:
    assert [(f.rule, text[f.start : f.end]) for f in DET.scan(text)] == []


def test_findings_never_overlap_and_specific_beats_generic() -> None:
    text = "OPENAI_API_KEY=sk-proj-abcDEF1234567890abcdEFGH1234567890xyzXYZ"
    assert [f.rule for f in DET.scan(text)] == ["openai_api_key"]


def test_scan_many_maps_offsets_back() -> None:
    texts = [
        "nothing here",
        "mail a.b@acme-corp.io",
        "",
        "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    ]
    hits = DET.scan_many(texts)
    assert [(i, f.rule, texts[i][f.start : f.end][:8]) for i, f in hits] == [
        (1, "email", "a.b@acme"),
        (3, "github_token", "ghp_a1B2"),
    ]


def test_allow_lists() -> None:
    det = Detector(
        BUILTIN_RULES,
        options=DetectorOptions(
            allow_values=frozenset({"jane@acme-corp.io"}),
            allow_email_domains=frozenset({"corp.io"}),
        ),
    )
    assert det.scan("jane@acme-corp.io bob@corp.io") == []


def test_disabled_rules_do_not_fire() -> None:
    det = Detector(["github_token"])
    assert det.scan("mail jane.doe@acme-corp.io 4111 1111 1111 1111") == []


def test_validators() -> None:
    assert luhn_ok("4111111111111111")
    assert not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432")
    assert not iban_ok("GB82WEST12345698765433")
    assert ssn_ok("536-22-8714")
    assert not ssn_ok("078-05-1120")


@pytest.mark.parametrize(
    "text",
    [
        "x-anthropic-billing-header: cc_version=2.1.197.123; cc_entrypoint=cli",
        "Windows version 10.0.19041.1",
        "release v1.2.3.4 is out",
        "ver: 4.3.2.1",
    ],
)
def test_version_strings_are_not_addresses(text: str) -> None:
    from extproc.policies.guard import detectors

    detector = detectors.Detector(enabled=frozenset({"ipv4"}))
    assert [f.rule for f in detector.scan(text)] == []


def test_an_address_after_server_is_still_an_address() -> None:
    from extproc.policies.guard import detectors

    detector = detectors.Detector(enabled=frozenset({"ipv4"}))
    assert [f.rule for f in detector.scan("server=8.8.8.8")] == ["ipv4"]

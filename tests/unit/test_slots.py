"""`slot_init` on the ext_proc events and other hot-path values: construction only is
faster; defaults (factories too), equality and frozenness stay the dataclass's."""

from __future__ import annotations

import dataclasses

import pytest

from extproc.apis.usage import Usage
from extproc.phases import Phase, RequestHeaders, ResponseHeaders
from extproc.slots import slot_init


def test_default_factories_are_called_per_instance() -> None:
    one, two = RequestHeaders({"a": "b"}, True), RequestHeaders({"a": "b"}, True)
    assert one == two
    assert one.route_policy == {}
    assert one.jwt_metadata == {}
    assert one.route_policy is not two.route_policy  # a new dict each, as dataclass makes
    given = {"cache": "off"}
    assert RequestHeaders({}, False, "r", given).route_policy is given
    assert RequestHeaders({}, False, route_name="r").route_name == "r"
    assert one.phase is Phase.REQUEST_HEADERS
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.end_of_stream = False  # type: ignore[misc]


def test_values_behave_as_before() -> None:
    assert ResponseHeaders({}, False).details == ""
    assert Usage(1, 2) + Usage(3) == Usage(input_tokens=4, output_tokens=2)
    assert hash(Usage(1)) == hash(Usage(input_tokens=1))
    with pytest.raises(TypeError):
        RequestHeaders({})  # type: ignore[call-arg]


def test_refuses_fields_it_cannot_init() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class KeywordOnly:
        x: int = dataclasses.field(kw_only=True)

    with pytest.raises(TypeError, match="plain fields"):
        slot_init(KeywordOnly)

"""The shared identifier rule: printable, no control characters, at most 128 characters."""

from __future__ import annotations

import pytest

from tokenaudit.schemas.identifiers import (
    MAX_IDENTIFIER_LENGTH,
    InvalidIdentifier,
    check_identifier,
    identifier_problem,
)


@pytest.mark.parametrize("value", ["acme", "team/α-β 1", "a" * MAX_IDENTIFIER_LENGTH, "x@y.z:1", 'quo"te\\'])
def test_printable_identifiers_pass(value):
    assert identifier_problem(value) is None and check_identifier("client_id", value) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "must not be empty"),
        ("a\x1fb", "non-printable"),
        ("line\nbreak", "non-printable"),
        ("\ud800", "non-printable"),
        ("tab\there", "non-printable"),
        ("a" * (MAX_IDENTIFIER_LENGTH + 1), "at most 128"),
        (17, "must be text"),
        (None, "must be text"),
    ],
)
def test_bad_identifiers_are_named_with_the_reason(value, why):
    assert why in identifier_problem(value)
    with pytest.raises(InvalidIdentifier, match=f"department .*{why}"):
        check_identifier("department", value)


def test_empty_is_allowed_where_optional():
    assert identifier_problem("", required=False) is None
    assert check_identifier("department", "", required=False) == ""

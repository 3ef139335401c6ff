"""The one rule for identifiers that travel in records (client_id, department, model, ...).

Shared by every place that accepts or reads one: ``keys add`` (so a registry can never hold an
identifier a later reader rejects), the stream worker (an event from any producer with a bad
identifier goes to the dead-letter topic instead of crashing the job) and the report
parameters. Printable text only (``str.isprintable``: no control characters such as the
``\\x1f`` the worker once used as a key separator, no lone surrogates, no line breaks), at
most :data:`MAX_IDENTIFIER_LENGTH` characters. The check is a few C calls (~0.1 us), cheap
enough for the worker's per-event path.
"""

from __future__ import annotations

from tokenaudit.errors import InvalidIdentifier

MAX_IDENTIFIER_LENGTH = 128


def identifier_problem(value: object, *, required: bool = True) -> str | None:
    """Why ``value`` is not a valid identifier, or None. ``required``: empty is a problem."""
    if not isinstance(value, str):
        return f"must be text, got {type(value).__name__}"
    if not value:
        return "must not be empty" if required else None
    if len(value) > MAX_IDENTIFIER_LENGTH:
        return f"is {len(value)} characters long (at most {MAX_IDENTIFIER_LENGTH})"
    if not value.isprintable():
        return "holds a control or other non-printable character"
    return None


def check_identifier(field: str, value: object, *, required: bool = True) -> str:
    """``value`` if it is a valid identifier, else :class:`InvalidIdentifier` naming ``field``."""
    problem = identifier_problem(value, required=required)
    if problem is not None or not isinstance(value, str):
        raise InvalidIdentifier(f"{field} {problem}: {value!r:.80}")
    return value

"""``tokenaudit keys add|list|revoke``: the API-key registry (hashed keys -> client, department, role)."""

from __future__ import annotations

import time

import click

from tokenaudit.cli.common import FORMAT_OPTION, settings


@click.group()
def keys() -> None:
    """The API-key registry (hashed keys -> client, department, role)."""


# click.IntRange gives the clear error (and stores nothing) for 0, negatives and non-numbers
RPM_OPTION = click.option(
    "--rpm",
    type=click.IntRange(min=1),
    default=None,
    help="Requests per minute for this key, per inference instance (default: no limit).",
)
TPM_OPTION = click.option(
    "--tpm",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens per minute (input + output) for this key, per inference instance (default: no limit).",
)


@keys.command("add")
@click.option("--client", "client_id", required=True, help="client_id the key maps to.")
@click.option("--department", default="", show_default=True, help="Department of the client.")
@click.option("--admin", is_flag=True, help="Give the key the admin role.")
@click.option(
    "--expires",
    default=None,
    metavar="WHEN",
    help="Expiry: a duration from now (90m, 12h, 30d, 2w) or an ISO date/time; default never.",
)
@RPM_OPTION
@TPM_OPTION
def keys_add(
    client_id: str, department: str, admin: bool, expires: str | None, rpm: int | None, tpm: int | None
) -> None:
    """Add a key and print it once (only its hash is stored)."""
    from tokenaudit.infra.keys import add_key, marker_path, parse_expiry, write_marker

    s = settings()
    path = s.default_api_keys_file
    raw = add_key(
        path,
        client_id,
        department,
        "admin" if admin else "client",
        expires=parse_expiry(expires) if expires else None,
        rpm=rpm,
        tpm=tpm,
    )
    write_marker(marker_path(s), path)
    click.echo(raw)
    click.echo(f"(added to {path}; store the key now, it is not shown again)", err=True)


@keys.command("list")
@FORMAT_OPTION
def keys_list(fmt: str) -> None:
    """List the keys (key_id, client, department, role, created, expires, state, rpm, tpm); never the key."""
    from tokenaudit.infra.keys import list_keys
    from tokenaudit.reports.formatting import print_rows

    found = list_keys(settings().default_api_keys_file)
    now = time.time()

    def stamp(t):
        return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else ""

    print_rows(
        [
            {
                "key_id": k.key_id,
                "client": k.client_id,
                "department": k.department,
                "role": k.role,
                "created": stamp(k.created),
                "expires": stamp(k.expires),
                "state": "expired" if k.expired(now) else "active",
                "rpm": k.rpm if k.rpm is not None else "",
                "tpm": k.tpm if k.tpm is not None else "",
            }
            for k in found
        ],
        fmt,
    )


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its key_id: every running service refuses it within about a second."""
    from tokenaudit.infra.keys import marker_path, revoke_key, write_marker

    s = settings()
    key = revoke_key(s.default_api_keys_file, key_id)
    write_marker(marker_path(s), s.default_api_keys_file)
    click.echo(f"revoked {key.key_id} (client {key.client_id})")


@keys.command("update")
@click.argument("key_id")
@RPM_OPTION
@TPM_OPTION
@click.option("--no-limits", is_flag=True, help="Remove both limits.")
def keys_update(key_id: str, rpm: int | None, tpm: int | None, no_limits: bool) -> None:
    """Set a key's rate limits (the ones not given keep their value); running instances apply
    them within about a second."""
    from tokenaudit.infra.keys import list_keys, update_key_limits

    path = settings().default_api_keys_file
    if no_limits == (rpm is not None or tpm is not None):
        raise click.UsageError("give --rpm and/or --tpm, or --no-limits alone")
    current = next((k for k in list_keys(path) if k.key_id == key_id), None)
    if no_limits:
        rpm = tpm = None
    elif current is not None:
        rpm, tpm = rpm if rpm is not None else current.rpm, tpm if tpm is not None else current.tpm
    key = update_key_limits(path, key_id, rpm=rpm, tpm=tpm)
    click.echo(f"{key.key_id} (client {key.client_id}): rpm {key.rpm or 'unlimited'}, tpm {key.tpm or 'unlimited'}")


def register(main: click.Group) -> None:
    main.add_command(keys)

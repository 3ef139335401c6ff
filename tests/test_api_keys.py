"""The API-key registry: hashes only, atomic rewrites, the shared identifier rule, expiry,
revocation, fail-closed reloads, and the `keys add|list|revoke` commands. No broker, no model."""

from __future__ import annotations

import csv
import io
import json
import stat
import threading
import time
import tomllib
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenaudit.infra.keys import (
    AuthError,
    KeyRegistry,
    KeyRegistryError,
    add_key,
    bearer_token,
    hash_key,
    key_id_of,
    list_keys,
    parse_expiry,
    parse_registry,
    revoke_key,
    toml_string,
    write_marker,
)


@pytest.fixture
def fast_reload(monkeypatch):
    monkeypatch.setattr(KeyRegistry, "RELOAD_CHECK_SECONDS", 0.0)


def test_keys_stored_as_hashes_and_looked_up(tmp_path):
    path = tmp_path / "keys.toml"
    alice = add_key(path, "alice", "research")
    root = add_key(path, "ops", "it", role="admin")
    text = path.read_text()
    assert alice not in text and root not in text
    assert hash_key(alice) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reg = KeyRegistry.load(path)
    found = reg.lookup(alice)
    assert (found.client_id, found.department, found.role, found.key_id) == (
        "alice",
        "research",
        "client",
        key_id_of(alice),
    )
    assert found.created is not None and abs(found.created.timestamp() - time.time()) < 60
    assert found.expires is None and not found.expired()
    assert reg.lookup(root).is_admin
    assert reg.lookup(alice + "x") is None
    assert reg.lookup("") is None


def test_every_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "keys.toml"
    add_key(path, "alice")
    inode = path.stat().st_ino
    bob = add_key(path, "bob")
    assert path.stat().st_ino != inode, "a new file renamed over the old one, not an append"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    revoke_key(path, key_id_of(bob))
    assert [k.client_id for k in list_keys(path)] == ["alice"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[[keys]]\nhash = 'sha256:abc'\nclient_id = 'x'\n", "entry 0 is invalid"),
        ("[[keys]]\nclient_id = 'x'\n", "entry 0 is invalid"),
        ("[[keys]]\nhash = 'sha256:" + "a" * 64 + '\'\nclient_id = "a\\u0007b"\n', "non-printable"),
        ("[[keys]]\nhash = 'sha256:" + "a" * 64 + "'\nclient_id = 'x'\nexpires = 2026-01-01T00:00:00\n", "zone"),
        ("[[keys]\n", "unreadable"),
    ],
)
def test_malformed_registry(tmp_path, content, match):
    path = tmp_path / "keys.toml"
    path.write_text(content)
    with pytest.raises(KeyRegistryError, match=match):
        KeyRegistry.load(path)


@pytest.mark.parametrize(
    ("client_id", "department", "problem"),
    [
        ("x", "ops", "role"),
        ('evil"\nrole = "admin', "", "non-printable"),
        ("bell\x07", "", "non-printable"),
        ("tab\there", "", "non-printable"),
        ("fine", "dept\x1f", "non-printable"),
        ("", "", "empty"),
        ("x" * 129, "", "129 characters"),
        ("surrogate\ud800", "", "non-printable"),
    ],
)
def test_keys_add_refuses_bad_identifiers_and_writes_nothing(tmp_path, client_id, department, problem):
    path = tmp_path / "k.toml"
    add_key(path, "first")
    before = path.read_bytes()
    with pytest.raises(KeyRegistryError, match=problem):
        add_key(path, client_id, department, role="root" if problem == "role" else "client")
    assert path.read_bytes() == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_toml_strings_round_trip_through_the_reader(value):
    assert tomllib.loads(f"v = {toml_string(value)}\n")["v"] == value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    client=st.text(
        st.characters(blacklist_categories=("Cs", "Cc", "Cf", "Zl", "Zp", "Co", "Cn")), min_size=1, max_size=128
    ).filter(str.isprintable),
    dept=st.text(max_size=20).filter(str.isprintable),
)
def test_any_identifier_keys_add_accepts_reads_back_exactly(tmp_path, client, dept):
    path = tmp_path / f"k-{abs(hash((client, dept)))}.toml"
    raw = add_key(path, client, dept)
    found = KeyRegistry.load(path).lookup(raw)
    assert (found.client_id, found.department) == (client, dept)


def test_concurrent_writers_lose_no_key(tmp_path):
    path = tmp_path / "keys.toml"
    made: list[str] = []

    def writer(n: int) -> None:
        for i in range(10):
            made.append(add_key(path, f"c{n}-{i}"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reg = KeyRegistry.load(path)
    assert len(reg) == 40 and all(reg.lookup(raw) is not None for raw in made)


def test_running_registry_follows_adds_revocations_and_expiry(tmp_path, fast_reload):
    path = tmp_path / "keys.toml"
    first = add_key(path, "alice", "research")
    reg = KeyRegistry.load(path)
    assert reg.authenticate(f"Bearer {first}").client_id == "alice"
    second = add_key(path, "bob", "support")
    assert reg.lookup(second).client_id == "bob"
    revoke_key(path, key_id_of(first))
    with pytest.raises(AuthError, match="unknown API key") as err:
        reg.authenticate(f"Bearer {first}")
    assert err.value.status == 401
    # 3 s: enough for the add and the first check on a loaded 2-core box, short for the suite
    soon = add_key(path, "carol", expires=datetime.now(UTC) + timedelta(seconds=3))
    assert reg.authenticate(f"Bearer {soon}").client_id == "carol"
    deadline = time.monotonic() + 10
    while reg.lookup(soon) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(AuthError, match="expired API key"):
        reg.authenticate(f"bearer {soon}")
    with pytest.raises(AuthError, match="missing API key"):
        reg.authenticate(None)
    with pytest.raises(AuthError, match="missing API key"):
        reg.authenticate(f"Basic {second}")


def test_a_broken_or_deleted_registry_fails_closed(tmp_path, fast_reload):
    path = tmp_path / "keys.toml"
    key = add_key(path, "alice")
    reg = KeyRegistry(path, marker=tmp_path / "marker")
    assert reg.state == "enforced" and (tmp_path / "marker").exists(), "a loaded registry leaves the marker"
    path.write_text("[[keys]\n")  # a broken edit: no key works, none is let through
    with pytest.raises(AuthError) as err:
        reg.authenticate(f"Bearer {key}")
    assert err.value.status == 503 and reg.state == "unavailable"
    path.unlink()
    with pytest.raises(AuthError) as err:
        reg.authenticate(None)
    assert err.value.status == 503, "a deleted registry is not development mode once one existed"
    # a fresh process over the same data dir agrees (the marker persists)
    assert KeyRegistry(path, marker=tmp_path / "marker").state == "unavailable"
    add_key(path, "alice")
    assert reg.authenticate(f"Bearer {add_key(path, 'bob')}").client_id == "bob"


def test_open_until_a_registry_appears_then_enforced(tmp_path, fast_reload):
    path = tmp_path / "keys.toml"
    reg = KeyRegistry(path, marker=tmp_path / "marker")
    assert reg.state == "open" and reg.authenticate(None) is None
    with pytest.raises(AuthError) as err:
        reg.authenticate(None, allow_open=False)  # the usage API: never open
    assert err.value.status == 401
    key = add_key(path, "alice")
    assert reg.authenticate(f"Bearer {key}").client_id == "alice"
    with pytest.raises(AuthError):
        reg.authenticate(None)
    assert KeyRegistry(tmp_path / "other.toml", required=True).state == "unavailable", (
        "a configured registry that is missing is never open"
    )
    write_marker(tmp_path / "m2", path)
    assert (tmp_path / "m2").read_text()


def test_bearer_parsing():
    assert bearer_token("Bearer abc") == bearer_token(b"bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    assert bearer_token("Bearer\tabc") is None


def test_parse_expiry():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_expiry("30d", now) == now + timedelta(days=30)
    assert parse_expiry("90m", now) == now + timedelta(minutes=90)
    assert parse_expiry("2026-02-01", now) == datetime(2026, 2, 1, tzinfo=UTC)
    for bad in ("yesterday", "0d", "2025-01-01", "999999w", "²d"):
        with pytest.raises(KeyRegistryError, match="--expires"):
            parse_expiry(bad, now)


def test_keys_cli_add_list_revoke(data_dir):
    from tokenaudit.cli import main

    def run(*args):
        return CliRunner().invoke(main, list(args))

    added = run("keys", "add", "--client", "acme", "--department", "research", "--expires", "30d")
    admin = run("keys", "add", "--client", "ops", "--admin")
    assert added.exit_code == 0 and admin.exit_code == 0, added.output
    raw = added.stdout.strip().splitlines()[0]
    path = data_dir / "api_keys.toml"
    assert (data_dir / "api_keys.required").exists(), "`keys add` marks the deployment as keyed"
    listed = run("keys", "list", "--format", "json")
    rows = json.loads(listed.stdout)
    assert [r["client"] for r in rows] == ["acme", "ops"]
    assert list(rows[0]) == ["key_id", "client", "department", "role", "created", "expires", "state", "rpm", "tpm"]
    assert rows[0]["key_id"] == key_id_of(raw) and rows[0]["expires"] and rows[1]["expires"] == ""
    assert rows[1]["role"] == "admin" and {r["state"] for r in rows} == {"active"}
    for fmt in ("table", "csv", "json"):
        out = run("keys", "list", "--format", fmt).stdout
        assert raw not in out and hash_key(raw) not in out, "never the key nor its hash"
    assert len(list(csv.DictReader(io.StringIO(run("keys", "list", "--format", "csv").stdout)))) == 2
    revoked = run("keys", "revoke", key_id_of(raw))
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert [r["client"] for r in json.loads(run("keys", "list", "--format", "json").stdout)] == ["ops"]
    again = run("keys", "revoke", key_id_of(raw))
    assert again.exit_code == 1 and "no key" in again.output
    bad = run("keys", "add", "--client", "a\x07b")
    assert bad.exit_code == 1 and "invalid client_id" in bad.output and "non-printable" in bad.output
    assert run("keys", "add", "--client", "x", "--expires", "soon").exit_code == 1
    assert len(parse_registry(path)) == 1

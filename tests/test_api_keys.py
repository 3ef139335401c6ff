"""The API-key registry stores only hashes and maps keys to client, department and role."""

from __future__ import annotations

import stat

import pytest

from tokenaudit.inference.api_keys import KeyRegistry, KeyRegistryError, add_key, hash_key, key_id_of


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
    assert (found.client_id, found.department, found.role, found.key_id) == ("alice", "research", "client",
                                                                             key_id_of(alice))
    assert reg.lookup(root).is_admin
    assert reg.lookup(alice + "x") is None
    assert reg.lookup("") is None


@pytest.mark.parametrize("content, match", [
    ("[[keys]]\nhash = 'sha256:abc'\nclient_id = 'x'\n", "entry 0 is invalid"),
    ("[[keys]]\nclient_id = 'x'\n", "entry 0 is invalid"),
    ("[[keys]\n", "unreadable"),
])
def test_malformed_registry(tmp_path, content, match):
    path = tmp_path / "keys.toml"
    path.write_text(content)
    with pytest.raises(KeyRegistryError, match=match):
        KeyRegistry.load(path)


def test_bad_role_or_client_rejected(tmp_path):
    with pytest.raises(KeyRegistryError):
        add_key(tmp_path / "k.toml", "x", role="root")
    with pytest.raises(KeyRegistryError):
        add_key(tmp_path / "k.toml", 'evil"\nrole = "admin')


def test_running_registry_picks_up_new_keys(tmp_path, monkeypatch):
    path = tmp_path / "keys.toml"
    first = add_key(path, "alice", "research")
    reg = KeyRegistry.load(path)
    monkeypatch.setattr(KeyRegistry, "RELOAD_CHECK_SECONDS", 0.0)
    assert reg.lookup(first) is not None
    second = add_key(path, "bob", "support")
    assert reg.lookup(second).client_id == "bob"
    path.write_text("[[keys]\n")  # a broken edit keeps the last good entries
    assert reg.lookup(second).client_id == "bob"

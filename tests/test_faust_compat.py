"""Every private faust/aiokafka name the worker uses exists in the installed versions (the
ones pinned in pyproject.toml), and an upgrade that drops one fails loudly, naming it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiokafka.client import AIOKafkaClient

from tokenaudit.errors import IncompatibleDependency
from tokenaudit.streams import faust_compat

ROOT = Path(__file__).resolve().parent.parent


def test_every_private_name_the_worker_uses_exists():
    faust_compat.check_private_api()


def test_a_missing_private_name_is_named(monkeypatch):
    monkeypatch.delattr(AIOKafkaClient, "_wait_on_metadata")
    with pytest.raises(IncompatibleDependency, match=r"client\._wait_on_metadata .*pinned in pyproject.toml"):
        faust_compat.check_private_api()


def test_faust_and_aiokafka_are_pinned_exactly():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"faust-streaming==[\d.]+"', text) and re.search(r'"aiokafka\[[^\]]*\]==[\d.]+"', text)


def test_no_private_faust_or_aiokafka_name_outside_the_compat_module():
    """A private name of theirs is only reached from faust_compat (listed in PRIVATE_API)."""
    listed = {name for _, name, _ in faust_compat.PRIVATE_API}
    for path in (ROOT / "streams").glob("*.py"):
        if path.name == "faust_compat.py":
            continue
        used = set(re.findall(r"\.(_[a-z][a-z_]+)\b", path.read_text())) & listed
        assert not used, f"{path.name} reaches faust/aiokafka internals {sorted(used)}: go through faust_compat"

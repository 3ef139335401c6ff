"""The shape of a local Kafka (how many nodes, SASL or not, the cluster id) and its SCRAM
credentials, as recorded in the data directory when it is first formatted.

Read by the launcher (:mod:`tokenaudit.infra.kafka_cluster`) and by every client of this data
directory (:mod:`tokenaudit.infra.kafka_clients`, which lends a local ``--sasl`` cluster's client
credentials), so both agree on the cluster without importing each other.
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tokenaudit.errors import KafkaLaunchError

LAYOUT_FILE = "cluster.json"
CREDENTIALS_FILE = "credentials.json"
SCRAM_MECHANISM = "SCRAM-SHA-512"
CLIENT_USER = "tokenaudit"
BROKER_USER = "broker"


@dataclass(frozen=True)
class ScramUser:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Layout:
    """The shape of a local cluster, fixed when its storage is first formatted."""

    brokers: int
    sasl: bool
    cluster_id: str


def read_layout(home: Path) -> Layout | None:
    """The recorded shape of the local Kafka in ``home``, or None if none was formatted.

    A single broker formatted before layouts were recorded (storage in ``home/storage``)
    reads as one node without SASL."""
    try:
        raw = json.loads((home / LAYOUT_FILE).read_text())
        return Layout(int(raw["brokers"]), bool(raw["sasl"]), str(raw["cluster_id"]))
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as exc:
        raise KafkaLaunchError(f"{home / LAYOUT_FILE} is unreadable ({exc}); restore or remove it") from None
    meta = home / "storage" / "meta.properties"
    if meta.is_file():
        found = re.search(r"^cluster\.id=(\S+)", meta.read_text(), re.M)
        return Layout(1, False, found.group(1) if found else "")
    return None


def read_credentials(home: Path) -> dict[str, ScramUser] | None:
    """The SCRAM users of a local --sasl cluster ({"client": ..., "broker": ...}), or None."""
    try:
        raw = json.loads((home / CREDENTIALS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KafkaLaunchError(f"{home / CREDENTIALS_FILE} is unreadable ({exc})") from None
    return {role: ScramUser(u["username"], u["password"]) for role, u in raw["users"].items()}


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (it holds passwords), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, url-safe base64 without padding (what `random-uuid` prints)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")

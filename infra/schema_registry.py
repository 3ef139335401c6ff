"""The project's side of a Confluent-compatible schema registry: subjects, ids, compatibility.

Subjects are ``<topic>-value`` (Confluent's TopicNameStrategy, what standard consumers look
up), one per Avro topic of the declaration (:func:`tokenaudit.infra.topics.declared_topics`).
At start-up every process that writes or reads Avro calls :func:`bind`: every shipped
``.avsc`` version of the topic's record is registered in version order (registering a schema
the subject holds returns its id, so this is idempotent and ids are stable), the subject's
compatibility is set to BACKWARD unless it is already stricter, and the ids are bound into the
catalog; an id met later that was not bound (a newer release's writer) is fetched once by id.
The request path never calls the registry: the encoders are built with the ids afterwards.

Written on httpx rather than confluent-kafka's ``SchemaRegistryClient``: the check needs the
registry's reasons (``verbose=true``), which that client drops, and the four calls here are
the documented REST API every compatible registry (Confluent, Apicurio ccompat, Karapace,
Redpanda) serves.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from tokenaudit.errors import RegistryConflict, RegistryError
from tokenaudit.infra.topics import declared_topics
from tokenaudit.schemas.codec import SchemaCatalog, catalog

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
# Confluent's levels, weakest first among those that keep old records readable by new readers
ACCEPTED_LEVELS = ("BACKWARD", "BACKWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE")
DEFAULT_LEVEL = "BACKWARD"


def subject(topic: str) -> str:
    return f"{topic}-value"


def subjects(settings: Any) -> dict[str, str]:
    """Record name -> its subject, for every Avro topic the project writes."""
    return {spec.record: subject(spec.name) for spec in declared_topics(settings) if spec.record}


class RegistryClient:
    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=timeout, headers={"Accept": CONTENT_TYPE})

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, ok: tuple[int, ...] = (200,)) -> Any:
        try:
            response = self._http.request(
                method,
                self.url + path,
                content=None if body is None else json.dumps(body),
                headers={"Content-Type": CONTENT_TYPE},
            )
        except httpx.HTTPError as exc:
            raise RegistryError(f"schema registry {self.url} unreachable: {exc}") from None
        if response.status_code not in ok:
            error = RegistryConflict if response.status_code == 409 else RegistryError
            raise error(f"schema registry {method} {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json() if response.content else None

    def register(self, subject_name: str, schema: dict[str, Any]) -> int:
        body = {"schema": json.dumps(schema), "schemaType": "AVRO"}
        return int(self._call("POST", f"/subjects/{quote(subject_name)}/versions", body)["id"])

    def compatibility(self, subject_name: str) -> str | None:
        """The subject's own level (None when it has none and the registry default applies)."""
        found = self._call("GET", f"/config/{quote(subject_name)}", ok=(200, 404))
        return (found or {}).get("compatibilityLevel") or (found or {}).get("compatibility")

    def set_compatibility(self, subject_name: str, level: str) -> None:
        """Set the subject's level. Processes that start together race to create the rule and
        Apicurio answers the later ones 409 (the rule exists): the level set stands when it is
        one we accept, and is set over otherwise (the PUT then updates the existing rule)."""
        path = f"/config/{quote(subject_name)}"
        try:
            self._call("PUT", path, {"compatibility": level})
        except RegistryConflict:
            if self.compatibility(subject_name) not in ACCEPTED_LEVELS:
                self._call("PUT", path, {"compatibility": level})

    def check(self, subject_name: str, schema: dict[str, Any]) -> list[str]:
        """Why ``schema`` is not compatible with what the subject holds ([] when it is)."""
        body = {"schema": json.dumps(schema), "schemaType": "AVRO"}
        path = f"/compatibility/subjects/{quote(subject_name)}/versions/latest?verbose=true"
        found = self._call("POST", path, body, ok=(200, 404))
        if found is None or "is_compatible" not in found:  # 404: nothing registered yet, nothing to break
            return []
        if found["is_compatible"]:
            return []
        return [str(m) for m in found.get("messages") or []] or ["the registry says: not compatible"]

    def schema(self, schema_id: int) -> dict[str, Any] | None:
        found = self._call("GET", f"/schemas/ids/{schema_id}", ok=(200, 404))
        if not found or "schema" not in found:
            return None
        parsed = json.loads(found["schema"])
        return parsed if isinstance(parsed, dict) else None


@dataclass(frozen=True)
class Binding:
    url: str
    ids: dict[str, list[int]]  # record name -> registry ids of its versions, oldest first


_bind_lock = threading.Lock()


def bind(settings: Any, into: SchemaCatalog = catalog) -> Binding:
    """Register every shipped version (in version order), set each subject's compatibility,
    bind the ids into the catalog and install the by-id resolver. Raises RegistryError."""
    url = settings.schema_registry_url
    if not url:
        raise RegistryError("no schema registry: set TOKENAUDIT_SCHEMA_REGISTRY_URL (or let `tokenaudit up` start one)")
    client = RegistryClient(url)
    ids: dict[str, list[int]] = {}
    with _bind_lock:
        for name, subject_name in subjects(settings).items():
            level = client.compatibility(subject_name)
            if level not in ACCEPTED_LEVELS:
                client.set_compatibility(subject_name, DEFAULT_LEVEL)
            for sv in into.by_name[name]:
                schema_id = client.register(subject_name, sv.raw)
                into.bind_id(schema_id, sv)
                ids.setdefault(name, []).append(schema_id)
        into.resolver = _Resolver(url)
    client.close()
    log.info("schema registry %s: ids %s", url, ids)
    return Binding(url, ids)


class _Resolver:
    """Fetches the schema of an unbound id (once: the catalog caches the answer). An
    unreachable registry is retried for ``patience`` seconds, then RegistryError: a reader
    must stop and retry the record later, never dead-letter a record it could read."""

    def __init__(self, url: str, patience: float = 30.0):
        self.url = url
        self.patience = patience
        self._lock = threading.Lock()

    def __call__(self, schema_id: int) -> dict[str, Any] | None:
        from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

        with self._lock:
            for attempt in Retrying(
                retry=retry_if_exception_type(RegistryError),
                stop=stop_after_delay(self.patience),
                wait=wait_exponential(multiplier=0.2, max=5),
                reraise=True,
            ):
                with attempt:
                    client = RegistryClient(self.url)
                    try:
                        return client.schema(schema_id)
                    finally:
                        client.close()
        return None  # not reached: the last attempt returns or raises


def check(settings: Any, source: SchemaCatalog = catalog) -> list[str]:
    """Every shipped version checked against its subject, in version order; the problems
    found ([] when all are compatible). Registers nothing."""
    url = settings.schema_registry_url
    if not url:
        raise RegistryError("no schema registry to check against: set TOKENAUDIT_SCHEMA_REGISTRY_URL")
    client = RegistryClient(url)
    problems = []
    try:
        for name, subject_name in subjects(settings).items():
            for sv in source.by_name[name]:
                for reason in client.check(subject_name, sv.raw):
                    problems.append(f"{subject_name}: {name}.v{sv.version}.avsc: {reason}")
    finally:
        client.close()
    return problems


def prepare(settings: Any, into: SchemaCatalog = catalog) -> bool:
    """A process's start-up step: bind the registry's ids when one is configured (so every
    reader resolves Confluent records), and say whether writers frame records in the
    Confluent wire format. Raises RegistryError when that format is asked for without a
    registry, or when the registry cannot be reached."""
    if settings.writes_confluent and not settings.schema_registry_url:
        raise RegistryError(
            "TOKENAUDIT_WIRE_FORMAT=confluent needs a schema registry: set TOKENAUDIT_SCHEMA_REGISTRY_URL "
            "(or run the services with `tokenaudit up`, which starts one)"
        )
    if settings.schema_registry_url:
        bind(settings, into)
    return bool(settings.writes_confluent)

"""The project's one error hierarchy: every error a user can meet is a :class:`TokenauditError`.

Why one place (httpx's model): a caller catches the family it cares about with one name
(``except TokenauditError`` in the CLI, which prints the message as one line and exits 1;
``except KafkaAccessError`` in a test) instead of a list of classes from five modules, and a
new error cannot be forgotten by the CLI. The modules that raise an error import it from here
(and keep the name importable from themselves).

Each class keeps the built-in base it always had (``ValueError`` for bad input,
``RuntimeError`` for a failed operation), so code that catches those still does. Messages are
one line, name the thing that is wrong (a variable, a file, a parameter) and never a secret.

Not here: exceptions that are control flow inside one room and never reach a user as such
(the inference app's ``ApiError`` and ``Overloaded``, which become HTTP answers; the codec's
private markers).
"""

from __future__ import annotations


class TokenauditError(Exception):
    """Base of every tokenaudit error a user can meet; its message is one line for them."""


# --- configuration ---------------------------------------------------------------------------------
class SettingsError(TokenauditError, ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


# --- the contract (schemas) ------------------------------------------------------------------------
class AvroDecodeError(TokenauditError, ValueError):
    """Bytes that are not a decodable single-object Avro message: bad magic, an unknown
    writer fingerprint, a truncated or corrupt body, or a record of the wrong type."""


class InvalidIdentifier(TokenauditError, ValueError):
    """An identifier breaks the rule; the message names the field and the reason."""


# --- platform (infra) --------------------------------------------------------------------------------
class KafkaInstallError(TokenauditError, RuntimeError):
    """The broker runtime could not be fetched; the message says what to do."""


class KafkaLaunchError(TokenauditError, RuntimeError):
    """The local broker could not be started or stopped; the message says what to do."""


class KafkaConfigError(TokenauditError, ValueError):
    """The Kafka security settings contradict each other; the message names the variables."""


class KafkaAccessError(TokenauditError, RuntimeError):
    """The cluster cannot be reached or refused this client; the message says which and what to check."""


class KafkaAuthError(KafkaAccessError):
    """The cluster refused the client's credentials (or its TLS handshake)."""


class ClickHouseError(TokenauditError, RuntimeError):
    """ClickHouse is unreachable, locked or misconfigured; the message says which."""


class KeyRegistryError(TokenauditError, ValueError):
    """The API-key registry file is unreadable or malformed, or a write was refused; the message
    names the file and entry."""


class AuthError(TokenauditError):
    """A request cannot be authenticated. ``status`` 401 (no, unknown or expired key) or 503
    (the registry is unavailable: fail closed); ``code`` goes into the error envelope."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ServiceError(TokenauditError, RuntimeError):
    """A background service failed to start; the message carries the tail of its log."""


class IncompatibleDependency(TokenauditError, RuntimeError):
    """An installed library lacks an internal the project relies on (a faust or aiokafka
    upgrade); the message names the library, the attribute and the pinned version."""


# --- inference -----------------------------------------------------------------------------------------
class DigestSecretError(TokenauditError, ValueError):
    """The prompt-digest secret file is empty, unreadable or malformed: start-up stops, because
    an HMAC with an empty or wrong key would silently break repeat detection."""


class SpoolLocked(TokenauditError, RuntimeError):
    """Another process holds the spool directory."""


class ModelInitError(TokenauditError, RuntimeError):
    """The default model could not be built or did not reload intact."""


# --- read side (reports) -----------------------------------------------------------------------------
class QueryParamError(TokenauditError, ValueError):
    """A report parameter is invalid; the message names the parameter and what is accepted
    (``param``: the parameter's name, for the error envelope's ``param``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class PriceTableError(TokenauditError, ValueError):
    """The price table is missing, malformed, or lacks a model; the message names the file and entry."""


class UsageApiError(TokenauditError, RuntimeError):
    """The usage API refused or failed a request; the message is the API's own."""


class UsageApiUnreachable(UsageApiError):
    """Nothing answers at the usage API address."""


class VerifyError(TokenauditError, RuntimeError):
    """The check could not run (topic missing, store unreachable...); the message says why."""


class FollowError(TokenauditError, RuntimeError):
    """The anomaly topic cannot be consumed (bad bootstrap, missing topic...)."""


class WebhookError(TokenauditError, RuntimeError):
    """The webhook could not be delivered to (bad URL, rejected payload, gave up)."""


class WebhookRejected(WebhookError):
    """The endpoint answered a non-retryable 4xx."""


class RegistryError(TokenauditError, RuntimeError):
    """The schema registry could not be installed, started, reached, or refused a schema."""


class RegistryConflict(RegistryError):
    """The registry answered 409: what we create exists already (another process made it)."""


class SchemaIncompatible(RegistryError):
    """A shipped ``.avsc`` version is not compatible with what the registry holds for its subject."""


class BudgetError(TokenauditError, ValueError):
    """A budget that cannot be stored (unknown scope, client or period; a limit <= 0): nothing
    is written."""

"""One line instead of a traceback when the broker or the store does not answer (the operator CLI).

`describe(exc)` recognises an exception (or one it was raised from) meaning that Kafka or MongoDB
could not be reached, and says so in one line with what to check; anything else is a bug and
keeps its traceback. Connection strings are never printed whole: only hosts, so credentials in
`ALLIANCE_MONGO_URL` stay out of terminals and CI logs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from aiokafka import errors as kafka_errors
from pydantic import ValidationError
from pymongo import uri_parser
from pymongo.errors import ConnectionFailure, OperationFailure

from shared.settings import KafkaSettings, MongoSettings

# The exit status of a command that could not reach its broker or store (1 stays "the command
# ran and found a problem", as in `keys revoke` of an unknown key).
EXIT_UNREACHABLE = 2

_KAFKA = (kafka_errors.KafkaConnectionError, kafka_errors.KafkaTimeoutError, kafka_errors.NoBrokersAvailable,
          kafka_errors.NodeNotReadyError, kafka_errors.RequestTimedOutError)
_KAFKA_AUTH = (kafka_errors.SaslAuthenticationFailed, kafka_errors.AuthenticationFailedError,
               kafka_errors.AuthenticationMethodNotSupported)
_MONGO_AUTH_CODES = frozenset({18})  # AuthenticationFailed
_STACK_HINT = "locally: `alliance stack up`"


class BrokerUnreachable(Exception):
    """Raised by commands that detect an unanswering broker themselves (e.g. a bounded wait)."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
        if e.__context__ is not None and not e.__suppress_context__:
            todo.append(e.__context__)


def _reason(exc: BaseException) -> str:
    """The cause in a few words: the first line, without pymongo's topology dump or timeouts."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = re.split(r", Timeout: | \(configured timeouts|, Topology Description", text)[0]
    text = re.sub(r"\s+", " ", text).strip().removeprefix(f"{type(exc).__name__}: ")
    text = re.sub(r"mongodb(\+srv)?://[^\s/]*@", "mongodb://***@", text)  # never a password
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def mongo_hosts(settings: MongoSettings) -> str:
    """The hosts of the store's URL (no user, no password, no options)."""
    try:
        nodes = uri_parser.parse_uri(settings.url, connect_timeout=1)["nodelist"]
    except Exception:  # an SRV name that does not resolve, a malformed URL: say which setting
        return "ALLIANCE_MONGO_URL"
    return ",".join(f"{h}:{p}" for h, p in nodes) or "ALLIANCE_MONGO_URL"


def _settings() -> tuple[KafkaSettings | None, MongoSettings | None]:
    try:
        kafka: KafkaSettings | None = KafkaSettings()
    except ValidationError:
        kafka = None
    try:
        mongo: MongoSettings | None = MongoSettings()
    except ValidationError:
        mongo = None
    return kafka, mongo


def describe(exc: BaseException) -> str | None:
    """One line naming the unreachable broker or store and what to check; None for any other error."""
    kafka, mongo = _settings()
    for e in _chain(exc):
        if isinstance(e, ConnectionFailure):
            where = mongo_hosts(mongo) if mongo else "ALLIANCE_MONGO_URL"
            within = f" within {mongo.timeout_ms / 1000:g} s" if mongo else ""
            return (f"error: MongoDB at {where} did not answer{within} ({_reason(e)}). Hint: is the store "
                    f"running and reachable? Check ALLIANCE_MONGO_URL ({_STACK_HINT}).")
        if isinstance(e, OperationFailure) and e.code in _MONGO_AUTH_CODES:
            where = mongo_hosts(mongo) if mongo else "ALLIANCE_MONGO_URL"
            return (f"error: MongoDB at {where} refused the credentials ({_reason(e)}). Hint: check the user "
                    "and password in ALLIANCE_MONGO_URL.")
        if isinstance(e, _KAFKA_AUTH):
            where = kafka.bootstrap if kafka else "ALLIANCE_KAFKA_BOOTSTRAP"
            return (f"error: Kafka at {where} refused the credentials ({_reason(e)}). Hint: check "
                    "ALLIANCE_KAFKA_SASL_USERNAME, ALLIANCE_KAFKA_SASL_PASSWORD and ALLIANCE_KAFKA_SECURITY_PROTOCOL.")
        if isinstance(e, (*_KAFKA, BrokerUnreachable)):
            where = kafka.bootstrap if kafka else "ALLIANCE_KAFKA_BOOTSTRAP"
            return (f"error: Kafka at {where} did not answer ({_reason(e)}). Hint: is the broker running and "
                    f"reachable? Check ALLIANCE_KAFKA_BOOTSTRAP and ALLIANCE_KAFKA_SECURITY_PROTOCOL ({_STACK_HINT}).")
    return None

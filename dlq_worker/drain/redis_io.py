"""The Redis client as the worker uses it: one connection setup (TLS, Sentinel, no
retries of its own), every redis-py error translated into RedisUnavailable or
RedisCommandError, and the stream entry as read."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from dlq_worker.config import RedisConfig
from dlq_worker.errors import RedisCommandError, RedisUnavailable, StartupError, StreamGone

log = logging.getLogger(__name__)

#: Redis errors that mean "not now" rather than "never": the server is loading, busy,
#: failing over or out of memory. Every other error reply is a RedisCommandError.
_TRANSIENT_REPLIES = frozenset({"LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN",
                                "CLUSTERDOWN", "OOM", "NOREPLICAS", "NOAUTH", "WRONGPASS",
                                "NOPERM"})

#: The largest entry a read step counts on: the contract's largest envelope (1 MiB) with
#: room for its field name. Reads and claims are sized by it, so the bytes they bring
#: never pass the budget for entries up to this size (larger ones are parked at once).
LARGEST_ENTRY = 1024 * 1024 + 1024

#: Fields of a parked entry kept one by one; beyond that the rest travel in one field, so
#: an entry with thousands of fields is parked whole (Lua's unpack has a limit).
MAX_PARKED_FIELDS = 200


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read. ``fields`` is empty when it was deleted while pending."""

    stream: str
    id: str
    fields: Mapping[bytes, bytes]

    @property
    def deleted(self) -> bool:
        return not self.fields

    @property
    def size(self) -> int:
        """Bytes of its field names and values: what holding it in memory costs, roughly."""
        fields = self.fields
        return sum(map(len, fields)) + sum(map(len, fields.values()))

    @property
    def first_failed_at(self) -> str:
        """When it entered the DLQ (its ID's time, set by Redis): its first failure; empty
        for an ID no calendar holds (an explicit ID far in the future)."""
        try:
            stamp = dt.datetime.fromtimestamp(int(self.id.split("-", 1)[0]) / 1000, dt.UTC)
        except (ValueError, OverflowError, OSError):
            return ""
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_client(config: RedisConfig, *, block_seconds: float = 0.0) -> redis.Redis:
    """A client for the DLQ's database; no built-in retries: the loop owns backoff."""
    timeout = max(float(config.socket_timeout), block_seconds + 5.0)
    kwargs: dict[str, Any] = {}
    if config.use_tls:
        kwargs["ssl"] = True
        if config.tls_ca_file:
            kwargs["ssl_ca_certs"] = config.tls_ca_file
        if config.tls_cert_file:
            kwargs["ssl_certfile"] = config.tls_cert_file
            kwargs["ssl_keyfile"] = config.tls_key_file or None
    common: dict[str, Any] = dict(
        db=config.db,
        username=config.username or None,
        password=config.password or None,
        socket_timeout=timeout,
        socket_connect_timeout=float(config.socket_timeout),
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
        client_name="dlq-worker",
        # The replies as the worker reads them (redis-py 8 would negotiate RESP3 otherwise).
        protocol=2,
        **kwargs,
    )
    if config.sentinels:
        # redis-py asks the sentinels for the master at every new connection and drops its
        # connections when the master it knew turns read-only: a failover is followed by
        # the loop's own retries. The sentinels speak TLS too when the data nodes do.
        sentinel = Sentinel(config.sentinel_addrs, sentinel_kwargs={  # type: ignore[no-untyped-call,unused-ignore]
            "socket_timeout": float(config.socket_timeout),
            "socket_connect_timeout": float(config.socket_timeout), "protocol": 2,
            **kwargs})
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call,unused-ignore]
            config.master_name, **common)
        return master
    return redis.Redis(host=config.host, port=config.port, **common)


#: Replies that mean "this stream or its group does not exist", not "Redis is down".
_GONE = ("NOGROUP", "no such key")


@contextmanager
def translated(what: str, stream: str | None = None) -> Iterator[None]:
    """Turn any redis-py error into the worker's terms, naming the operation: a vanished
    stream or group (when ``stream`` is given) into StreamGone; an error reply no retry
    cures (WRONGTYPE, a script error) into RedisCommandError; the rest (connection lost,
    loading, failing over) into RedisUnavailable."""
    try:
        yield
    except redis.ResponseError as exc:
        text = _first_line(exc)
        if stream is not None and any(marker in text for marker in _GONE):
            raise StreamGone([stream]) from exc
        # redis-py strips the error code of the replies it knows (READONLY, OOM, NOPERM,
        # TRYAGAIN...) into the exception's class and status_code: look there first.
        code = str(getattr(exc, "status_code", None) or "")
        if code in _TRANSIENT_REPLIES or _transient_reply(text):
            raise RedisUnavailable(f"{what}: {type(exc).__name__}: {text}") from exc
        raise RedisCommandError(f"{what}: {text}") from exc
    except redis.RedisError as exc:
        raise RedisUnavailable(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _transient_reply(text: str) -> bool:
    # The error code may follow a script's own prefix: look at every upper-case word.
    return not _TRANSIENT_REPLIES.isdisjoint(re.findall(r"\b[A-Z]{2,}\b", text))


def check_connection(config: RedisConfig) -> None:
    """Fail fast with a StartupError if Redis cannot be reached."""
    client = make_client(config)
    try:
        with translated("PING"):
            client.ping()
    except RedisUnavailable as exc:
        raise StartupError(f"Redis at {config.host}:{config.port} db {config.db}: {exc}") from exc
    finally:
        client.close()


def _entries(reply: Any) -> Iterator[Entry]:
    if not reply:
        return
    for stream_name, rows in reply:
        stream = _text(stream_name)
        for entry_id, fields in rows:
            if entry_id is not None:
                yield Entry(stream, _text(entry_id), fields or {})


def id_pair(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:240] if text else type(exc).__name__


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def describe_entry(entry: Entry) -> dict[str, Any]:
    """Log-safe facts about an entry: IDs and correlation, never the payload."""
    facts: dict[str, Any] = {"stream": entry.stream, "entry_id": entry.id}
    raw = entry.fields.get(b"message")
    if raw:
        try:
            doc = json.loads(raw)
            payload = doc.get("payload") if isinstance(doc, dict) else None
            if isinstance(payload, str):
                payload = json.loads(payload)
            if isinstance(payload, dict) and isinstance(payload.get("correlation_id"), str):
                facts["correlation_id"] = payload["correlation_id"][:255]
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
    return facts

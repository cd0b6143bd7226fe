"""The producer side of the contract, for services whose PostgreSQL write failed.

Writes a record to the DLQ exactly as the Data Storage service does: a single
``message`` field, base64 ``event_data``/``event_metadata``, RFC 3339 timestamps with
nanoseconds, ``XADD ... MAXLEN ~ cap``. Records are validated first against the
producer-side limits, so a record the worker could never write is refused here,
where the caller can still see it.

    from dlq_worker.producer import Producer
    dlq = Producer(redis.Redis(host="redis", db=1))
    dlq.enqueue(record, "audit_event")        # -> entry ID, or raises EnqueueError

    write_or_enqueue(engine, dlq, record, "audit_event")   # PostgreSQL first, DLQ on failure
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Mapping
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Histogram
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert

from dlq_worker.drain.decode import decode_entry
from dlq_worker.errors import DecodeError, DlqWorkerError, RedisUnavailable

AUDIT_EVENT = "audit_event"
NOTIFICATION = "notification_audit"

#: Envelope ``type`` -> default stream and table.
STREAMS = {AUDIT_EVENT: "audit:dlq:events", NOTIFICATION: "audit:dlq:notifications"}
TABLES = {AUDIT_EVENT: "audit_events", NOTIFICATION: "notification_audit"}

MAX_RECORD_BYTES = 1024 * 1024
MAX_EVENT_DATA_BYTES = 256 * 1024
MAX_NESTING = 10

_BASE64_FIELDS = ("event_data", "event_metadata")


class EnqueueError(DlqWorkerError):
    """The record was not written to the DLQ: the caller must fail its request (5xx)."""


class InvalidRecord(EnqueueError):
    """The record breaks the contract or its limits; retrying will not help."""


class DlqUnavailable(EnqueueError, RedisUnavailable):
    """Redis did not take the record."""


def go_timestamp(moment: dt.datetime | None = None, nanos: int | None = None) -> str:
    """RFC 3339 with 9 fractional digits, like Go's time.RFC3339Nano (trailing zeros kept)."""
    if moment is None:
        ns = time.time_ns()
        moment = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC)
        nanos = ns % 1_000_000_000
    moment = moment.astimezone(dt.UTC)
    if nanos is None:
        nanos = moment.microsecond * 1000
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def encode_payload(kind: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """The payload as the producer serializes it: JSON objects in event_data/metadata
    become base64 of their JSON bytes (Go marshals []byte as base64)."""
    payload = dict(record)
    if kind == AUDIT_EVENT:
        for name in _BASE64_FIELDS:
            value = payload.get(name)
            if isinstance(value, Mapping):
                raw = json.dumps(value, separators=(",", ":")).encode()
                payload[name] = base64.b64encode(raw).decode()
    return payload


def build_message(kind: str, record: Mapping[str, Any], *, retry_count: int = 0,
                  last_error: str = "database write failed",
                  timestamp: str | None = None) -> bytes:
    """The JSON envelope for the ``message`` field."""
    envelope = {
        "type": kind,
        "payload": encode_payload(kind, record),
        "timestamp": timestamp or go_timestamp(),
        "retry_count": retry_count,
        "last_error": last_error[:256],
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def validate(kind: str, record: Mapping[str, Any]) -> bytes:
    """Check the record against the contract and the producer limits; the message if valid."""
    if kind not in STREAMS:
        raise InvalidRecord(f"unknown record type {kind!r}: expected one of {sorted(STREAMS)}")
    if kind == AUDIT_EVENT:
        for name in _BASE64_FIELDS:
            value = record.get(name)
            if value is None:
                continue
            raw = json.dumps(value, separators=(",", ":")).encode() \
                if isinstance(value, Mapping) else str(value).encode()
            if name == "event_data" and len(raw) > MAX_EVENT_DATA_BYTES:
                raise InvalidRecord(f"{name} is {len(raw)} bytes, over {MAX_EVENT_DATA_BYTES}")
            if isinstance(value, Mapping) and _depth(value) > MAX_NESTING:
                raise InvalidRecord(f"{name} nests deeper than {MAX_NESTING} levels")
    message = build_message(kind, record)
    if len(message) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"record is {len(message)} bytes, over {MAX_RECORD_BYTES}")
    try:
        decode_entry(TABLES[kind], {b"message": message})
    except DecodeError as exc:
        raise InvalidRecord(f"record breaks the DLQ contract: {exc}") from exc
    return message


class Producer:
    """Writes records to the DLQ; measures its own latency."""

    def __init__(self, client: redis.Redis, *, max_length: int = 10000,
                 streams: Mapping[str, str] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.client = client
        self.max_length = max_length
        self.streams = dict(STREAMS if streams is None else streams)
        self.latency = Histogram(
            "dlq_producer_enqueue_duration_seconds", "Time to write one record to the DLQ.",
            ["type"], registry=registry if registry is not None else CollectorRegistry(),
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1))

    def enqueue(self, record: Mapping[str, Any], kind: str) -> str:
        """XADD one record with ``MAXLEN ~ max_length``; returns the entry ID.

        Raises InvalidRecord for a record that could never be written, EnqueueError
        (a RedisUnavailable) when Redis does not take it.
        """
        started = time.perf_counter()
        message = validate(kind, record)
        key = self.streams[kind]
        try:
            entry_id = self.client.xadd(key, {"message": message}, maxlen=self.max_length,
                                        approximate=True)
        except redis.RedisError as exc:
            raise DlqUnavailable(f"XADD {key}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
        finally:
            self.latency.labels(kind).observe(time.perf_counter() - started)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def enqueue(client: redis.Redis, kind: str, record: Mapping[str, Any], *,
            max_length: int = 10000) -> str:
    """One-shot form of ``Producer(client).enqueue(record, kind)``."""
    return Producer(client, max_length=max_length).enqueue(record, kind)


def write_or_enqueue(engine: Engine, producer: Producer, record: Mapping[str, Any],
                     kind: str) -> str:
    """Insert the record into PostgreSQL; if the database fails in any way, put it in the DLQ.

    Returns ``"written"`` or the DLQ entry ID. A duplicate key is success. A record that
    breaks the contract raises InvalidRecord before anything is written; if both
    PostgreSQL and Redis fail, EnqueueError: the caller must fail its request.
    """
    from dlq_worker.drain.schema import TABLES as TABLE_DEFS

    message = validate(kind, record)
    row = decode_entry(TABLES[kind], {b"message": message}).values
    stmt = pg_insert(TABLE_DEFS[TABLES[kind]]).on_conflict_do_nothing()
    try:
        with engine.begin() as conn:
            conn.execute(stmt, row)
        return "written"
    except sa_exc.DBAPIError:
        # Unreachable, or refused (a missing partition, a constraint): the worker retries,
        # creates the partition, or parks it with the reason. It is never lost here.
        return producer.enqueue(record, kind)


def _depth(value: Any, level: int = 1) -> int:
    if isinstance(value, Mapping):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level - 1 if level > 1 else level

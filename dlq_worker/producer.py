"""The producer side of the contract: write a record to the DLQ exactly as the
Data Storage service does (single ``message`` field, base64 ``event_data``,
RFC 3339 timestamps with nanoseconds, ``XADD ... MAXLEN ~ cap``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Mapping
from typing import Any

import redis

from dlq_worker.errors import RedisUnavailable

AUDIT_EVENT = "audit_event"
NOTIFICATION = "notification_audit"

#: Envelope ``type`` -> default stream.
STREAMS = {AUDIT_EVENT: "audit:dlq:events", NOTIFICATION: "audit:dlq:notifications"}

_BASE64_FIELDS = ("event_data", "event_metadata")


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


def enqueue(client: redis.Redis, kind: str, record: Mapping[str, Any], *,
            stream: str | None = None, max_length: int = 10000, **envelope: Any) -> str:
    """XADD one record to its DLQ stream with ``MAXLEN ~ max_length``; returns the entry ID.

    Raises RedisUnavailable when Redis does not take it, so the caller can fail its request.
    """
    key = stream or STREAMS[kind]
    message = build_message(kind, record, **envelope)
    try:
        entry_id = client.xadd(key, {"message": message}, maxlen=max_length, approximate=True)
    except redis.RedisError as exc:
        raise RedisUnavailable(f"XADD {key}: {type(exc).__name__}") from exc
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

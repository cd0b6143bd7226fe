"""Turn one stream entry into one row, or a DecodeError saying why it never can be.

Pure functions, no I/O. The wire format is the one the Data Storage service writes
(see the DLQ contract): a single ``message`` field holding a JSON envelope whose
``payload`` is the record; ``event_data``/``event_metadata`` arrive base64-encoded.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from dlq_worker.errors import DecodeError

#: A whole envelope above this size is invalid (producer-side limit in the contract).
MAX_ENVELOPE_BYTES = 1024 * 1024

AUDIT_EVENTS = "audit_events"
NOTIFICATION_AUDIT = "notification_audit"

CHANNELS = frozenset({"slack", "pagerduty", "teams", "console", "file", "log"})
STATUSES = frozenset({"sent", "failed", "acknowledged", "escalated"})

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"([Zz]|[+-]\d{2}:\d{2})$"
)
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
#: orjson parses an integer beyond 64 bits as a float; any float this large may be one.
_BIG = float(2**63)


def _loads(raw: bytes | str) -> Any:
    """orjson (several times faster), unless the document holds a number it may have
    rounded: audit data must keep every digit, and jsonb stores numbers of any size."""
    doc = orjson.loads(raw)
    if _maybe_rounded(doc):
        return json.loads(raw)
    return doc


def _maybe_rounded(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return bool(abs(value) >= _BIG)
    if kind is dict:
        return any(_maybe_rounded(v) for v in value.values())
    if kind is list:
        return any(_maybe_rounded(v) for v in value)
    return False


@dataclass(frozen=True, slots=True)
class Envelope:
    """The DLQ envelope around a record; everything but ``payload`` is informational."""

    type: str | None
    payload: dict[str, Any]
    timestamp: dt.datetime | None
    retry_count: int | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Record:
    """One row for one table, with the key that makes its insert idempotent."""

    table: str
    key: tuple[Any, ...]
    values: dict[str, Any]
    correlation_id: str | None = None
    sensitive: bool = False


def decode_entry(table: str, fields: Mapping[bytes, bytes]) -> Record:
    """Decode a raw stream entry routed to ``table`` into a Record.

    Raises DecodeError for anything that does not follow the contract.
    """
    envelope = decode_envelope(fields)
    try:
        decoder = _DECODERS[table]
    except KeyError:
        raise DecodeError(f"no decoder for table {table!r}", reason="unknown_table") from None
    return decoder(envelope.payload)


def decode_envelope(fields: Mapping[bytes, bytes]) -> Envelope:
    """Parse the ``message`` field of an entry into an Envelope."""
    raw = fields.get(b"message")
    if raw is None:
        names = ", ".join(sorted(k.decode("utf-8", "replace") for k in fields)) or "none"
        raise DecodeError(f"entry has no 'message' field (fields: {names})", reason="no_message")
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise DecodeError(
            f"envelope is {len(raw)} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit",
            reason="too_large",
        )
    try:
        doc = _loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"message is not JSON: {_short(exc)}", reason="bad_json") from None
    except RecursionError:
        raise DecodeError("message nests too deeply", reason="bad_json") from None
    if not isinstance(doc, dict):
        raise DecodeError("message is not a JSON object", reason="bad_envelope")

    payload = doc.get("payload")
    if isinstance(payload, str):
        try:
            payload = _loads(payload)
        except ValueError as exc:
            raise DecodeError(
                f"payload string is not JSON: {_short(exc)}", reason="bad_payload"
            ) from None
        except RecursionError:
            raise DecodeError("payload nests too deeply", reason="bad_payload") from None
    if not isinstance(payload, dict):
        raise DecodeError("payload is missing or not a JSON object", reason="bad_payload")

    kind = doc.get("type")
    retry_count = doc.get("retry_count")
    last_error = doc.get("last_error")
    stamp = doc.get("timestamp")
    return Envelope(
        type=kind if isinstance(kind, str) else None,
        payload=payload,
        timestamp=_lenient_timestamp(stamp),
        retry_count=retry_count if _is_int(retry_count) else None,
        last_error=last_error if isinstance(last_error, str) else None,
    )


def parse_timestamp(value: object, field: str) -> dt.datetime:
    """Parse RFC 3339 with up to 9 fractional digits into an aware UTC datetime.

    PostgreSQL keeps microseconds, so digits past the sixth are truncated.
    """
    if not isinstance(value, str):
        raise DecodeError(f"{field}: expected an RFC 3339 string", reason="bad_timestamp")
    m = _RFC3339.match(value)
    if m is None:
        raise DecodeError(f"{field}: not an RFC 3339 timestamp", reason="bad_timestamp")
    year, month, day, hour, minute, second, frac, zone = m.groups()
    micros = int((frac or "0")[:6].ljust(6, "0"))
    try:
        if zone in ("Z", "z"):
            tz = dt.UTC
        else:
            sign = 1 if zone[0] == "+" else -1
            offset = dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            tz = dt.timezone(sign * offset)
        stamp = dt.datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tzinfo=tz
        )
        return stamp.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise DecodeError(f"{field}: not a valid date/time", reason="bad_timestamp") from None


def _lenient_timestamp(value: object) -> dt.datetime | None:
    try:
        return parse_timestamp(value, "timestamp")
    except DecodeError:
        return None


def _decode_audit_event(p: dict[str, Any]) -> Record:
    event_id = _uuid(p, "event_id", required=True)
    stamp = parse_timestamp(_required(p, "event_timestamp"), "event_timestamp")
    event_date = stamp.date()
    retention = _int(p, "retention_days", required=True)
    if retention is not None and retention <= 0:
        raise DecodeError("retention_days: must be > 0", reason="bad_value")
    values: dict[str, Any] = {
        "event_id": event_id,
        "event_version": _str(p, "version") or "1.0",
        "event_timestamp": stamp,
        "event_date": event_date,
        "event_type": _str(p, "event_type", required=True),
        "event_category": _str(p, "event_category", required=True),
        "event_action": _str(p, "event_action", required=True),
        "event_outcome": _str(p, "event_outcome", required=True),
        "actor_type": _str(p, "actor_type", required=True),
        "actor_id": _str(p, "actor_id", required=True),
        "actor_ip": _str(p, "actor_ip"),
        "resource_type": _str(p, "resource_type", required=True),
        "resource_id": _str(p, "resource_id", required=True),
        "resource_name": _str(p, "resource_name"),
        "correlation_id": _str(p, "correlation_id", required=True),
        "parent_event_id": _uuid(p, "parent_event_id"),
        "parent_event_date": _date(p, "parent_event_date"),
        "trace_id": _str(p, "trace_id"),
        "span_id": _str(p, "span_id"),
        "namespace": _str(p, "namespace"),
        "cluster_id": _str(p, "cluster_id"),
        "event_data": _json_object(p, "event_data", required=True),
        "event_metadata": _json_object(p, "event_metadata"),
        "severity": _str(p, "severity"),
        "duration_ms": _int(p, "duration_ms"),
        "error_code": _str(p, "error_code"),
        "error_message": _str(p, "error_message"),
        "retention_days": retention,
        "is_sensitive": _bool(p, "is_sensitive") or False,
    }
    return Record(
        table=AUDIT_EVENTS,
        key=(event_id, event_date),
        values=values,
        correlation_id=values["correlation_id"],
        sensitive=values["is_sensitive"],
    )


def _decode_notification(p: dict[str, Any]) -> Record:
    channel = _str(p, "channel", required=True)
    if channel not in CHANNELS:
        raise DecodeError(f"channel: not one of {sorted(CHANNELS)}", reason="bad_value")
    status = _str(p, "status", required=True)
    if status not in STATUSES:
        raise DecodeError(f"status: not one of {sorted(STATUSES)}", reason="bad_value")
    notification_id = _str(p, "notification_id", required=True)
    if not notification_id:
        raise DecodeError("notification_id: must not be empty", reason="missing_field")
    values: dict[str, Any] = {
        "remediation_id": _str(p, "remediation_id", required=True),
        "notification_id": notification_id,
        "recipient": _str(p, "recipient", required=True),
        "channel": channel,
        "message_summary": _str(p, "message_summary", required=True),
        "status": status,
        "sent_at": parse_timestamp(_required(p, "sent_at"), "sent_at"),
        "delivery_status": _str(p, "delivery_status"),
        "error_message": _str(p, "error_message"),
        "escalation_level": _int(p, "escalation_level") or 0,
    }
    return Record(table=NOTIFICATION_AUDIT, key=(notification_id,), values=values)


_DECODERS: dict[str, Callable[[dict[str, Any]], Record]] = {
    AUDIT_EVENTS: _decode_audit_event,
    NOTIFICATION_AUDIT: _decode_notification,
}

#: The tables a stream can be routed to.
TABLES = frozenset(_DECODERS)


# -- field helpers: each names the field and the problem, never the value of a payload --


def _required(p: Mapping[str, Any], name: str) -> Any:
    value = p.get(name)
    if value is None:
        raise DecodeError(f"{name}: required field is missing", reason="missing_field")
    return value


def _str(p: Mapping[str, Any], name: str, *, required: bool = False) -> Any:
    value = _required(p, name) if required else p.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError(f"{name}: expected a string", reason="bad_type")
    if "\x00" in value:
        raise DecodeError(f"{name}: contains a NUL character", reason="bad_value")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DecodeError(f"{name}: not valid Unicode (lone surrogate)", reason="bad_value") \
            from None
    return value


def _int(p: Mapping[str, Any], name: str, *, required: bool = False) -> Any:
    value = _required(p, name) if required else p.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise DecodeError(f"{name}: expected an integer", reason="bad_type")
    if not -(2**31) <= value < 2**31:
        raise DecodeError(f"{name}: integer out of range", reason="bad_value")
    return value


def _bool(p: Mapping[str, Any], name: str) -> Any:
    value = p.get(name)
    if value is not None and not isinstance(value, bool):
        raise DecodeError(f"{name}: expected true or false", reason="bad_type")
    return value


def _uuid(p: Mapping[str, Any], name: str, *, required: bool = False) -> Any:
    value = _str(p, name, required=required)
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise DecodeError(f"{name}: not a UUID", reason="bad_uuid") from None


def _date(p: Mapping[str, Any], name: str) -> dt.date | None:
    value = _str(p, name)
    if value is None:
        return None
    m = _DATE.match(value)
    if m is None:
        return parse_timestamp(value, name).date()
    try:
        return dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        raise DecodeError(f"{name}: not a valid date", reason="bad_timestamp") from None


def _json_object(p: Mapping[str, Any], name: str, *, required: bool = False) -> Any:
    """Base64 of JSON bytes (what the producer writes), or a plain JSON object."""
    value = _required(p, name) if required else p.get(name)
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise DecodeError(f"{name}: expected base64 JSON or an object", reason="bad_type")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError(f"{name}: not valid base64", reason="bad_base64") from None
    try:
        doc = _loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DecodeError(f"{name}: base64 does not hold JSON", reason="bad_json") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"{name}: JSON is not an object", reason="bad_json")
    return doc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120]

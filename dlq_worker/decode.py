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
from decimal import Decimal
from typing import Any

import orjson

from dlq_worker.errors import DecodeError

#: A whole envelope above this size is invalid (producer-side limit in the contract).
MAX_ENVELOPE_BYTES = 1024 * 1024

AUDIT_EVENTS = "audit_events"
NOTIFICATION_AUDIT = "notification_audit"

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"([Zz]|[+-]\d{2}:\d{2})$"
)
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_NUL_ESCAPE = re.compile(rb"\\u0000")

#: orjson parses an integer beyond 64 bits as a float; any float this large may be one.
_BIG = float(2**63)
_SMALLEST_NORMAL = 2.2250738585072014e-308


#: PostgreSQL's numeric (what jsonb stores numbers as) holds up to 131072 digits before
#: the point and 16383 after it; beyond that every insert fails, so such entries are
#: parked at once instead of after max_deliveries.
_NUMERIC_MAX_EXPONENT = 131071
_NUMERIC_MIN_EXPONENT = -16383


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _loads(raw: bytes | str) -> Any:
    """orjson (several times faster), unless the document holds a number it may have
    rounded or cannot hold as a double: audit data must keep every digit, and jsonb
    stores numbers of any size. That slower path parses exactly (``Decimal``), and its
    result is checked for what PostgreSQL refuses everywhere (NUL, lone surrogates,
    numbers beyond numeric)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "infinity" not in str(exc):
            raise
        return _loads_exact(raw)
    if _maybe_rounded(doc):
        return _loads_exact(raw)
    return doc


def _loads_exact(raw: bytes | str) -> Any:
    doc = json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
    check_pg_safe(doc, "document")
    return doc


def _maybe_rounded(value: Any) -> bool:
    """A float orjson may have rounded: an integer beyond 64 bits, a value with as many
    significant digits as a double holds (the text may have had more), or zero and
    subnormals (the text may have been 1e-400). Floats are rare in audit data."""
    kind = type(value)
    if kind is float:
        magnitude = abs(value)
        if magnitude >= _BIG or magnitude < _SMALLEST_NORMAL:
            return True
        mantissa = repr(magnitude).split("e")[0].replace(".", "").strip("0")
        return len(mantissa) >= 16
    if kind is dict:
        return any(_maybe_rounded(v) for v in value.values())
    if kind is list:
        return any(_maybe_rounded(v) for v in value)
    return False


def check_pg_safe(value: Any, name: str) -> None:
    """Raise DecodeError for what PostgreSQL refuses in any text or jsonb, at any depth:
    NUL characters, lone surrogates, numbers beyond numeric's range."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is str:
            _check_text(item, name)
        elif kind is Decimal and not (
            item.is_finite()
            and _NUMERIC_MIN_EXPONENT <= item.adjusted() <= _NUMERIC_MAX_EXPONENT
        ):
            raise DecodeError(f"{name}: holds a number PostgreSQL cannot store",
                              reason="number_out_of_range")


def _check_text(value: str, name: str) -> None:
    if "\x00" in value:
        raise DecodeError(f"{name}: contains a NUL character", reason="nul_character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DecodeError(f"{name}: not valid Unicode (lone surrogate)",
                          reason="bad_unicode") from None


def dumps_exact(value: Any) -> str:
    """JSON text for a decoded jsonb value, every digit kept (``Decimal`` included)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # Decimal, or an integer beyond 64 bits
        return _dumps_slow(value)


def _dumps_slow(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _dumps_slow(v)
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps_slow(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


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
        shown = sorted(k.decode("utf-8", "replace")[:40] for k in list(fields)[:10])
        more = f" and {len(fields) - 10} more" if len(fields) > 10 else ""
        names = ", ".join(shown) + more if shown else "none"
        raise DecodeError(f"entry has no 'message' field (fields: {names})", reason="no_message")
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise DecodeError(
            f"envelope is {len(raw)} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit",
            reason="too_large",
        )
    try:
        doc = _loads(raw)
    except DecodeError:
        raise
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
        except DecodeError:
            raise
        except ValueError as exc:
            raise DecodeError(
                f"payload string is not JSON: {_short(exc)}", reason="bad_payload"
            ) from None
        except RecursionError:
            raise DecodeError("payload nests too deeply", reason="bad_payload") from None
    if not isinstance(payload, dict):
        raise DecodeError("payload is missing or not a JSON object", reason="bad_payload")
    # A NUL can only be in JSON text as an escape; without one, no value holds it.
    if _NUL_ESCAPE.search(raw):
        check_pg_safe(payload, "payload")

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
    # Value rules (ranges, lengths, enum lists) are the schema's: PostgreSQL decides them,
    # so a migration that widens one never gets valid records parked by a stale copy here.
    retention = _int(p, "retention_days", required=True)
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
    channel = _str(p, "channel", required=True)  # allowed values: the table's CHECK decides
    status = _str(p, "status", required=True)
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
    _check_text(value, name)
    return value


def _int(p: Mapping[str, Any], name: str, *, required: bool = False) -> Any:
    value = _required(p, name) if required else p.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise DecodeError(f"{name}: expected an integer", reason="bad_type")
    return value  # its range is the column's: PostgreSQL decides


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
    except DecodeError as exc:
        raise DecodeError(f"{name}: {exc}", reason=exc.reason) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DecodeError(f"{name}: base64 does not hold JSON", reason="bad_json") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"{name}: JSON is not an object", reason="bad_json")
    if _NUL_ESCAPE.search(raw):
        check_pg_safe(doc, name)
    return doc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120]

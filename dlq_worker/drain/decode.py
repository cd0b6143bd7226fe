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
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec
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
#: The producers' own form of it, in UTC (the common case, parsed in C).
_RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?Z\Z")
_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")

#: PostgreSQL's numeric (what jsonb stores numbers as) holds up to 131072 digits before
#: the point and 16383 after it; beyond that every insert fails, so such entries are
#: parked at once instead of after max_deliveries.
_NUMERIC_MAX_EXPONENT = 131071
_NUMERIC_MIN_EXPONENT = -16383


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _loads(raw: bytes | str, *, exact: bool = False) -> Any:
    """orjson (several times faster), unless asked for ``exact`` or the document holds a
    number beyond a double: that slower path parses every digit (``Decimal``), and its
    result is checked for what PostgreSQL refuses everywhere (NUL, lone surrogates,
    numbers beyond numeric). orjson itself refuses lone surrogates and invalid UTF-8;
    a NUL can only come as an escape, which the callers look for.

    orjson's floats are rounded to a double, which is harmless where the producer's text
    is what PostgreSQL receives (base64 event_data: see ``Jsonb``); a plain object is
    re-serialized, so the caller asks again with ``exact`` if ``holds_float`` says so."""
    if exact:
        return _loads_exact(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "infinity" not in str(exc):
            raise
        return _loads_exact(raw)


def _loads_exact(raw: bytes | str) -> Any:
    doc = json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
    check_pg_safe(doc, "document")
    return doc


def holds_float(value: Any) -> bool:
    """Whether orjson gave any float: its value may be rounded (a double keeps about 16
    digits, the text may have had 30; an integer beyond 64 bits comes as a float too), and
    nothing in the float tells. Floats are rare in audit data."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is float:
            return True
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
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


class Jsonb:
    """A jsonb value: the JSON text PostgreSQL is sent (the producer's own, when it was
    valid as it came: PostgreSQL parses every digit itself, nothing is re-serialized) and
    the parsed value (for the hash chain and the tests). Equal to its parsed value."""

    __slots__ = ("text", "value")

    def __init__(self, text: str, value: Any) -> None:
        self.text = text
        self.value = value

    def __eq__(self, other: object) -> bool:
        return bool(self.value == (other.value if isinstance(other, Jsonb) else other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Jsonb({self.text[:60]!r})"


def dumps_exact(value: Any) -> str:
    """JSON text for a decoded jsonb value, every digit kept (``Decimal`` included)."""
    if type(value) is Jsonb:
        return value.text
    try:
        return orjson.dumps(value, default=_fragment).decode()
    except TypeError:  # Decimal, or an integer beyond 64 bits
        return _dumps_slow(value)


def _fragment(value: Any) -> Any:
    """orjson's hook: a Jsonb inside a document is its text, as it is."""
    if type(value) is Jsonb:
        return orjson.Fragment(value.text)
    raise TypeError


def _dumps_slow(value: Any) -> str:
    if type(value) is Jsonb:
        return value.text
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
    #: For an audit event, the bytes its hash chain link hashes (after the previous
    #: hash), when they could be made without the database (see ``chain.with_hashed``).
    hashed: bytes | None = field(default=None, compare=False, repr=False)


def decode_entry(table: str, fields: Mapping[bytes, bytes]) -> Record:
    """Decode a raw stream entry routed to ``table`` into a Record.

    Raises DecodeError for anything that does not follow the contract.
    """
    if table == AUDIT_EVENTS:
        record = _audit_event_at_once(fields.get(b"message"))
        if record is not None:
            return record
    _, payload = _parse(fields)
    try:
        decoder = _DECODERS[table]
    except KeyError:
        raise DecodeError(f"no decoder for table {table!r}", reason="unknown_table") from None
    return decoder(payload)


def decode_envelope(fields: Mapping[bytes, bytes]) -> Envelope:
    """Parse the ``message`` field of an entry into an Envelope."""
    doc, payload = _parse(fields)
    kind = doc.get("type")
    retry_count = doc.get("retry_count")
    last_error = doc.get("last_error")
    return Envelope(
        type=kind if isinstance(kind, str) else None,
        payload=payload,
        timestamp=_lenient_timestamp(doc.get("timestamp")),
        retry_count=retry_count if _is_int(retry_count) else None,
        last_error=last_error if isinstance(last_error, str) else None,
    )


def _parse(fields: Mapping[bytes, bytes], *, exact: bool = False,
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The envelope document and its payload, checked once for what PostgreSQL refuses in
    any text: the record's strings need no check of their own afterwards. Parsed again
    ``exact`` when event_data or event_metadata is a plain object holding a float, which
    orjson may have rounded (that object is re-serialized: base64 ones go as they came)."""
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
        doc = _loads(raw, exact=exact)
    except DecodeError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"message is not JSON: {_short(exc)}", reason="bad_json") from None
    except RecursionError:
        raise DecodeError("message nests too deeply", reason="bad_json") from None
    if type(doc) is not dict:
        raise DecodeError("message is not a JSON object", reason="bad_envelope")
    payload = doc.get("payload")
    payload_text = payload if isinstance(payload, str) else None
    if payload_text is not None:
        try:
            payload = _loads(payload_text, exact=exact)
        except DecodeError:
            raise
        except ValueError as exc:
            raise DecodeError(
                f"payload string is not JSON: {_short(exc)}", reason="bad_payload"
            ) from None
        except RecursionError:
            raise DecodeError("payload nests too deeply", reason="bad_payload") from None
    if type(payload) is not dict:
        raise DecodeError("payload is missing or not a JSON object", reason="bad_payload")
    # A NUL can only be in JSON text as an escape; without one in the text parsed at each
    # level (the envelope, and a payload sent as a JSON string, whose own escapes may be
    # escaped in the envelope: \u005cu0000), no value holds it.
    if b"\\u0000" in raw or (payload_text is not None and "\\u0000" in payload_text):
        check_pg_safe(payload, "payload")
    if not exact:
        data, metadata = payload.get("event_data"), payload.get("event_metadata")
        if ((type(data) is dict and holds_float(data))
                or (type(metadata) is dict and holds_float(metadata))):
            return _parse(fields, exact=True)
    return doc, payload


def parse_timestamp(value: object, field: str) -> dt.datetime:
    """Parse RFC 3339 with up to 9 fractional digits into an aware UTC datetime.

    PostgreSQL keeps microseconds, so digits past the sixth are truncated.
    """
    if type(value) is str and _RFC3339_UTC.match(value):
        # The producers' own form (Go's RFC3339Nano, UTC): parsed in C, digits past the
        # sixth dropped as below; anything it refuses takes the general path below.
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            pass
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


#: audit_events text columns, in the row's column order after event_outcome.
_AUDIT_REQUIRED = ("event_type", "event_category", "event_action", "event_outcome",
                   "actor_type", "actor_id", "resource_type", "resource_id", "correlation_id")
_AUDIT_OPTIONAL = ("actor_ip", "resource_name", "trace_id", "span_id", "namespace",
                   "cluster_id", "severity", "error_code", "error_message")


def _decode_audit_event(p: dict[str, Any]) -> Record:
    # Value rules (ranges, lengths, enum lists) are the schema's: PostgreSQL decides them,
    # so a migration that widens one never gets valid records parked by a stale copy here.
    # Strings were checked for NUL and lone surrogates with the whole payload (_parse).
    event_id = _uuid(p, "event_id", required=True)
    stamp = parse_timestamp(_required(p, "event_timestamp"), "event_timestamp")
    event_date = stamp.date()
    values: dict[str, Any] = {
        "event_id": event_id,
        "event_version": _str(p, "version") or "1.0",
        "event_timestamp": stamp,
        "event_date": event_date,
    }
    for name in _AUDIT_REQUIRED:
        value = p.get(name)
        if type(value) is not str:
            _str(p, name, required=True)  # raises the right error
        values[name] = value
    for name in _AUDIT_OPTIONAL:
        value = p.get(name)
        if value is not None and type(value) is not str:
            _str(p, name)
        values[name] = value
    values["parent_event_id"] = _uuid(p, "parent_event_id")
    values["parent_event_date"] = _date(p, "parent_event_date")
    values["event_data"] = _json_object(p, "event_data", required=True)
    values["event_metadata"] = _json_object(p, "event_metadata")
    values["duration_ms"] = _int(p, "duration_ms")
    values["retention_days"] = _int(p, "retention_days", required=True)
    values["is_sensitive"] = _bool(p, "is_sensitive") or False
    return Record(
        table=AUDIT_EVENTS,
        key=(event_id, event_date),
        values=values,
        correlation_id=values["correlation_id"],
        sensitive=values["is_sensitive"],
    )


class _AuditPayload(msgspec.Struct):
    """An audit event as producers write it, every field of the expected type (see
    ``_audit_event_at_once``); fields it does not name are ignored, as below."""

    event_id: str
    event_timestamp: str
    event_type: str
    event_category: str
    event_action: str
    event_outcome: str
    actor_type: str
    actor_id: str
    resource_type: str
    resource_id: str
    correlation_id: str
    event_data: bytes  # base64 in the JSON: msgspec decodes it (never more leniently)
    retention_days: int
    version: str | None = None
    actor_ip: str | None = None
    resource_name: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    namespace: str | None = None
    cluster_id: str | None = None
    severity: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    parent_event_id: str | None = None
    parent_event_date: str | None = None
    event_metadata: bytes | None = None
    duration_ms: int | None = None
    is_sensitive: bool | None = None


class _AuditEnvelope(msgspec.Struct):
    payload: _AuditPayload


_AUDIT_ENVELOPE = msgspec.json.Decoder(_AuditEnvelope)
_INT64 = range(-(2**63), 2**63)


def _audit_event_at_once(raw: bytes | None) -> Record | None:
    """The audit event of an envelope decoded and type-checked in one pass (msgspec, in
    C), for the envelopes producers write: ASCII, no ``\\u`` escape (so no NUL, no lone
    surrogate, nothing for the UTF-8 checks to find), the payload an object, event_data
    and event_metadata base64, integers within 64 bits. None for anything else, and for
    any doubt on the way: ``_decode_audit_event`` then decides, with its reasons. Both
    give the same Record for what this takes (the tests hold them to it). The one
    difference is in fields the record does not have, which both ignore: a number there
    beyond PostgreSQL's numeric, or of over 4,300 digits, makes the field-by-field decoder
    refuse the envelope; this one writes the record, complete without it."""
    if (type(raw) is not bytes or len(raw) > MAX_ENVELOPE_BYTES or not raw.isascii()
            or b"\\u" in raw):
        return None
    try:
        p = _AUDIT_ENVELOPE.decode(raw).payload
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None  # (msgspec nests by recursion: a deep value in a field it skips)
    event_id = p.event_id
    if not _UUID.match(event_id) or p.retention_days not in _INT64 or (
            p.duration_ms is not None and p.duration_ms not in _INT64):
        return None
    data = _jsonb_at_once(p.event_data)
    metadata = None if p.event_metadata is None else _jsonb_at_once(p.event_metadata)
    if data is None or (metadata is None and p.event_metadata is not None):
        return None
    try:
        stamp = parse_timestamp(p.event_timestamp, "event_timestamp")
        parent_date = None if p.parent_event_date is None else _date(
            {"d": p.parent_event_date}, "d")
    except DecodeError:
        return None
    parent_id = p.parent_event_id
    if parent_id is not None:
        if not _UUID.match(parent_id):
            return None
        parent_id = parent_id.lower()
    event_id = event_id.lower()
    event_date = stamp.date()
    sensitive = p.is_sensitive or False
    values: dict[str, Any] = {
        "event_id": event_id, "event_version": p.version or "1.0",
        "event_timestamp": stamp, "event_date": event_date,
        "event_type": p.event_type, "event_category": p.event_category,
        "event_action": p.event_action, "event_outcome": p.event_outcome,
        "actor_type": p.actor_type, "actor_id": p.actor_id,
        "resource_type": p.resource_type, "resource_id": p.resource_id,
        "correlation_id": p.correlation_id,
        "actor_ip": p.actor_ip, "resource_name": p.resource_name, "trace_id": p.trace_id,
        "span_id": p.span_id, "namespace": p.namespace, "cluster_id": p.cluster_id,
        "severity": p.severity, "error_code": p.error_code, "error_message": p.error_message,
        "parent_event_id": parent_id, "parent_event_date": parent_date,
        "event_data": data, "event_metadata": metadata,
        "duration_ms": p.duration_ms, "retention_days": p.retention_days,
        "is_sensitive": sensitive,
    }
    return Record(table=AUDIT_EVENTS, key=(event_id, event_date), values=values,
                  correlation_id=p.correlation_id, sensitive=sensitive)


def _jsonb_at_once(raw: bytes) -> Jsonb | None:
    """``_json_object`` for base64 already decoded: a JSON object with no escape of NUL
    and no number beyond a double, else None (``_json_object`` then says why)."""
    if b"\\u0000" in raw:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return Jsonb(raw.decode(), doc) if type(doc) is dict else None


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
    return value


def _int(p: Mapping[str, Any], name: str, *, required: bool = False) -> Any:
    value = _required(p, name) if required else p.get(name)
    if value is None:
        return None
    if _integral(value):
        value = int(value)
    if not _is_int(value):
        raise DecodeError(f"{name}: expected an integer", reason="bad_type")
    return value  # its range is the column's: PostgreSQL decides


def _bool(p: Mapping[str, Any], name: str) -> Any:
    value = p.get(name)
    if value is not None and not isinstance(value, bool):
        raise DecodeError(f"{name}: expected true or false", reason="bad_type")
    return value


def _uuid(p: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    """The canonical text (lower case, hyphenated), as PostgreSQL prints a uuid."""
    value = _str(p, name, required=required)
    if value is None:
        return None
    if _UUID.match(value):
        return str(value).lower()
    try:
        return str(uuid.UUID(value))
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


def _json_object(p: Mapping[str, Any], name: str, *, required: bool = False) -> Jsonb | None:
    """Base64 of JSON bytes (what the producer writes), or a plain JSON object."""
    value = _required(p, name) if required else p.get(name)
    if value is None:
        return None
    if isinstance(value, dict):
        return Jsonb(dumps_exact(value), value)
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
    if type(doc) is not dict:
        raise DecodeError(f"{name}: JSON is not an object", reason="bad_json")
    if b"\\u0000" in raw:
        check_pg_safe(doc, name)
    # The producer's own text goes to PostgreSQL: valid JSON (just parsed), valid UTF-8
    # (orjson and the exact parser both refuse anything else), every digit as written,
    # however orjson rounded its copy of a number.
    return Jsonb(raw.decode(), doc)


def _integral(value: object) -> bool:
    """A float or Decimal (the exact parser's) holding a whole number; a Decimal only up to
    a bigint's size (1e5000 is no integer column's value, and no 5,000-digit int is made)."""
    if isinstance(value, float):
        return value.is_integer()
    return (isinstance(value, Decimal) and value.is_finite()
            and value == value.to_integral_value() and value.adjusted() < 19)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:120]

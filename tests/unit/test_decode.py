"""The decoder: the producers' exact wire format in, a row or a clear permanent error out."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import random
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlq_worker import producer
from dlq_worker.drain import decode as decode_mod
from dlq_worker.drain.decode import (
    AUDIT_EVENTS,
    MAX_ENVELOPE_BYTES,
    NOTIFICATION_AUDIT,
    Record,
    decode_entry,
    dumps_exact,
    parse_timestamp,
)
from dlq_worker.errors import DecodeError, PermanentError
from dlq_worker.throwaway import samples

CONTRACT_EXAMPLE = samples.contract_example()


def entry(message: bytes) -> dict[bytes, bytes]:
    return {b"message": message}


def test_contract_example() -> None:
    record = decode_entry(AUDIT_EVENTS, entry(CONTRACT_EXAMPLE))
    v = record.values
    assert v["event_id"] == "3f1c2b9e-7a4d-4c1e-9b2a-5d6e7f801234"  # as PostgreSQL prints it
    assert v["event_version"] == "1.0"
    assert v["event_timestamp"] == dt.datetime(2026, 8, 22, 18, 8, 55, 412345, tzinfo=dt.UTC)
    assert v["event_date"] == dt.date(2026, 8, 22)
    assert v["event_data"] == {"namespace": "default", "signal_name": "HighCPU"}
    assert v["duration_ms"] == 12 and v["retention_days"] == 2555 and v["is_sensitive"] is False
    assert v["actor_ip"] is None and v["event_metadata"] is None
    assert record.key == (v["event_id"], v["event_date"])
    assert record.correlation_id == "rr-2026-001"


def test_event_date_is_the_utc_date() -> None:
    record = samples.audit_event(random.Random(1))
    record["event_timestamp"] = "2026-08-31T23:30:00-02:00"  # already 1 September in UTC
    out = decode_entry(AUDIT_EVENTS, entry(producer.build_message(producer.AUDIT_EVENT, record)))
    assert out.values["event_date"] == dt.date(2026, 9, 1)


def test_every_optional_field_and_base64_metadata() -> None:
    record = samples.audit_event(random.Random(2), full=True)
    record["parent_event_id"] = str(uuid.uuid4())
    record["parent_event_date"] = "2026-11-01"
    message = producer.build_message(producer.AUDIT_EVENT, record)
    assert isinstance(json.loads(message)["payload"]["event_metadata"], str)  # base64 on wire
    v = decode_entry(AUDIT_EVENTS, entry(message)).values
    assert v["event_metadata"] == record["event_metadata"]
    assert v["parent_event_date"] == dt.date(2026, 11, 1)
    for name in ("actor_ip", "resource_name", "trace_id", "span_id", "cluster_id", "error_code",
                 "error_message"):
        assert v[name] == record[name]


def test_plain_object_event_data_and_payload_as_string() -> None:
    record = samples.audit_event(random.Random(3))
    envelope = {"type": "audit_event", "payload": json.dumps(record)}
    v = decode_entry(AUDIT_EVENTS, entry(json.dumps(envelope).encode())).values
    assert v["event_data"] == record["event_data"]


def test_notification_ignores_producer_zero_values() -> None:
    record = samples.notification(random.Random(4))
    out = decode_entry(NOTIFICATION_AUDIT,
                       entry(producer.build_message(producer.NOTIFICATION, record)))
    assert "id" not in out.values and "created_at" not in out.values
    assert out.key == (record["notification_id"],)
    assert out.values["sent_at"].tzinfo is not None


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-08-22T18:08:56.123456789Z", dt.datetime(2026, 8, 22, 18, 8, 56, 123456, tzinfo=dt.UTC)),
    ("2026-08-22T18:08:56Z", dt.datetime(2026, 8, 22, 18, 8, 56, tzinfo=dt.UTC)),
    ("2026-08-22T18:08:56.1+02:00", dt.datetime(2026, 8, 22, 16, 8, 56, 100000, tzinfo=dt.UTC)),
    ("0001-01-01T00:00:00Z", dt.datetime(1, 1, 1, tzinfo=dt.UTC)),
])
def test_go_timestamps(text: str, expected: dt.datetime) -> None:
    assert parse_timestamp(text, "t") == expected


@pytest.mark.parametrize("text", ["2026-08-22", "2026-13-01T00:00:00Z", "yesterday",
                                  "2026-08-22T18:08:56.1234567890Z", "2026-08-22T18:08:56"])
def test_bad_timestamps(text: str) -> None:
    with pytest.raises(DecodeError) as err:
        parse_timestamp(text, "event_timestamp")
    assert err.value.reason == "bad_timestamp"


def _event_with(**changes: Any) -> bytes:
    record = samples.audit_event(random.Random(5))
    for key, value in changes.items():
        if value is _DROP:
            record.pop(key)
        else:
            record[key] = value
    return producer.build_message(producer.AUDIT_EVENT, record)


_DROP = object()


@pytest.mark.parametrize(("fields", "reason"), [
    ({b"msg": b"{}"}, "no_message"),
    ({b"message": b"{not json"}, "bad_json"),
    ({b"message": b"[]"}, "bad_envelope"),
    ({b"message": b'{"type":"audit_event"}'}, "bad_payload"),
    ({b"message": b'{"payload":"[1]"}'}, "bad_payload"),
    ({b"message": b"\xff\xfe"}, "bad_json"),
    ({b"message": _event_with(event_id="nope")}, "bad_uuid"),
    ({b"message": _event_with(event_type=_DROP)}, "missing_field"),
    ({b"message": _event_with(event_data="!!notbase64!!")}, "bad_base64"),
    ({b"message": _event_with(event_data=base64.b64encode(b"[1,2]").decode())}, "bad_json"),
    ({b"message": _event_with(event_timestamp="soon")}, "bad_timestamp"),
    ({b"message": _event_with(retention_days="7")}, "bad_type"),
    ({b"message": _event_with(duration_ms=True)}, "bad_type"),
    ({b"message": _event_with(is_sensitive="no")}, "bad_type"),
    ({b"message": _event_with(actor_id="a\x00b")}, "nul_character"),
    ({b"message": _event_with(event_data=base64.b64encode(b'{"a":{"b":["x\\u0000"]}}')
                              .decode())}, "nul_character"),
    ({b"message": _event_with(event_data={"deep": [{"k\x00": 1}]})}, "nul_character"),
    ({b"message": _event_with(event_data=base64.b64encode(b'{"n":1e999999}').decode())},
     "number_out_of_range"),
    ({b"message": _event_with(event_data=base64.b64encode(b'{"n":NaN}').decode())}, "bad_json"),
    ({b"message": b'{"payload":{}}' + b" " * MAX_ENVELOPE_BYTES}, "too_large"),
])
def test_malformed_entries_name_their_reason(fields: dict[bytes, bytes], reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_entry(AUDIT_EVENTS, fields)
    assert err.value.reason == reason


def test_value_rules_of_the_schema_are_left_to_postgresql() -> None:
    # Given values the platform's schema refuses today (its CHECK lists, ranges), which a
    # migration may allow tomorrow
    record = samples.notification(random.Random(6))
    record["channel"] = "fax"
    note = decode_entry(NOTIFICATION_AUDIT,
                        entry(producer.build_message(producer.NOTIFICATION, record)))
    event = decode_entry(AUDIT_EVENTS, {b"message": _event_with(retention_days=0,
                                                               duration_ms=2**40)})
    # Then the decoder passes them on: PostgreSQL is the authority on values
    assert note.values["channel"] == "fax"
    assert (event.values["retention_days"], event.values["duration_ms"]) == (0, 2**40)


def test_numbers_a_double_cannot_hold_keep_every_digit() -> None:
    # Given event_data with a number beyond a double and one with more digits than it keeps
    raw = b'{"big":1e400,"int":123456789012345678901234567890,"nested":[0.5]}'
    v = decode_entry(AUDIT_EVENTS, {b"message": _event_with(
        event_data=base64.b64encode(raw).decode())}).values
    # Then they reach PostgreSQL as written, not as infinity or a rounded float
    assert dumps_exact(v["event_data"]) == raw.decode()
    assert v["event_data"].value["big"] == Decimal("1e400")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["", "-"]), st.text("0123456789", min_size=1,
                                                               max_size=24),
                          st.text("0123456789", max_size=24),
                          st.one_of(st.none(), st.integers(-400, 400))),
                min_size=1, max_size=4), st.booleans())
def test_every_number_reaches_postgresql_as_written(
        parts: list[tuple[str, str, str, int | None]], as_base64: bool) -> None:
    # Given event_data with numbers of any length and exponent, beside strings that only
    # look numeric, sent as base64 (what producers write) or as a plain object
    numbers = [f"{sign}{whole.lstrip('0') or '0'}{'.' + frac if frac else ''}"
               f"{'' if exp is None else f'e{exp}'}" for sign, whole, frac, exp in parts]
    raw = '{"n":[' + ",".join(numbers) + '],"s":"x:12345678901234567,1e5","m":' + numbers[0] + "}"
    if any(not -16383 <= Decimal(n).adjusted() <= 131071 for n in numbers if Decimal(n)):
        return  # beyond numeric: parked, tested elsewhere
    event_data: Any = base64.b64encode(raw.encode()).decode() if as_base64 else "@"
    message = _event_with(event_data=event_data)
    if not as_base64:
        message = message.replace(b'"@"', raw.encode())
    # When decoded into the text PostgreSQL is sent
    sent = dumps_exact(decode_entry(AUDIT_EVENTS, {b"message": message}).values["event_data"])
    # Then no number was rounded: each equals its text, exactly
    doc = json.loads(sent, parse_float=Decimal)
    for text_, value in zip([*numbers, numbers[0]], [*doc["n"], doc["m"]], strict=True):
        assert Decimal(value) == Decimal(text_), text_


def test_error_messages_never_carry_payload_values() -> None:
    secret = "s3cr3t-token-value"
    with pytest.raises(DecodeError) as err:
        decode_entry(AUDIT_EVENTS, entry(_event_with(event_id=secret)))
    assert secret not in str(err.value)


# -- properties: arbitrary input never crashes the decoder --

def _outcome(fields: dict[bytes, bytes]) -> Record | PermanentError:
    try:
        return decode_entry(AUDIT_EVENTS, fields)
    except PermanentError as exc:
        return exc


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_yield_a_permanent_error(raw: bytes) -> None:
    assert isinstance(_outcome({b"message": raw}), PermanentError | Record)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=4),
                     st.dictionaries(st.text(max_size=8), children, max_size=4))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    _containers,
    max_leaves=20,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(sorted(samples.audit_event(random.Random(0)))), value=_json,
       drop=st.booleans())
def test_mutated_valid_envelopes_yield_a_row_or_a_permanent_error(field: str, value: Any,
                                                                  drop: bool) -> None:
    record = samples.audit_event(random.Random(9))
    if drop:
        record.pop(field)
    else:
        record[field] = value
    result = _outcome({b"message": producer.build_message(producer.AUDIT_EVENT, record)})
    assert isinstance(result, Record | PermanentError)
    if isinstance(result, Record):
        assert result.values["event_id"] is not None and result.values["event_data"] is not None


@settings(max_examples=200)
@given(st.dictionaries(st.text(max_size=10), _json, max_size=6))
def test_arbitrary_notification_payloads(payload: dict[str, Any]) -> None:
    message = json.dumps({"type": "notification_audit", "payload": payload}).encode()
    with contextlib.suppress(PermanentError):
        decode_entry(NOTIFICATION_AUDIT, {b"message": message})


@pytest.mark.parametrize(("message", "reason"), [
    (b'{"payload":' + b"[" * 100000 + b"]" * 100000 + b"}", "bad_json"),
    (_event_with(event_timestamp="2026-08-22T18:08:56+24:00"), "bad_timestamp"),
    (_event_with(event_timestamp="0001-01-01T00:00:00+01:00"), "bad_timestamp"),
    (_event_with(actor_id="\ud800"), "bad_json"),  # a lone surrogate is not valid JSON text
    (_event_with(event_data=base64.b64encode(b"[" * 100000).decode()), "bad_json"),
])
def test_inputs_that_once_escaped_the_decoder(message: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_entry(AUDIT_EVENTS, entry(message))
    assert err.value.reason == reason


def test_envelope_timestamp_out_of_range_is_ignored_not_fatal() -> None:
    doc = json.loads(CONTRACT_EXAMPLE)
    doc["timestamp"] = "2026-08-22T18:08:56+25:00"
    assert decode_entry(AUDIT_EVENTS, entry(json.dumps(doc).encode())).key


def test_a_nul_escaped_twice_in_a_payload_sent_as_a_string_is_caught() -> None:
    # Given a payload sent as a JSON string whose own NUL escape has its backslash escaped
    # as \u005c in the envelope (so the envelope's text shows no \u0000 at all)
    record = samples.audit_event(random.Random(9))
    inner = json.dumps({**record, "actor_id": "NUL"}).replace('"NUL"', '"\\u0000"')
    outer = json.dumps({"type": "audit_event", "payload": inner})
    outer = outer.replace("\\\\u0000", "\\u005cu0000")
    assert "\\u0000" not in outer.replace("\\u005cu0000", "")
    # Then it is refused before PostgreSQL, with its reason
    with pytest.raises(DecodeError) as err:
        decode_entry(AUDIT_EVENTS, entry(outer.encode()))
    assert err.value.reason == "nul_character"


def test_an_integer_field_of_five_thousand_digits_is_refused_at_decode() -> None:
    # Given an integer field holding 1e5000 (parsed exactly, as a Decimal)
    message = _event_with(retention_days="@").replace(b'"@"', b"1e5000")
    # Then it is parked as the wrong type at once, never turned into a 5,001-digit int
    with pytest.raises(DecodeError) as err:
        decode_entry(AUDIT_EVENTS, entry(message))
    assert err.value.reason == "bad_type"
    # while an exactly parsed whole number still is one
    exact = _event_with(retention_days="@", event_data={"f": 0.5}).replace(b'"@"', b"2555.0")
    assert decode_entry(AUDIT_EVENTS, entry(exact)).values["retention_days"] == 2555


def test_a_timestamp_followed_by_a_line_break_parses_as_before() -> None:
    assert parse_timestamp("2026-08-22T18:08:55.5Z\n", "t") == dt.datetime(
        2026, 8, 22, 18, 8, 55, 500000, tzinfo=dt.UTC)


# -- the one-pass decoder for producers' usual envelopes, against the field-by-field one --

def _field_by_field(message: bytes) -> Record | str:
    """The general decoder alone (its record, or its error's reason and text)."""
    try:
        return decode_mod._decode_audit_event(decode_mod._parse(entry(message))[1])
    except DecodeError as exc:
        return f"{exc.reason}: {exc}"


def _either(message: bytes) -> Record | str:
    try:
        return decode_entry(AUDIT_EVENTS, entry(message))
    except DecodeError as exc:
        return f"{exc.reason}: {exc}"


def _same(a: Record | str, b: Record | str) -> None:
    assert a == b
    if isinstance(a, Record) and isinstance(b, Record):
        assert list(a.values) == list(b.values)  # the same columns, in the same order
        for name in ("event_data", "event_metadata"):
            x, y = a.values[name], b.values[name]
            assert (x is None and y is None) or x.text == y.text  # the same text to store
        assert {k: type(v) for k, v in a.values.items()} == {
            k: type(v) for k, v in b.values.items()}


#: Values a field may hold instead of its own: wrong types, edge numbers, odd text.
_ODD = st.sampled_from([
    None, "", "x", 0, -1, 1.0, 2.5, 2**63, -(2**63) - 1, 2**64, 10**30, True, False, [], {},
    "not-a-uuid", "6F9619FF-8B86-D011-B42D-00C04FC964FF", "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
    "2026-13-01T00:00:00Z", "2026-01-01", "2026-01-01T00:00:00.123456789Z",
    "2026-01-01T00:00:00+02:00", "2026-01-01 00:00:00Z", "eyJhIjoxfQ==", "eyJhIjoxfQ", "W10=",
    "bnVsbA==", "e30=", "!!", "é", "x<y>&z", "\u2028", "tab\there", "line\nbreak"])
_FIELDS = ["event_id", "event_timestamp", "event_type", "actor_id", "correlation_id",
           "event_data", "event_metadata", "retention_days", "duration_ms", "is_sensitive",
           "version", "parent_event_id", "parent_event_date", "actor_ip", "severity"]


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 2**32), st.booleans(),
       st.dictionaries(st.sampled_from(_FIELDS), _ODD, max_size=3),
       st.lists(st.sampled_from(_FIELDS), max_size=2))
def test_the_one_pass_decoder_gives_what_the_field_by_field_one_gives(
        seed: int, full: bool, changed: dict[str, Any], dropped: list[str]) -> None:
    # Given a producer's audit event, with some fields of other types or values, or gone
    record = samples.audit_event(random.Random(seed), full=full)
    for name in dropped:
        record.pop(name, None)
    message = producer.build_message(producer.AUDIT_EVENT, {**record, **changed})
    # Then both decoders give the same record, or the same error and reason
    _same(_either(message), _field_by_field(message))


@pytest.mark.parametrize("text", [
    b'{"payload":{"event_id":"1","a":1e999}}', b'\xef\xbb\xbf{"payload":{}}',
    b'{"payload":{}}', b'{"payload":"{}"}', b"[]", b"{}", b'{"payload":null}',
    b'{"payload":{"event_data":"e30="},"payload":1}'])
def test_envelopes_that_are_not_the_usual_shape_decide_alike(text: bytes) -> None:
    _same(_either(text), _field_by_field(text))


def test_duplicate_keys_and_unknown_fields_decide_alike() -> None:
    record = samples.audit_event(random.Random(5), full=True)
    message = producer.build_message(producer.AUDIT_EVENT, record)
    # the last of a duplicated key counts (as in JSON parsers generally); unknown fields,
    # however deep or odd, are ignored
    doubled = message.replace(b'"retention_days":2555', b'"retention_days":1,"retention_days":7')
    deeps = [message.replace(b'"payload":{', b'"payload":{"x":' + b"[" * n + b"]" * n + b",")
             for n in (300, 1000, 1100, 3000)]
    for text in (doubled, *deeps):
        assert text != message
        _same(_either(text), _field_by_field(text))
    assert decode_entry(AUDIT_EVENTS, entry(doubled)).values["retention_days"] == 7


def test_usual_envelopes_take_the_one_pass_decoder() -> None:
    # (else its speed is never had: every sample a producer writes qualifies)
    for seed in range(50):
        message = producer.build_message(producer.AUDIT_EVENT, samples.audit_event(
            random.Random(seed), full=seed % 2 == 0))
        assert decode_mod._audit_event_at_once(message) is not None

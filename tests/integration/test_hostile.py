"""Hostile input through a real worker process: nothing stops the drain, nothing vanishes.

Every case is written by hand, in the producers' wire format or deliberately outside it,
mixed into a real backlog with valid neighbours, and drained by `dlq-worker run`. Each
must end as exactly one row or exactly one parked entry with its specific reason; the
valid records around them are written; the worker stays up and ready; nothing is left
pending.
"""

from __future__ import annotations

import base64
import json
import random
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from dlq_worker import config as config_mod
from dlq_worker import producer
from dlq_worker.drain.decode import decode_entry
from dlq_worker.drain.sink import Sink
from dlq_worker.throwaway import samples
from dlq_worker.throwaway.embedded import free_port
from tests.conftest import EVENTS, NOTIFICATIONS, Bed, fast_env, wait_until

DEAD = {EVENTS: "audit:dead-letter:events", NOTIFICATIONS: "audit:dead-letter:notifications"}
ROW = "row"

_rng = random.Random(99)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _event(**changes: Any) -> dict[str, Any]:
    record = samples.audit_event(_rng)
    for key, value in changes.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    return record


def _note(**changes: Any) -> dict[str, Any]:
    record = samples.notification(_rng)
    record.update(changes)
    return record


def _ev_msg(**changes: Any) -> tuple[dict[str, Any], bytes]:
    record = _event(**changes)
    return record, producer.build_message(producer.AUDIT_EVENT, record)


def _note_msg(**changes: Any) -> tuple[dict[str, Any], bytes]:
    record = _note(**changes)
    return record, producer.build_message(producer.NOTIFICATION, record)


def _envelope(payload: Any, **extra: Any) -> bytes:
    return json.dumps({"type": "audit_event", "payload": payload, "retry_count": 0,
                       "timestamp": "2026-08-22T18:08:56.123456789Z", **extra}).encode()


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@dataclass
class Case:
    name: str
    stream: str
    fields: dict[bytes, bytes]
    expect: str  # ROW, or the parked entry's reason
    #: For a ROW: the key that finds it (event_id or notification_id).
    key: str | None = None


def _ev(name: str, expect: str, **changes: Any) -> Case:
    record, message = _ev_msg(**changes)
    return Case(name, EVENTS, {b"message": message}, expect, record.get("event_id"))


def _nt(name: str, expect: str, **changes: Any) -> Case:
    record, message = _note_msg(**changes)
    return Case(name, NOTIFICATIONS, {b"message": message}, expect,
                record.get("notification_id"))


def _raw(name: str, stream: str, message: bytes, expect: str, key: str | None = None) -> Case:
    return Case(name, stream, {b"message": message}, expect, key)


def hostile_cases() -> list[Case]:
    nine = "9" * 20
    plain = _event()
    as_string = _event()
    escaped_ts = _event(event_timestamp="2026-11-15T23:30:00.123456789+05:30")
    many_fields: dict[bytes, bytes] = {f"f{i}".encode(): b"v" * 10 for i in range(5000)}
    extra_fields = _event()
    extra_fields_fields = {b"message": producer.build_message(producer.AUDIT_EVENT,
                                                              extra_fields)}
    extra_fields_fields.update({f"x{i}".encode(): b"1" for i in range(50)})
    return [
        # -- timestamps --
        _ev("year 9999 placeholder", "outside_partition_window",
            event_timestamp="9999-12-31T23:59:59.999999Z"),
        _ev("year 0001", "outside_partition_window", event_timestamp="0001-01-01T00:00:00Z"),
        _ev("month 13", "bad_timestamp", event_timestamp="2026-13-01T00:00:00Z"),
        _ev("February 30", "bad_timestamp", event_timestamp="2026-02-30T10:00:00Z"),
        _ev("epoch number", "bad_timestamp", event_timestamp=1700000000),
        _ev("no zone", "bad_timestamp", event_timestamp="2026-11-01T10:00:00"),
        Case("offset and 9 digits", EVENTS,
             {b"message": producer.build_message(producer.AUDIT_EVENT, escaped_ts)}, ROW,
             escaped_ts["event_id"]),
        # -- identifiers and types --
        _ev("event_id not a UUID", "bad_uuid", event_id="not-a-uuid"),
        _ev("upper-case UUID", ROW, event_id=str(uuid.uuid4()).upper()),
        _ev("retention_days as string", "bad_type", retention_days="7"),
        _ev("duration_ms as bool", "bad_type", duration_ms=True),
        _ev("is_sensitive as string", "bad_type", is_sensitive="yes"),
        _ev("actor_id as object", "bad_type", actor_id={"id": 1}),
        _ev("missing correlation_id", "missing_field", correlation_id=None),
        _ev("unknown fields", ROW, favourite_colour="green", nested={"x": [1, 2]}),
        # -- what PostgreSQL applies everywhere: parked at once --
        _ev("NUL in actor_id", "nul_character", actor_id="svc\x00evil"),
        _ev("NUL deep in base64 event_data", "nul_character",
            event_data=_b64(b'{"a":{"b":[1,{"c":"x\\u0000y"}]}}')),
        _ev("NUL in a key of plain event_data", "nul_character",
            event_data={"deep": [{"k\x00": 1}]}),
        _raw("lone surrogate in actor_id", EVENTS,
             _envelope(dict(_event(), actor_id="\ud800")), "bad_json"),
        _ev("number beyond numeric", "number_out_of_range",
            event_data=_b64(b'{"n":1e999999}')),
        _ev("number beyond a double", ROW, event_data=_b64(b'{"n":1e400,"i":' +
                                                           nine.encode() + b"}")),
        _ev("NaN", "bad_json", event_data=_b64(b'{"n":NaN}')),
        # -- base64 and JSON shapes --
        _ev("base64 of plain text", "bad_json", event_data=_b64(b"hello, world")),
        _ev("base64 of an array", "bad_json", event_data=_b64(b"[1,2,3]")),
        _ev("not base64", "bad_base64", event_data="%%% not base64 %%%"),
        _ev("nested 200 deep", ROW, event_data=_b64(_nested(200))),
        _ev("nested 5000 deep", "bad_json", event_data=_b64(_nested(5000))),
        # -- value rules of the schema: PostgreSQL decides, after max_deliveries --
        _ev("actor_id 300 chars", "value_too_long", actor_id="a" * 300),
        _ev("event_type 101 chars", "value_too_long", event_type="t" * 101),
        _ev("retention_days 0", "check_violation", retention_days=0),
        _ev("duration_ms beyond int", "numeric_out_of_range", duration_ms=2**40),
        _ev("actor_ip not an address", "invalid_text", actor_ip="999.1.1.1"),
        _ev("actor_ip valid", ROW, actor_ip="10.0.0.1"),
        _ev("parent that does not exist", "foreign_key_violation",
            parent_event_id=str(uuid.uuid4()), parent_event_date="2026-11-01"),
        # -- metacharacters and awkward text survive exactly --
        _ev("SQL and shell metacharacters", ROW,
            actor_id="'; DROP TABLE audit_events; --", resource_name="$(rm -rf /) `id` \\N",
            error_message="tab\there\nnewline\r\\ back\\slash"),
        # -- the envelope --
        Case("payload as JSON string", EVENTS, {b"message": _envelope(json.dumps(as_string))},
             ROW, as_string["event_id"]),
        _raw("payload string not JSON", EVENTS, _envelope("{nope"), "bad_payload"),
        _raw("no payload", EVENTS, json.dumps({"type": "audit_event"}).encode(), "bad_payload"),
        _raw("empty message", EVENTS, b"", "bad_json"),
        _raw("message null", EVENTS, b"null", "bad_envelope"),
        _raw("invalid UTF-8", EVENTS, b'{"payload":{"a":"\xff\xfe"}}', "bad_json"),
        _raw("3 MiB message", EVENTS, b'{"payload":{"a":"' + b"x" * (3 << 20) + b'"}}',
             "too_large"),
        Case("wrong type and junk envelope fields", EVENTS,
             {b"message": _envelope(plain, type="notification_audit", retry_count="many",
                                    timestamp="yesterday")}, ROW, plain["event_id"]),
        Case("no message field", EVENTS, {b"msg": b"{}"}, "no_message"),
        Case("5000 fields, none of them message", EVENTS, many_fields, "no_message"),
        Case("valid message among 50 extra fields", EVENTS, extra_fields_fields, ROW,
             extra_fields["event_id"]),
        # -- notifications --
        _nt("channel the CHECK does not allow", "check_violation", channel="fax"),
        _nt("status the CHECK does not allow", "check_violation", status="lost"),
        _nt("empty notification_id", "missing_field", notification_id=""),
        _nt("sent_at garbage", "bad_timestamp", sent_at="last tuesday"),
        _nt("escalation_level 1.5", "bad_type", escalation_level=1.5),
        _nt("recipient 300 chars", "value_too_long", recipient="r" * 300),
        _nt("unicode, RTL and HTML", ROW, message_summary="<b>CPU</b> & \u05e9\u05dc\u05d5\u05dd"
            " \U0001f525 \u202e"),
        _nt("producer zero values", ROW, id=0, created_at="0001-01-01T00:00:00Z",
            updated_at="0001-01-01T00:00:00Z"),
    ]


def collision_cases(bed: Bed) -> list[Case]:
    """Keys that already hold a row: the same record again is written (acknowledged as a
    duplicate); a different record under the same key is a key_conflict."""
    cfg = config_mod.load(env=bed.env())
    sink = Sink(cfg.database)
    event, note = _event(), _note()
    messages = {"event": producer.build_message(producer.AUDIT_EVENT, event),
                "note": producer.build_message(producer.NOTIFICATION, note)}
    try:
        sink.write([decode_entry("audit_events", {b"message": messages["event"]}),
                    decode_entry("notification_audit", {b"message": messages["note"]})])
    finally:
        sink.close()
    return [
        _raw("same event again", EVENTS, messages["event"], ROW, event["event_id"]),
        _raw("same notification again", NOTIFICATIONS, messages["note"], ROW,
             note["notification_id"]),
        _raw("reused event_id, other content", EVENTS, producer.build_message(
            producer.AUDIT_EVENT, {**event, "actor_id": "someone-else"}), "key_conflict"),
        _raw("reused notification_id, other content", NOTIFICATIONS, producer.build_message(
            producer.NOTIFICATION, {**note, "status": "failed"}), "key_conflict"),
    ]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _rows(bed: Bed) -> tuple[dict[str, int], dict[str, int]]:
    with bed.engine.connect() as conn:
        events = dict(conn.execute(text(
            "SELECT lower(event_id::text), count(*) FROM audit_events GROUP BY 1")).all())
        notes = dict(conn.execute(text(
            "SELECT notification_id, count(*) FROM notification_audit GROUP BY 1")).all())
    return events, notes


def test_hostile_backlog_each_case_ends_as_one_row_or_one_parked_entry(
        bed: Bed, spawn_worker: Callable[..., Any]) -> None:
    # Given a backlog of valid records with every hostile case mixed in between them
    cases = hostile_cases() + collision_cases(bed)
    assert len(cases) >= 40
    valid_events, valid_notes = [], []
    ids: dict[str, Case] = {}
    for case in cases:
        valid_events += bed.produce_events(3)
        valid_notes += bed.produce_notifications(1)
        ids[bed.client.xadd(case.stream, case.fields).decode()] = case  # type: ignore[arg-type]
    valid_events += bed.produce_events(50)

    # When a real worker process drains it
    port = free_port()
    worker = spawn_worker({**bed.env(), **fast_env(), "DLQ_WORKER_HTTP_PORT": str(port),
                           "DLQ_WORKER_HTTP_HOST": "127.0.0.1",
                           "DLQ_WORKER_WORKER_BATCH_SIZE": "40"})
    wait_until(lambda: bed.drained(EVENTS, NOTIFICATIONS), 120, "both streams drained")

    # Then each hostile case is exactly one row or one parked entry with its reason
    events, notes = _rows(bed)
    parked: dict[str, list[str]] = {}
    for stream, dead in DEAD.items():
        for fields in bed.parked(dead):
            assert fields[b"original_stream"].decode() == stream
            parked.setdefault(fields[b"original_id"].decode(), []).append(
                fields[b"reason"].decode())
    outcomes = {}
    for entry_id, case in ids.items():
        if case.expect == ROW:
            table = events if case.stream == EVENTS else notes
            key = case.key.lower() if case.stream == EVENTS and case.key else case.key
            outcomes[case.name] = (f"rows={table.get(key or '', 0)}",
                                   f"parked={parked.get(entry_id, [])}")
            assert table.get(key or "") == 1 and entry_id not in parked, (case.name,
                                                                          outcomes[case.name])
        else:
            outcomes[case.name] = ("rows=?", f"parked={parked.get(entry_id)}")
            assert parked.get(entry_id) == [case.expect], (case.name, parked.get(entry_id))
    assert set(parked) <= set(ids), "a valid neighbour was parked"
    # And every valid neighbour is one row
    assert all(events.get(r["event_id"]) == 1 for r in valid_events)
    assert all(notes.get(r["notification_id"]) == 1 for r in valid_notes)
    # And the worker is still up, ready, and saw no internal error
    wait_until(lambda: _ready(port), 30, "ready")
    assert worker.proc.poll() is None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'dlq_worker_internal_errors_total{stage="write"} 0.0' in metrics
    assert "dlq_worker_systemic_rejection{" in metrics
    print("\nhostile cases:", json.dumps(outcomes, indent=1))

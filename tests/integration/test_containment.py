"""Nothing stops the drain: a failure at any stage is contained to the entry that causes it.

Faults are injected at each stage of a real worker (decode, write, park, ack, the loop
itself) on real Redis and PostgreSQL; a schema change that refuses every row is held,
never parked; a migration that widens a CHECK is obeyed at once.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import pytest

from dlq_worker import producer
from dlq_worker.drain import flush
from dlq_worker.drain.sink import Sink
from dlq_worker.drain.source import Source
from dlq_worker.drain.worker import Worker
from dlq_worker.throwaway import samples
from tests.conftest import EVENTS, NOTIFICATIONS, Bed, wait_until

DEAD = "audit:dead-letter:events"
MARK = "fault-injected"


def _marked(bed: Bed, n: int) -> set[str]:
    """Valid records whose actor_id carries the marker the injected fault looks for."""
    records = [samples.audit_event(bed.rng) for _ in range(n)]
    for record in records:
        record["actor_id"] = MARK
        bed.client.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT,
                                                                   record)})
    return {r["event_id"] for r in records}


def _parked(bed: Bed) -> dict[str, dict[bytes, bytes]]:
    return {f[b"original_id"].decode(): f for f in bed.parked(DEAD)}


def test_unexpected_decoder_failure_is_contained_to_its_entry(bed: Bed, start_worker: Any,
                                                              monkeypatch: Any) -> None:
    # Given a decoder that raises something unforeseen for some entries
    real = flush.decode_entry

    def decode(table: str, fields: Any) -> Any:
        if MARK.encode() in fields.get(b"message", b""):
            raise KeyError("a bug no one foresaw")
        return real(table, fields)

    monkeypatch.setattr(flush, "decode_entry", decode)
    valid = {r["event_id"] for r in bed.produce_events(60)}
    _marked(bed, 2)
    valid |= {r["event_id"] for r in bed.produce_events(60)}

    # When a worker drains the stream
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")

    # Then the valid records are written, the two entries parked as internal errors after
    # max_deliveries, with the exception type and a trace, and the stage is counted
    assert set(bed.event_ids()) == valid
    parked = list(_parked(bed).values())
    assert len(parked) == 2
    for fields in parked:
        assert fields[b"reason"] == b"internal_error"
        assert fields[b"final_retry_count"] == b"5"
        assert fields[b"detail.exception"] == b"KeyError"
        assert b"decode" in fields[b"detail.trace"]
    assert worker.metric("dlq_worker_internal_errors_total", stage="decode") >= 2
    assert worker.thread.is_alive()


def test_unexpected_write_failure_is_bisected_to_its_entry(bed: Bed, start_worker: Any,
                                                           monkeypatch: Any) -> None:
    # Given a write path that raises something unforeseen whenever one record is in a batch
    real = Sink.write

    def write(self: Sink, records: Sequence[Any]) -> Any:
        if any(r.values.get("actor_id") == MARK for r in records):
            raise ValueError("year 10000 is out of range")
        return real(self, records)

    monkeypatch.setattr(Sink, "write", write)
    valid = {r["event_id"] for r in bed.produce_events(100)}
    poison = _marked(bed, 1)
    valid |= {r["event_id"] for r in bed.produce_events(100)}

    # When a worker drains the stream in batches that hold it among valid records
    worker = start_worker(worker={"batch_size": 500})
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")

    # Then everything else is written; it alone is parked, as an internal error
    assert set(bed.event_ids()) == valid
    (fields,) = _parked(bed).values()
    assert fields[b"reason"] == b"internal_error"
    assert fields[b"detail.exception"] == b"ValueError"
    assert b"year 10000" in fields[b"error"]
    assert poison.isdisjoint(bed.event_ids())
    assert worker.metric("dlq_worker_internal_errors_total", stage="write") >= 1
    assert worker.thread.is_alive()


def test_dead_letter_key_of_the_wrong_type_never_stops_the_drain(bed: Bed,
                                                                 start_worker: Any) -> None:
    # Given the dead-letter key holds a string (another tool wrote there)
    bed.client.set(DEAD, "not a stream")
    poison = bed.xadd_raw(EVENTS, b"{not json")
    valid = {r["event_id"] for r in bed.produce_events(50)}

    # When a worker drains the stream
    worker = start_worker()
    wait_until(lambda: bed.count("audit_events") == 50, 30, "valid records written")
    wait_until(lambda: worker.metric("dlq_worker_internal_errors_total", stage="park") >= 1,
               10, "park failure counted")

    # Then the valid records are written and the poison entry stays pending: not lost,
    # not parked, retried slowly; the worker is alive
    wait_until(lambda: bed.pending(EVENTS) == 1 and bed.depth(EVENTS) == 1, 10,
               "only the poison entry left, pending")
    assert set(bed.event_ids()) == valid
    assert worker.thread.is_alive()

    # And once the key is fixed, it is parked by itself
    bed.client.delete(DEAD)
    wait_until(lambda: bed.drained(EVENTS), 20, "poison parked")
    assert list(_parked(bed)) == [poison]


def test_entry_with_thousands_of_fields_is_parked_whole(bed: Bed, start_worker: Any) -> None:
    # Given an entry with 5,000 fields and no message (Lua's unpack cannot take them all)
    fields = {f"f{i}": f"v{i}" for i in range(5000)}
    entry_id = bed.client.xadd(EVENTS, fields).decode()  # type: ignore[arg-type]
    valid = {r["event_id"] for r in bed.produce_events(10)}

    # When a worker drains the stream
    start_worker()
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")

    # Then it is parked with every field kept
    assert set(bed.event_ids()) == valid
    parked = _parked(bed)[entry_id]
    kept = {k.decode()[len("original."):]: v.decode() for k, v in parked.items()
            if k.startswith(b"original.")}
    kept.update(dict(json.loads(parked[b"original_overflow_fields"])))
    assert kept == fields
    assert parked[b"reason"] == b"no_message"


def test_ack_refused_by_redis_leaves_entries_pending_then_acked(bed: Bed, start_worker: Any,
                                                               monkeypatch: Any) -> None:
    # Given Redis refuses the first acknowledgement with an error no retry cures
    from dlq_worker.errors import RedisCommandError

    real = Source.ack_and_delete
    refused: list[int] = []

    def ack(self: Source, ids: Any, **kwargs: Any) -> int:
        if not refused:
            refused.append(1)
            raise RedisCommandError("XACK/XDEL: ERR injected")
        return real(self, ids, **kwargs)

    monkeypatch.setattr(Source, "ack_and_delete", ack)
    valid = {r["event_id"] for r in bed.produce_events(30)}

    # When a worker drains the stream
    worker = start_worker()

    # Then the committed entries stay pending, are claimed again once idle, and are
    # acknowledged as duplicates: nothing lost, nothing parked, nothing written twice
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")
    assert sorted(bed.event_ids()) == sorted(valid)
    assert bed.parked(DEAD) == []
    assert worker.metric("dlq_worker_internal_errors_total", stage="ack") == 1
    assert worker.metric("dlq_worker_entries_duplicate_total", stream=EVENTS) >= 1


def test_failure_escaping_every_stage_restarts_the_loop_in_place(bed: Bed, start_worker: Any,
                                                                  monkeypatch: Any) -> None:
    # Given the loop's own reading raising something unforeseen, twice (housekeeping jobs
    # contain their own failures: see test_edges.py)
    real = Worker._read
    calls: list[int] = []

    def read(self: Worker, block: float) -> Any:
        calls.append(1)
        if len(calls) in (3, 4):
            raise RuntimeError("unforeseen")
        return real(self, block)

    monkeypatch.setattr(Worker, "_read", read)
    valid = {r["event_id"] for r in bed.produce_events(40)}

    # When a worker runs
    worker = start_worker()

    # Then the loop restarts in place and drains everything; the process never stops
    wait_until(lambda: bed.drained(EVENTS), 30, "drained")
    assert set(bed.event_ids()) == valid
    assert worker.metric("dlq_worker_internal_errors_total", stage="loop") == 2
    assert worker.thread.is_alive()


def _readyz(url: str) -> tuple[int, list[str]]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
            return resp.status, []
    except urllib.error.HTTPError as exc:
        return exc.code, list(json.loads(exc.read())["reasons"])


@pytest.mark.fault
def test_systemic_rejection_parks_nothing_and_resumes_by_itself(bed: Bed,
                                                                start_worker: Any) -> None:
    # Given a worker draining, and a migration that adds a NOT NULL column without default
    worker = start_worker(worker={"batch_size": 20})
    first = {r["event_id"] for r in bed.produce_events(40)}
    wait_until(lambda: bed.drained(EVENTS), 30, "first backlog drained")
    with bed.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_events ADD COLUMN tenant text NOT NULL "
                             "DEFAULT 'old rows'")
        conn.exec_driver_sql("ALTER TABLE audit_events ALTER COLUMN tenant DROP DEFAULT")
    later = {r["event_id"] for r in bed.produce_events(200)}

    # Then nothing is parked: the worker turns unready, naming the cause, and holds
    wait_until(lambda: any("systemic rejection" in r and "tenant" in r
                           for r in _readyz(worker.url)[1]), 30, "unready with the cause")
    assert worker.metric("dlq_worker_systemic_rejection", table="audit_events") == 1
    assert bed.parked(DEAD) == []
    assert bed.depth(EVENTS) == 200

    # When the migration is rolled back, everything drains by itself
    with bed.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_events DROP COLUMN tenant")
    wait_until(lambda: bed.drained(EVENTS), 90, "drained after the fix")
    assert set(bed.event_ids()) == first | later
    assert bed.parked(DEAD) == []
    wait_until(lambda: _readyz(worker.url)[0] == 200, 30, "ready again")
    assert worker.metric("dlq_worker_systemic_rejection", table="audit_events") == 0
    assert worker.metric("dlq_worker_systemic_rejections_total", table="audit_events") == 1


def test_a_migration_that_allows_a_new_channel_is_obeyed_at_once(bed: Bed,
                                                                 start_worker: Any) -> None:
    # Given the platform's migration added a channel to the CHECK list
    with bed.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE notification_audit "
                             "DROP CONSTRAINT notification_audit_channel_check")
        conn.exec_driver_sql("ALTER TABLE notification_audit ADD CONSTRAINT "
                             "notification_audit_channel_check CHECK (channel IN "
                             "('slack','pagerduty','teams','console','file','log','sms'))")
    record = samples.notification(bed.rng)
    record["channel"] = "sms"
    bed.client.xadd(NOTIFICATIONS, {"message": producer.build_message(producer.NOTIFICATION,
                                                                      record)})

    # When a worker drains it
    start_worker()
    wait_until(lambda: bed.drained(NOTIFICATIONS), 30, "drained")

    # Then the record is written: the database decides which channels exist
    assert bed.count("notification_audit") == 1
    assert bed.parked("audit:dead-letter:notifications") == []


@pytest.mark.parametrize("n", [300, 5000])  # through the script; past what it can unpack
def test_replay_puts_back_every_field_of_an_entry_parked_with_hundreds(
        bed: Bed, start_worker: Any, n: int) -> None:
    from tests.integration.test_ops import cli
    # Given an entry of n fields parked (the fields past the park's limit kept in
    # original_overflow_fields), a worker no longer running
    fields = {f"f{i}": f"v\xe9{i}" for i in range(n)}
    bed.client.xadd(EVENTS, fields)  # type: ignore[arg-type]
    worker = start_worker()
    wait_until(lambda: bed.drained(EVENTS) and len(_parked(bed)) == 1, 30, "parked")
    worker.stop()

    # When it is replayed
    result = cli(bed, "dead-letter", "replay", "--all")

    # Then the stream holds it again with every field, exact, and it is no longer parked
    assert result.returncode == 0, result.stderr
    [(_, back)] = bed.client.xrange(EVENTS)
    assert {k.decode(): v.decode() for k, v in back.items()} == fields
    assert _parked(bed) == {}

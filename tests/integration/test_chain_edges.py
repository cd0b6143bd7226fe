"""The hash chain on its edges: two records under one key (in one batch, or from two
writers under two correlation IDs), and writers that meet on several chains at once.
A row's previous_event_hash is always the hash of a stored row, and no two writers ever
wait on each other in a cycle.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import psycopg2
from sqlalchemy import create_engine, insert, text

from dlq_worker import chain, producer
from dlq_worker import config as config_mod
from dlq_worker.chain import link
from dlq_worker.drain.decode import decode_entry
from dlq_worker.drain.schema import TABLES
from dlq_worker.drain.sink import Outcome, Sink
from dlq_worker.throwaway import samples
from tests.conftest import Bed, wait_until

#: One day for every event here: an event_id's key is (event_id, UTC date).
BASE = dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time(1), dt.UTC)


def _event(bed: Bed, correlation: str, seconds: float, **fields: Any) -> dict[str, Any]:
    record = samples.audit_event(bed.rng, when=BASE + dt.timedelta(seconds=seconds))
    record["correlation_id"] = correlation
    record.update(fields)
    return record


def _records(events: list[dict[str, Any]]) -> list[Any]:
    return [decode_entry("audit_events", {
        b"message": producer.build_message(producer.AUDIT_EVENT, e)}) for e in events]


def _sink(bed: Bed, **database: Any) -> Sink:
    cfg = config_mod.load(env=bed.env(), overrides={"database": database} if database else None)
    return Sink(cfg.database)


def _tampered(bed: Bed, *correlations: str) -> list[Any]:
    with bed.engine.connect() as conn:
        return [t for r in chain.verify(conn, list(correlations), None) for t in r.tampered]


def _key_chains_otherwise(conn: Any) -> None:
    """Redefine the database's lock function (in the caller's transaction)."""
    conn.execute(text(
        "CREATE OR REPLACE FUNCTION audit_event_lock_id(correlation_id_param TEXT) "
        "RETURNS BIGINT AS $$ SELECT hashtext(correlation_id_param)::bigint $$ "
        "LANGUAGE sql IMMUTABLE"))


def _unhashed(bed: Bed, correlation: str) -> int:
    with bed.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM audit_events WHERE correlation_id = :c "
            "AND event_hash IS NULL"), {"c": correlation}).scalar_one())


def test_two_records_under_one_key_in_one_batch_leave_a_valid_chain(bed: Bed) -> None:
    # Given one batch with two different records under one key (event_id and day) in one
    # chain, the second one earlier in the chain's order, and a third event after them
    first = _event(bed, "twins", 10)
    twin = {**_event(bed, "twins", 5), "event_id": first["event_id"]}
    after = _event(bed, "twins", 20)
    sink = _sink(bed)
    try:
        # When the batch is written
        result = sink.write(_records([first, twin, after]))
    finally:
        sink.close()

    # Then one of the twins is stored, the other is a key conflict (never a duplicate),
    # and the chain verifies: every link points at a stored row
    assert result.outcomes.count(Outcome.WRITTEN) == 2
    assert result.outcomes.count(Outcome.REJECTED) == 1
    assert bed.count("audit_events") == 2
    assert _tampered(bed, "twins") == []
    assert _unhashed(bed, "twins") == 0


def test_one_key_from_two_writers_under_two_chains_leaves_both_chains_valid(
        bed: Bed) -> None:
    # Given another writer that has inserted key K in chain c-one and not yet committed
    event = _event(bed, "c-one", 1)
    other = bed.engine.connect()
    tx = other.begin()
    sink = _sink(bed)
    try:
        record = _records([event])[0]
        other.execute(insert(TABLES["audit_events"]).values(
            **record.values, event_hash="h", previous_event_hash=""))
        # When this writer writes the same key in chain c-two, and a later event of c-two
        # after it, while that insert is in flight
        same_key = {**event, "correlation_id": "c-two", "actor_id": "someone-else"}
        later = _event(bed, "c-two", 2)
        outcome: dict[str, Any] = {}
        writer = threading.Thread(target=lambda: outcome.update(
            result=sink.write(_records([same_key, later]))))
        writer.start()
        time.sleep(1.0)  # it links both rows, then waits on the other's key
        tx.commit()
        writer.join(30)
    finally:
        other.close()
        sink.close()

    # Then its copy of K is a conflict, the later event is stored, and chain c-two links
    # only stored rows
    result = outcome["result"]
    assert result.outcomes == [Outcome.REJECTED, Outcome.WRITTEN]
    assert _tampered(bed, "c-two") == []
    assert _unhashed(bed, "c-two") == 0


def test_writers_take_chain_locks_in_one_order_even_when_a_batch_is_bisected(
        bed: Bed) -> None:
    # Given a batch that must be bisected (one row the database refuses) whose rows span
    # chains "a-..." and "z-...", with the chain "z-..." rows in the first half
    events = [_event(bed, "z-chain", i) for i in range(4)]
    events += [_event(bed, "a-chain", 10 + i) for i in range(3)]
    events.append(_event(bed, "a-chain", 20, event_timestamp="2001-01-01T00:00:00Z"))
    # (2001: no partition holds it, and the window does not create one: a rejected row)
    holder = bed.engine.connect()
    tx = holder.begin()
    sink = _sink(bed, lock_timeout="5s")
    try:
        # and another writer holding chain "a-chain" that will next want "z-chain"
        holder.execute(text("SELECT pg_advisory_xact_lock(audit_event_lock_id('a-chain'))"))
        outcome: dict[str, Any] = {}
        writer = threading.Thread(target=lambda: outcome.update(
            result=sink.write(_records(events))))
        writer.start()
        time.sleep(1.0)
        # When the other writer asks for "z-chain" while this one waits for "a-chain"
        started = time.monotonic()
        holder.execute(text("SELECT pg_advisory_xact_lock(audit_event_lock_id('z-chain'))"))
        waited = time.monotonic() - started
        tx.commit()
        writer.join(30)
    finally:
        holder.close()
        sink.close()

    # Then no cycle formed: a writer waiting for "a-chain" holds nothing after it, so the
    # other got "z-chain" at once, and once it was done every row but the bad one was
    # written (none deferred by a broken deadlock) with valid chains
    assert waited < 0.9, f"waited {waited:.2f}s for a lock held by a waiting writer"
    result = outcome["result"]
    assert result.outcomes.count(Outcome.REJECTED) == 1
    assert result.outcomes.count(Outcome.WRITTEN) == 7
    wait_until(lambda: _tampered(bed, "a-chain", "z-chain") == [], 5, "valid chains")


def test_an_on_time_event_is_hashed_when_another_replica_holds_an_older_one(
        bed: Bed, start_worker: Any) -> None:
    from tests.conftest import EVENTS, GROUP
    # Given replica A that has read the older event of a chain and not written it yet
    # (a pause, a slow node), and the newer one left for replica B
    older, newer = _event(bed, "split", 1), _event(bed, "split", 2)
    bed.client.xgroup_create(EVENTS, GROUP, id="0", mkstream=True)
    bed.client.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, older)})
    bed.client.xreadgroup(GROUP, "replica-a", {EVENTS: ">"})
    bed.client.xadd(EVENTS, {"message": producer.build_message(producer.AUDIT_EVENT, newer)})

    # When B drains, and A comes back two seconds later and writes what it holds
    slow_claims = {"claim_idle": "60s"}  # only order is at play, no claim
    b = start_worker(streams={"consumer": "replica-b"}, worker=slow_claims)
    time.sleep(2.0)
    assert newer["event_id"] not in set(bed.event_ids())  # B waits for the older one
    start_worker(streams={"consumer": "replica-a"}, worker=slow_claims)

    # Then both events are written, in the chain's order, both hashed: on time is on time
    # however the replicas split the chain
    wait_until(lambda: bed.count("audit_events") == 2 and bed.drained(EVENTS), 20, "both")
    assert _unhashed(bed, "split") == 0
    assert _tampered(bed, "split") == []
    assert b.metric("dlq_worker_entries_deferred_total", stream=EVENTS) >= 1


def test_a_redelivered_batch_on_the_direct_path_links_only_its_new_rows(bed: Bed) -> None:
    # Given a chain with two stored events, written through a sink that COPYs straight
    # into the table (which links its rows without looking for existing keys)
    old = [_event(bed, "again", 1), _event(bed, "again", 2)]
    sink = _sink(bed)
    try:
        assert sink.write(_records(old)).outcomes == [Outcome.WRITTEN] * 2
        # When a batch holding both again, between new events of the chain, is written
        # by a fresh sink (the direct path is open: no key met yet)
        new = [_event(bed, "again", 3), _event(bed, "again", 4)]
        fresh = _sink(bed)
        try:
            result = fresh.write(_records([new[0], *old, new[1]]))
        finally:
            fresh.close()
    finally:
        sink.close()

    # Then the stored ones are duplicates, the new ones are written and linked, and the
    # chain verifies: no link points at a row that was never stored
    assert result.outcomes == [Outcome.WRITTEN, Outcome.DUPLICATE, Outcome.DUPLICATE,
                               Outcome.WRITTEN]
    assert result.chained == {0: True, 3: True}
    assert bed.count("audit_events") == 4
    assert _tampered(bed, "again") == []
    assert _unhashed(bed, "again") == 0


def test_chain_locks_are_keyed_as_the_databases_own_function_keys_them(bed: Bed) -> None:
    # Given the lock function db init installs (the platform migration's definition)
    with bed.engine.connect() as conn:
        # Then the keys computed here are the ones it gives, for any text
        assert chain.lock_ids_agree(conn)
        for cid in ("rr-2026-000042", "ünïcode-😀", "x" * 255):
            assert conn.execute(text("SELECT audit_event_lock_id(:c)"),
                                {"c": cid}).scalar_one() == chain.lock_id(cid)
        conn.rollback()
        # And a database whose function keys chains otherwise is seen to differ: its own
        # function is called then
        with conn.begin():
            _key_chains_otherwise(conn)
            assert not chain.lock_ids_agree(conn)
            sink = _sink(bed)
            try:
                chainer = sink._chainer(conn)
                assert chainer is not None
                assert chainer.lock(conn, ["a-chain"]) == set()
                assert chainer.local_lock_ids is False
            finally:
                sink.close()
            conn.rollback()


def test_a_database_that_cannot_take_the_probes_text_keeps_its_own_lock_function(
        bed: Bed) -> None:
    # Given a LATIN1 database (it has no code for an emoji) with the lock function
    name = f"{bed.dbname}_latin1"
    admin = psycopg2.connect(host="127.0.0.1", port=bed.pg_port, user="postgres",
                             dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' TEMPLATE template0 "
                        "LC_COLLATE 'C' LC_CTYPE 'C'")
        engine = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:{bed.pg_port}/{name}")
        try:
            with engine.connect() as conn:
                conn.execute(text(chain.LOCK_ID_FUNCTION))
                # Then asking whether it agrees is a no, not an error, and the
                # transaction goes on: chains are locked through its function
                assert chain.lock_ids_agree(conn) is False
                chainer = chain.Chainer(chain.SHA256)
                assert chainer.lock(conn, ["rr-2026-000001", "café"]) == set()
                assert chainer.local_lock_ids is False
                conn.rollback()
        finally:
            engine.dispose()
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


def test_a_batch_holds_the_lock_the_platform_takes_for_each_of_its_chains(bed: Bed) -> None:
    # Given a batch being written, its chains' locks held by its open transaction
    events = [_event(bed, f"held-{i}", i) for i in range(3)]
    sink = _sink(bed)
    with bed.engine.connect() as conn:
        tx = conn.begin()
        try:
            chainer = sink._chainer(conn)
            assert chainer is not None
            records = _records(events)
            chainer.link(conn, records, [0, 1, 2])
            assert chainer.local_lock_ids  # (asked at the first lock)
            # Then the platform's own lock call for each chain, from another session,
            # finds it taken
            with bed.engine.connect() as other:
                for e in events:
                    assert other.execute(text(
                        "SELECT pg_try_advisory_xact_lock(audit_event_lock_id(:c))"),
                        {"c": e["correlation_id"]}).scalar_one() is False
                other.rollback()
        finally:
            tx.rollback()
            sink.close()


def test_an_actor_ip_is_hashed_as_the_text_postgresql_gives_back(bed: Bed) -> None:
    # Given audit events whose actor_ip is written in the forms a producer may send
    addresses = ["10.0.0.1", "192.168.1.255", "0.0.0.0", "255.255.255.255", "8.8.8.8",
                 "010.1.2.3", "10.0.0.1/32", "10.0.0.0/8", "::1", "2001:DB8::1",
                 "::ffff:10.0.0.1", "fe80::1/64"]
    events = [_event(bed, f"ip-{i}", i, actor_ip=a) for i, a in enumerate(addresses)]
    sink = _sink(bed)
    try:
        # When they are linked into their chains and written
        result = sink.write(_records(events))
    finally:
        sink.close()
    # Then each hash is of the row as the verifier reads it back (actor_ip::text), those
    # PostgreSQL was not asked to print included
    assert result.outcomes == [Outcome.WRITTEN] * len(addresses)
    assert result.chained == dict.fromkeys(range(len(addresses)), True)
    assert _tampered(bed, *(e["correlation_id"] for e in events)) == []
    assert all(link._canonical_ipv4(a) for a in addresses[:5])
    assert not any(link._canonical_ipv4(a) for a in addresses[5:])


def test_a_lock_function_redefined_while_running_is_followed(bed: Bed) -> None:
    # Given a chainer that found the database's lock function agreeing with its own keys
    now = [1000.0]
    chainer = chain.Chainer(chain.SHA256, clock=lambda: now[0])
    with bed.engine.connect() as conn:
        assert chainer.lock(conn, ["c"]) == set() and chainer.local_lock_ids is True
        conn.rollback()
        # When the function is redefined, and the recheck interval passes
        with conn.begin():
            _key_chains_otherwise(conn)
            assert chainer.lock(conn, ["c"]) == set()
            assert chainer.local_lock_ids is True  # not asked again yet
            now[0] += chainer.lock_ids_recheck
            # Then the next batch's locks go through the database's function
            assert chainer.lock(conn, ["c"]) == set()
            assert chainer.local_lock_ids is False
            conn.rollback()

"""Pure policy: batching, backoff schedules, error classification."""

from __future__ import annotations

from typing import Any

import pytest

from dlq_worker.drain.classify import classify_database_error
from dlq_worker.drain.policy import BatchPolicy, park_schedule, reject_delay
from dlq_worker.drain.systemic import SystemicDetector
from dlq_worker.errors import DatabaseUnavailable, MissingPartition, RejectedError


def test_batch_flushes_when_full_or_lingered() -> None:
    policy = BatchPolicy(size=100, linger=0.05)
    assert not policy.due(0, None, 10.0)
    assert policy.due(100, 10.0, 10.0)
    assert not policy.due(5, 10.0, 10.01)
    assert policy.due(5, 10.0, 10.06)
    assert policy.room(30) == 70 and policy.room(150) == 0


def test_reads_and_flushes_are_bounded_by_bytes() -> None:
    policy = BatchPolicy(size=500, linger=0.0, max_bytes=16 * 2**20)
    # ~1 KB entries: the count is the limit; ~900 KB entries: the bytes are
    assert policy.room(0, 0, 1_000) == 500
    assert policy.room(0, 0, 900_000) == 18
    assert policy.room(10, 10 * 900_000, 900_000) == 8
    # an entry larger than the whole budget still moves, one at a time
    assert policy.room(0, 0, 50 * 2**20) == 1
    assert policy.room(1, 50 * 2**20, 50 * 2**20) == 0
    lingering = BatchPolicy(size=500, linger=1.0, max_bytes=16 * 2**20)
    assert lingering.due(3, 1.0, 1.0, bytes_in_hand=16 * 2**20)
    assert not lingering.due(3, 1.0, 1.0, bytes_in_hand=2**20)


def test_systemic_rejection_needs_a_streak_of_distinct_entries_over_batches() -> None:
    nn = "23502 audit_events tenant"
    detector = SystemicDetector(threshold=10)
    # one batch of 20 refused rows for one cause: could be one bad producer burst
    detector.observe("audit_events", 0, [(("s", f"{i}-0"), nn) for i in range(20)])
    assert detector.systemic() == {}
    # the next batch too: it is the schema
    detector.observe("audit_events", 0, [(("s", f"{i}-0"), nn) for i in range(20, 25)])
    assert detector.systemic() == {"audit_events": nn}
    # the other table is not affected; one accepted row ends it
    detector.observe("notification_audit", 3, [])
    assert detector.systemic() == {"audit_events": nn}
    detector.observe("audit_events", 1, [(("s", "99-0"), nn)])
    assert detector.systemic() == {}


def test_mixed_causes_or_redeliveries_of_the_same_entries_are_not_systemic() -> None:
    detector = SystemicDetector(threshold=10)
    for _ in range(5):  # the same three entries retried over and over
        detector.observe("t", 0, [(("s", f"{i}-0"), "22001 t x") for i in range(3)])
    assert detector.systemic() == {}
    # one burst of ten bad rows, then the same ten redelivered: one batch of evidence
    burst = [(("s", f"{i}-1"), "23514 t check") for i in range(10)]
    detector.observe("t", 0, burst)
    detector.observe("t", 0, burst)
    assert detector.systemic() == {}
    detector.observe("t", 0, [(("s", f"{i}-0"), "22001 t x") for i in range(10, 30)]
                     + [(("s", "31-0"), "23514 t check")])
    detector.observe("t", 0, [(("s", f"{i}-0"), "22001 t x") for i in range(40, 60)]
                     + [(("s", "61-0"), "23514 t check")])
    assert detector.systemic() == {}


def test_a_streak_expires() -> None:
    now = [0.0]
    detector = SystemicDetector(threshold=4, expire_after=600, clock=lambda: now[0])
    detector.observe("t", 0, [(("s", "1-0"), "c"), (("s", "2-0"), "c")])
    now[0] = 7 * 86400.0  # a week later, the same cause again
    detector.observe("t", 0, [(("s", "3-0"), "c"), (("s", "4-0"), "c")])
    assert detector.systemic() == {}


def test_redis_error_replies_are_told_apart() -> None:
    from dlq_worker.drain.redis_io import _transient_reply

    assert _transient_reply("LOADING Redis is loading the dataset in memory")
    assert _transient_reply("Error running script (call to f_x): @user_script:1: "
                            "READONLY You can't write against a read only replica.")
    assert _transient_reply("OOM command not allowed when used memory > 'maxmemory'.")
    assert not _transient_reply("WRONGTYPE Operation against a key holding the wrong kind "
                                "of value script: 6f1e, on @user_script:7.")
    assert not _transient_reply("ERR Error running script: too many results to unpack")


@pytest.mark.parametrize(("reply", "transient"), [
    ("READONLY You can't write against a read only replica.", True),
    ("OOM command not allowed when used memory > 'maxmemory'.", True),
    ("NOPERM this user has no permissions to run the 'xack' command", True),
    ("TRYAGAIN Multiple keys request during rehashing of slot", True),
    ("MASTERDOWN Link with MASTER is down", True),
    ("BUSY Redis is busy running a script.", True),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
    ("ERR Error running script (call to f_1): @user_script:3: too many results to unpack",
     False),
])
def test_redis_errors_as_redis_py_raises_them(reply: str, transient: bool) -> None:
    # Given the exception redis-py builds from the reply (it strips known error codes)
    from redis._parsers.base import BaseParser

    from dlq_worker.drain.redis_io import translated
    from dlq_worker.errors import RedisCommandError, RedisUnavailable

    error = BaseParser.parse_error(reply)
    expected = RedisUnavailable if transient else RedisCommandError
    with pytest.raises(expected), translated("XACK", "audit:dlq:events"):
        raise error


def test_read_blocks_only_for_what_linger_has_left() -> None:
    policy = BatchPolicy(size=100, linger=0.05)
    assert policy.block_for(0, None, 5.0, idle=1.0) == 1.0
    assert policy.block_for(3, 5.0, 5.02, idle=1.0) == pytest.approx(0.03)
    assert policy.block_for(3, 5.0, 9.0, idle=1.0) == 0.001  # never 0: BLOCK 0 is forever


def test_rejected_entries_are_parked_within_a_couple_of_minutes_by_default() -> None:
    waits = park_schedule(max_deliveries=5, initial=5.0, maximum=30.0)
    assert waits == [5.0, 10.0, 20.0, 30.0]
    assert sum(waits) <= 120
    assert reject_delay(1, 5.0, 30.0) == 5.0 and reject_delay(9, 5.0, 30.0) == 30.0


@pytest.mark.parametrize(("sqlstate", "message", "kind", "reason"), [
    ("23502", "null value in column", RejectedError, "not_null_violation"),
    ("23514", "new row violates check constraint", RejectedError, "check_violation"),
    ("23514", 'no partition of relation "audit_events" found for row', MissingPartition,
     "missing_partition"),
    ("22001", "value too long for type character varying(50)", RejectedError,
     "value_too_long"),
    ("22P02", "invalid input syntax for type inet", RejectedError, "invalid_text"),
    ("23503", "insert or update violates foreign key", RejectedError, "foreign_key_violation"),
    ("40001", "could not serialize access", DatabaseUnavailable, None),
    ("40P01", "deadlock detected", DatabaseUnavailable, None),
    ("53300", "sorry, too many clients already", DatabaseUnavailable, None),
    ("57P01", "terminating connection due to administrator command", DatabaseUnavailable, None),
    ("57014", "canceling statement due to statement timeout", DatabaseUnavailable, None),
    ("25006", "cannot execute INSERT in a read-only transaction", DatabaseUnavailable, None),
    ("42P01", 'relation "audit_events" does not exist', DatabaseUnavailable, None),
    ("42501", "permission denied for table audit_events", DatabaseUnavailable, None),
    (None, "could not connect to server: Connection refused", DatabaseUnavailable, None),
])
def test_database_errors_are_classified(sqlstate: str | None, message: str, kind: type,
                                        reason: str | None) -> None:
    err = classify_database_error(sqlstate, message)
    assert type(err) is kind
    if reason:
        assert err.reason == reason  # type: ignore[union-attr]


def test_values_from_the_row_are_redacted_from_database_messages() -> None:
    err = classify_database_error(
        "22P02", 'invalid input syntax for type inet: "10.0.0.999-secret"')
    assert "secret" not in str(err) and "type inet" in str(err)
    kept = classify_database_error("23502", 'null value in column "event_type" of relation')
    assert '"event_type"' in str(kept)


def test_a_rejection_is_signed_with_the_logical_table_not_its_partition() -> None:
    # Given PostgreSQL's report naming the monthly partition
    from types import SimpleNamespace

    from dlq_worker.drain.postgres import classify

    def refusal(partition: str) -> Any:
        return SimpleNamespace(pgcode="23502", diag=SimpleNamespace(
            constraint_name=None, column_name="tenant", table_name=partition),
            __str__=lambda self: "null value")

    august, september = (classify(refusal(p), "audit_events")
                         for p in ("audit_events_2026_08", "audit_events_2026_09"))
    # Then rows on both sides of a month's end share one signature
    assert isinstance(august, RejectedError) and isinstance(september, RejectedError)
    assert august.signature == september.signature == "23502 audit_events tenant"


def test_retry_log_lines_thin_out_and_together_count_every_attempt() -> None:
    from dlq_worker.drain.worker import _logged_attempt
    logged = [n for n in range(1, 201) if _logged_attempt(n)]
    assert logged == [1, 2, 3, 4, 8, 16, 32, 64, 128, 192]
    # each line says how many attempts it stands for; together they count all of them
    summarized = [n - p for p, n in zip([0, *logged], logged, strict=False)]
    assert sum(summarized) == logged[-1]

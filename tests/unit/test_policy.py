"""Pure policy: batching, backoff schedules, error classification."""

from __future__ import annotations

import pytest

from dlq_worker.classify import classify_database_error
from dlq_worker.errors import DatabaseUnavailable, MissingPartition, RejectedError
from dlq_worker.policy import BatchPolicy, park_schedule, reject_delay


def test_batch_flushes_when_full_or_lingered() -> None:
    policy = BatchPolicy(size=100, linger=0.05)
    assert not policy.due(0, None, 10.0)
    assert policy.due(100, 10.0, 10.0)
    assert not policy.due(5, 10.0, 10.01)
    assert policy.due(5, 10.0, 10.06)
    assert policy.room(30) == 70 and policy.room(150) == 0


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

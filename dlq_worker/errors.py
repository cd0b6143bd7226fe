"""The exceptions dlq-worker raises, and what the run loop does with each.

Library errors (redis-py, SQLAlchemy/psycopg2) are translated where they enter
(`drain/source.py`, `drain/sink.py`), so the loop reasons only in these terms::

    DlqWorkerError
    ├── ConfigError              bad configuration: one line naming the key; exit 3
    ├── StartupError             a server could not be reached at start; exit 4
    ├── NotFound                 an operator named a stream, ID or entry that is not there; exit 5
    ├── NoRoom                   replay/move would push a DLQ stream past the producers' cap
    │                            (their MAXLEN trimming would delete records); exit 9
    ├── StreamGone               a DLQ stream (or its group) vanished: forget it, rediscover
    ├── RedisCommandError        Redis answered with an error no retry cures (WRONGTYPE, a
    │                            script error): contained to its entry, retried slowly
    ├── TransientError           the server is unreachable or busy: keep the batch in hand,
    │   │                        back off, never ack, never count it against the entry
    │   ├── RedisUnavailable
    │   └── DatabaseUnavailable
    │       └── SystemicRejection  PostgreSQL refuses every row alike (a migration added a
    │                            NOT NULL column...): not the rows' fault; hold, never park
    └── PermanentError           this entry can never be written as it is: isolate it, park it
        ├── DecodeError          the envelope or payload is malformed (certain: park at once)
        ├── KeyConflict          another record already holds this key (certain: park at once)
        ├── InternalError        processing it raised something unexpected: retried by
        │                        delivery count like a rejection, then parked
        └── RejectedError        PostgreSQL refused the row (check, not-null, length, type,
            │                    missing partition): retried by delivery count, then parked
            └── MissingPartition a RejectedError the worker may cure by creating the partition

``certain`` on a PermanentError says whether retrying can change anything: certain ones are
parked at their first delivery, the others after ``worker.max_deliveries``.
"""

from __future__ import annotations


class DlqWorkerError(Exception):
    """Base class of every error dlq-worker raises on purpose."""


class ConfigError(DlqWorkerError):
    """The configuration is invalid. The message names the key and what was expected."""


class StartupError(DlqWorkerError):
    """A dependency could not be reached or prepared when the worker started."""


class NotFound(DlqWorkerError):
    """An operator command named a stream, an entry ID or a parked entry that does not exist."""


class NoRoom(DlqWorkerError):
    """An operator command would make a DLQ stream longer than the producers' cap leaves
    room for: their next ``XADD ... MAXLEN ~`` would trim records no one has read."""


class StreamGone(DlqWorkerError):
    """A stream or its consumer group no longer exists (deleted, evicted, Redis restarted
    without persistence). Not an outage: the loop drops the stream and rediscovers it."""

    def __init__(self, streams: list[str]) -> None:
        super().__init__(f"stream or group gone: {', '.join(streams)}")
        self.streams = streams


class RedisCommandError(DlqWorkerError):
    """Redis refused a command in a way retrying will not cure: a key of the wrong type,
    a script error, an argument limit. The entry involved stays pending and is retried
    slowly; the loop goes on with the others."""


class TransientError(DlqWorkerError):
    """A server is unavailable. Nothing is wrong with the entries in hand."""


class RedisUnavailable(TransientError):
    """Redis did not answer, dropped the connection, or is loading its dataset."""


class DatabaseUnavailable(TransientError):
    """PostgreSQL did not answer, dropped the connection, or asked to retry."""


class SystemicRejection(DatabaseUnavailable):
    """PostgreSQL rejects every row alike, for the same reason: a schema change, a trigger,
    a tightened CHECK. Treated as an outage (the batch stays in hand, nothing is parked)
    until a row is accepted again."""


#: Every ``reason`` an entry can be rejected or parked with (the label of
#: ``dlq_worker_entries_parked_total`` and ``..._rejected_total``, and the dead letter's
#: ``reason`` field). Each series exists at zero from the start, so the first entry parked
#: for any reason pages (``increase()`` ignores a series' first sample); a test holds this
#: set to every reason the code can raise.
REASONS = frozenset({
    # the entry does not follow the contract (drain/decode.py)
    "decode_error", "no_message", "too_large", "bad_json", "bad_envelope", "bad_payload",
    "bad_timestamp", "missing_field", "bad_type", "bad_uuid", "bad_base64", "bad_unicode",
    "nul_character", "number_out_of_range", "unknown_table",
    # PostgreSQL refuses the row (drain/classify.py, drain/sink.py)
    "rejected", "not_null_violation", "foreign_key_violation", "unique_violation",
    "check_violation", "value_too_long", "numeric_out_of_range", "invalid_datetime",
    "datetime_out_of_range", "invalid_text", "untranslatable_character", "raised_by_trigger",
    "data_exception", "integrity_violation", "unencodable", "not_stored",
    "missing_partition", "outside_partition_window",
    # a different record under the key, or something unforeseen
    "key_conflict", "internal_error", "permanent",
})


class PermanentError(DlqWorkerError):
    """An entry that can never be written as it is.

    ``reason`` is a short, stable, label-safe classification (used in metrics and
    in the parked entry); the message is the human-readable detail. Messages never
    carry a payload, only the field and the kind of problem.
    """

    reason: str = "permanent"
    #: Retrying cannot change the outcome: park at the first delivery.
    certain: bool = False

    def __init__(self, message: str, *, reason: str | None = None,
                 details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        #: Extra facts for the dead letter (``detail.<name>`` fields); never payload values.
        self.details = dict(details or {})


class DecodeError(PermanentError):
    """The stream entry or its JSON envelope/payload does not follow the contract."""

    reason = "decode_error"
    certain = True


class KeyConflict(PermanentError):
    """A row with the same key exists and holds a different record (a reused ID)."""

    reason = "key_conflict"
    certain = True


class InternalError(PermanentError):
    """Something unexpected was raised while this entry was processed (a bug, or input no
    one foresaw). Contained to the entry; parked after ``max_deliveries`` if it persists."""

    reason = "internal_error"


class RejectedError(PermanentError):
    """PostgreSQL rejected the row: a constraint, a type or a length."""

    reason = "rejected"

    def __init__(self, message: str, *, reason: str | None = None, sqlstate: str | None = None,
                 signature: str | None = None) -> None:
        super().__init__(message, reason=reason,
                         details={"sqlstate": sqlstate} if sqlstate else None)
        self.sqlstate = sqlstate
        #: What makes two rejections "the same cause": SQLSTATE plus constraint or column.
        self.signature = signature or f"{sqlstate or ''}:{self.reason}"


class MissingPartition(RejectedError):
    """``audit_events`` has no partition for the row's month."""

    reason = "missing_partition"

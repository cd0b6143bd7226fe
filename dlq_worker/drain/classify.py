"""Decide whether a PostgreSQL failure is the server's fault or the row's.

Pure: works on the SQLSTATE and message only. The rule leans towards "transient",
because a transient error costs a retry while a wrong "permanent" parks a valid
record: only data exceptions (class 22) and integrity violations (class 23) are
the row's fault. A missing table, a missing privilege or a renamed column fails
every row alike; parking them all would empty the DLQ into the dead letters, so
those are transient too and the worker waits, not ready, until someone fixes it.
"""

from __future__ import annotations

import re

from dlq_worker.errors import DatabaseUnavailable, MissingPartition, RejectedError

_PERMANENT_CLASSES = ("22", "23")
_PERMANENT_CODES = frozenset({"P0001"})  # raise_exception from a trigger on the row

_NO_PARTITION = "no partition of relation"

_REASONS = {
    "23502": "not_null_violation",
    "23503": "foreign_key_violation",
    "23505": "unique_violation",
    "23514": "check_violation",
    "22001": "value_too_long",
    "22003": "numeric_out_of_range",
    "22007": "invalid_datetime",
    "22008": "datetime_out_of_range",
    "22P02": "invalid_text",
    "22P05": "untranslatable_character",
    "P0001": "raised_by_trigger",
}

_CLASS_REASONS = {"22": "data_exception", "23": "integrity_violation"}

#: A quoted literal after a colon is a value from the row (``invalid input syntax for
#: type inet: "10.0.0.999"``): audit data, never for logs. Quoted names before it stay.
_VALUE = re.compile(r'(:\s*)"[^"]*"')


def redact(message: str) -> str:
    return _VALUE.sub(r'\1"<value>"', message)


def classify_database_error(
    sqlstate: str | None, message: str, *, constraint: str | None = None,
    column: str | None = None, table: str | None = None,
) -> DatabaseUnavailable | RejectedError:
    """The worker's view of a database error: DatabaseUnavailable or RejectedError.

    A RejectedError's ``signature`` names its cause (SQLSTATE, table, and the constraint or
    column where PostgreSQL reports one, else the redacted message): rows refused with one
    signature, one after another, are how a schema change shows itself.
    """
    first_line = redact((message or "").strip().splitlines()[0][:240]) if message else ""
    if sqlstate and (sqlstate[:2] in _PERMANENT_CLASSES or sqlstate in _PERMANENT_CODES):
        where = constraint or column or first_line[:120]
        signature = f"{sqlstate} {table or '?'} {where}"
        if sqlstate == "23514" and _NO_PARTITION in first_line:
            return MissingPartition(first_line, sqlstate=sqlstate, signature=signature)
        # A bounded set of labels: a code not named above goes by its class (the dead
        # letter keeps the SQLSTATE itself in detail.sqlstate).
        reason = _REASONS.get(sqlstate) or _CLASS_REASONS.get(sqlstate[:2], "raised_by_trigger")
        return RejectedError(first_line, reason=reason, sqlstate=sqlstate, signature=signature)
    code = f"SQLSTATE {sqlstate}: " if sqlstate else ""
    return DatabaseUnavailable(f"{code}{first_line}" if first_line else f"{code}database error")

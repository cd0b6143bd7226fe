"""Where an existing key is told apart: the same record again, or a different one.

``INSERT ... ON CONFLICT DO NOTHING`` says only that a row with the key exists. A
redelivered entry (a crash between COMMIT and XACK) holds the same record and counts
as written; a producer reusing an ID holds a different one, which must be parked as a
``key_conflict``, never acknowledged as a duplicate. "Same" means every column the
worker writes (the producer's fields), compared by PostgreSQL in its own types, so
``jsonb`` compares by value and ``timestamptz`` by instant; columns the database fills
(``id``, ``created_at``, hash and legal-hold columns) are not part of a record's content.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Boolean, Connection, Date, DateTime, Integer, text
from sqlalchemy.dialects.postgresql import INET, JSONB, UUID

from dlq_worker.drain.decode import Record, dumps_exact
from dlq_worker.drain.schema import CONFLICT_KEYS, TABLES

#: How each column is read back from JSON for the comparison (text for every string type:
#: a too-long incoming value must compare, not fail).
_SQL_TYPES: tuple[tuple[type[Any], str], ...] = (
    (UUID, "uuid"), (DateTime, "timestamptz"), (Date, "date"), (INET, "inet"),
    (JSONB, "jsonb"), (BigInteger, "bigint"), (Integer, "bigint"), (Boolean, "boolean"),
)


def _sql_type(table: str, column: str) -> str:
    kind = TABLES[table].c[column].type
    kind = getattr(kind, "impl_instance", kind)  # a TypeDecorator: the type it stores as
    for cls, name in _SQL_TYPES:
        if isinstance(kind, cls):
            return name
    return "text"


def _plain(value: Any) -> Any:
    if isinstance(value, uuid.UUID | dt.date):  # datetime is a date
        return value.isoformat() if isinstance(value, dt.date) else str(value)
    return value


def _rows_json(records: Sequence[Record], indexes: Sequence[int]) -> str:
    rows = [{"dlq_ord": i, **{k: _plain(v) for k, v in records[i].values.items()}}
            for i in indexes]
    return dumps_exact(rows)


def _v(alias: str, column: str, jsonb: set[str]) -> str:
    """A column as compared: for jsonb, the JSON value null counts as absent (rows written
    by earlier versions through INSERT hold it where COPY wrote SQL NULL)."""
    if column in jsonb:
        return f"NULLIF({alias}.{column}, 'null'::jsonb)"
    return f"{alias}.{column}"


def _digest(alias: str, columns: Sequence[str], jsonb: set[str]) -> str:
    row = ", ".join(_v(alias, c, jsonb) for c in columns)
    return f"encode(sha256(convert_to(ROW({row})::text, 'UTF8')), 'hex')"


@dataclass(frozen=True)
class Conflict:
    """sha256 of the incoming record and of the stored row, over the same columns in the
    same types (equal content, equal digests), and the names of the columns that differ."""

    incoming: str
    stored: str
    columns: str

    @property
    def missing(self) -> bool:
        """No row holds the key at all: whatever skipped the record, it is not stored."""
        return not self.stored


def find_conflicts(conn: Connection, table: str, records: Sequence[Record],
                   indexes: Sequence[int]) -> dict[int, Conflict]:
    """Of these records, those not stored as they are: a different row under their key,
    or no row under it at all (``missing``)."""
    if not indexes:
        return {}
    columns = list(records[indexes[0]].values)
    keys = CONFLICT_KEYS[table]
    declared = ", ".join(["dlq_ord bigint"] + [f"{c} {_sql_type(table, c)}" for c in columns])
    jsonb = {c for c in columns if _sql_type(table, c) == "jsonb"}
    same = " AND ".join(f"{_v('s', c, jsonb)} IS NOT DISTINCT FROM {_v('t', c, jsonb)}"
                        for c in columns)
    differ = ", ".join(f"CASE WHEN {_v('s', c, jsonb)} IS DISTINCT FROM {_v('t', c, jsonb)} "
                       f"THEN '{c}' END" for c in columns)
    join = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    sql = (f"SELECT s.dlq_ord, {_digest('s', columns, jsonb)}, {_digest('t', columns, jsonb)}, "
           f"array_to_string(ARRAY[{differ}], ','), t.{keys[0]} IS NULL "
           f"FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS s({declared}) "
           f"LEFT JOIN {table} t ON {join} WHERE t.{keys[0]} IS NULL OR NOT ({same})")
    found = conn.execute(text(sql), {"rows": _rows_json(records, indexes)}).all()
    return {int(ord_): Conflict(str(mine), "" if missing else str(theirs), str(cols))
            for ord_, mine, theirs, cols, missing in found}

"""Where rows are written: PostgreSQL through SQLAlchemy Core.

One transaction per table per flush. Rows are copied straight into the table; a batch
that meets an existing key goes through ``INSERT ... ON CONFLICT (<key>) DO NOTHING
RETURNING <key>``, whose conflict target is the record's own key: a row that already
exists under it counts as written only if it holds the same record (conflicts.py),
and a row any other constraint refuses is a rejection, never a silent skip. When
PostgreSQL rejects a batch because of one row, the batch is bisected under savepoints
so its good rows are still written and only the bad ones come back as RejectedError.
Any other failure is raised as DatabaseUnavailable and nothing of the batch is
considered written.
"""

from __future__ import annotations

import datetime as dt
import enum
import io
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.errors
from sqlalchemy import Connection, Engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert

from dlq_worker import chain
from dlq_worker.config import DatabaseConfig
from dlq_worker.drain import pgcopy
from dlq_worker.drain.conflicts import find_conflicts
from dlq_worker.drain.decode import AUDIT_EVENTS, Record
from dlq_worker.drain.postgres import (
    UNENCODABLE,
    classify,
    first_line,
    is_disconnect,
    make_engine,
    translate,
    unencodable,
)
from dlq_worker.drain.schema import (
    CONFLICT_KEYS,
    CREATE_TABLES,
    TABLES,
    month_start,
    months_around,
    partition_ddl,
    partition_name,
)
from dlq_worker.errors import (
    DatabaseUnavailable,
    KeyConflict,
    MissingPartition,
    PermanentError,
    RejectedError,
    StartupError,
)

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    WRITTEN = "written"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    #: Not written now: its hash chain is locked by another writer. Kept in hand and
    #: written by a later batch; never counted against the entry.
    DEFERRED = "deferred"


@dataclass
class WriteResult:
    """Per record (same order as the input): its outcome, and the error if rejected."""

    outcomes: list[Outcome]
    errors: dict[int, PermanentError] = field(default_factory=dict)
    partitions_created: list[str] = field(default_factory=list)
    #: audit_events rows with the hash chain on: True linked, False written unhashed (late).
    chained: dict[int, bool] = field(default_factory=dict)


class Sink:
    """Writes decoded records into their tables."""

    #: Without the TEMP privilege the sink writes with INSERT, and tries COPY again this
    #: much later (a privilege granted back brings the fast path back without a restart).
    copy_reprobe_seconds = 300.0
    #: After a batch met an existing key, later batches take the staging path this long.
    direct_pause_seconds = 5.0

    def __init__(self, config: DatabaseConfig, engine: Engine | None = None, *,
                 copy: bool = True) -> None:
        self.config = config
        self.engine = engine if engine is not None else make_engine(config)
        #: COPY-based fast path for whole batches (the bisecting path always uses INSERT).
        self.copy = copy
        #: While lacking the TEMP privilege: when to try COPY again (monotonic), else 0.
        self._copy_off_until = 0.0
        #: After a COPY met an existing key: when to try COPY straight into the table again.
        self._direct_off_until = 0.0
        self._chain: chain.Chainer | None = None
        self._chain_decided = False

    def close(self) -> None:
        self.engine.dispose()

    @property
    def chaining(self) -> bool:
        """Whether audit_events rows are linked into hash chains (True until decided)."""
        return self._chain is not None or not self._chain_decided

    def write(self, records: Sequence[Record]) -> WriteResult:
        """Write every record, one transaction per table.

        Raises DatabaseUnavailable if PostgreSQL fails for a reason not tied to a row;
        in that case no outcome of this call may be trusted (some tables may be
        committed: re-writing them is harmless, inserts are idempotent).
        """
        result = WriteResult(outcomes=[Outcome.WRITTEN] * len(records))
        by_table: dict[str, list[int]] = {}
        for index, record in enumerate(records):
            by_table.setdefault(record.table, []).append(index)
        for table, indexes in by_table.items():
            for one_per_key in _passes(records, indexes):
                self._write_table(table, records, one_per_key, result)
        return result

    def ping(self) -> None:
        with self._translated(), self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def init_schema(self, months_back: int = 3, months_ahead: int = 3) -> list[str]:
        """Create the contract's tables and monthly partitions around today (idempotent)."""
        today = dt.datetime.now(dt.UTC).date()
        months = months_around(today, months_back, months_ahead)
        with self._translated(), self.engine.begin() as conn:
            conn.exec_driver_sql(CREATE_TABLES)
            conn.exec_driver_sql(chain.LOCK_ID_FUNCTION)
            for month in months:
                conn.exec_driver_sql(partition_ddl(month))
        return [partition_name(m) for m in months]

    def existing_tables(self, names: list[str]) -> set[str]:
        """Which of these relations exist (on the search path)."""
        with self._translated(), self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT n FROM unnest(CAST(:names AS text[])) AS n "
                     "WHERE to_regclass(n) IS NOT NULL"),
                {"names": names},
            ).scalars()
            return set(rows)

    def missing_tables(self) -> list[str]:
        present = self.existing_tables(list(TABLES))
        return [name for name in TABLES if name not in present]

    # -- internals --

    def _write_table(
        self, table: str, records: Sequence[Record], indexes: list[int], result: WriteResult
    ) -> None:
        # Optimistic pass: the whole group through COPY into a staging table, then one
        # INSERT ... SELECT ... ON CONFLICT DO NOTHING; no savepoint.
        copy = self._copy_allowed()
        try:
            for attempt in range(_RELINKS + 1):
                with self._translated(), self.engine.begin() as conn:
                    if copy:
                        self._copy_insert(conn, table, records, indexes, result)
                    else:
                        self._insert(conn, table, records, indexes, result)
                    if attempt < _RELINKS and _linked_but_skipped(indexes, result):
                        conn.rollback()
                        continue
                    self._check_duplicates(conn, table, records, indexes, result)
                return
        except RejectedError:
            pass
        except DatabaseUnavailable as exc:
            if not (copy and str(exc).startswith("SQLSTATE 42501")):
                raise
            # No TEMP privilege (a hardened database): plain INSERTs work without it. Probed
            # again later: a privilege granted back brings the fast path back.
            self._copy_off_until = time.monotonic() + self.copy_reprobe_seconds
            log.warning("cannot create a staging table; writing with INSERT for a while",
                        extra={"event": "copy_disabled", "error": str(exc),
                               "retry_in_seconds": self.copy_reprobe_seconds})
            self._write_table(table, records, indexes, result)
            return
        # Some row is bad: redo under savepoints, bisecting down to the culprits.
        with self._translated(), self.engine.begin() as conn:
            self._insert_isolating(conn, table, records, indexes, result)

    def _copy_allowed(self) -> bool:
        if not self.copy:
            return False
        if self._copy_off_until and time.monotonic() < self._copy_off_until:
            return False
        if self._copy_off_until:
            self._copy_off_until = 0.0
            log.info("probing the COPY path again", extra={"event": "copy_reprobe"})
        return True

    def _check_duplicates(self, conn: Connection, table: str, records: Sequence[Record],
                          indexes: Sequence[int], result: WriteResult) -> None:
        """A row that already existed counts as written only if it holds the same record:
        a different record under the same key (a reused ID) is a KeyConflict. One query,
        only for batches that met an existing key."""
        dups = [i for i in indexes if result.outcomes[i] is Outcome.DUPLICATE]
        if not dups:
            return
        keys = ", ".join(CONFLICT_KEYS[table])
        for i, c in find_conflicts(conn, table, records, dups).items():
            result.outcomes[i] = Outcome.REJECTED
            if c.missing:
                # Skipped, yet no row holds its key: not a duplicate, whatever skipped it.
                result.errors[i] = RejectedError(
                    f"PostgreSQL skipped the row but no row exists under ({keys})",
                    reason="not_stored", signature=f"not_stored {table}")
                continue
            result.errors[i] = KeyConflict(
                f"a different record already exists under ({keys}): differs in {c.columns}; "
                f"incoming sha256 {c.incoming[:16]}, stored sha256 {c.stored[:16]}",
                details={"incoming_sha256": c.incoming, "stored_sha256": c.stored,
                         "differing_columns": c.columns})

    def _copy_insert(
        self,
        conn: Connection,
        table: str,
        records: Sequence[Record],
        indexes: Sequence[int],
        result: WriteResult,
    ) -> None:
        """COPY the rows straight into the table under a savepoint: one pass, every row
        new (the usual case). If a key exists already (a redelivery, a reused ID), roll
        back to the savepoint and take the staging path, which tells each row's outcome."""
        direct = self._direct_copy_allowed()
        # COPY straight into the table fails whole if any key exists: its rows are linked
        # into their chains as all new, and linked again, looking, if it fails.
        rows, indexes = self._rows(conn, table, records, indexes, result,
                                   look_for_existing=not direct)
        if not rows:
            return
        columns = list(rows[0])
        names = ", ".join(columns)
        data = _encoded(rows, columns)
        cursor = None
        try:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            if direct:
                cursor.execute("SAVEPOINT dlq_direct")
                try:
                    _copy(cursor, f"COPY {table} ({names}) FROM STDIN", data)
                except psycopg2.errors.UniqueViolation:
                    cursor.execute("ROLLBACK TO SAVEPOINT dlq_direct")
                    # Redeliveries come in runs (a restart, a claim): stage for a while.
                    self._direct_off_until = time.monotonic() + self.direct_pause_seconds
                    if table == AUDIT_EVENTS and self._chain is not None:
                        # linked as all new: again, leaving out the keys that exist (the
                        # chains' locks are still held: taken again at once)
                        rows, indexes = self._rows(conn, table, records, indexes, result)
                        if not rows:
                            return
                        data = _encoded(rows, columns)
                else:
                    for i in indexes:
                        result.outcomes[i] = Outcome.WRITTEN
                    return
            returned = self._copy_staged(cursor, table, data, names)
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            conn.invalidate()  # raw DBAPI use: SQLAlchemy cannot see the connection broke
            raise DatabaseUnavailable(f"connection lost: {first_line(exc)}") from exc
        except psycopg2.Error as exc:
            raise classify(exc, table) from exc
        finally:
            if cursor is not None:
                cursor.close()
        _mark(records, indexes, [tuple(str(v) for v in row) for row in returned], result)

    def _direct_copy_allowed(self) -> bool:
        return not self._direct_off_until or time.monotonic() >= self._direct_off_until

    @staticmethod
    def _copy_staged(cursor: Any, table: str, data: str, names: str) -> list[Any]:
        """COPY into a per-connection staging table, then move the rows with one
        INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING <key> (the same outcome as
        _insert, a fraction of the client-side cost). Temporary, emptied at every commit,
        only the columns we write: no defaults (no sequence is drawn twice) and no
        constraints (the real INSERT enforces them all). Created in this transaction
        every time, so a rollback cannot leave a connection believing it has one."""
        stage = f"dlq_stage_{table}"
        keys = ", ".join(CONFLICT_KEYS[table])
        cursor.execute(f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS "
                       f"AS SELECT {names} FROM {table} WITH NO DATA")
        _copy(cursor, f"COPY {stage} ({names}) FROM STDIN", data)
        # The conflict target is the record's own key: a row any other unique constraint
        # refuses (a lagging id sequence) is an error with its reason, never a silent skip.
        cursor.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} "
                       f"ON CONFLICT ({keys}) DO NOTHING RETURNING {keys}")
        return list(cursor.fetchall())

    def _insert(
        self,
        conn: Connection,
        table: str,
        records: Sequence[Record],
        indexes: Sequence[int],
        result: WriteResult,
    ) -> None:
        target = TABLES[table]
        key_cols = [target.c[name] for name in CONFLICT_KEYS[table]]
        stmt = pg_insert(target).on_conflict_do_nothing(
            index_elements=list(CONFLICT_KEYS[table])).returning(*key_cols)
        try:
            rows, indexes = self._rows(conn, table, records, indexes, result)
            if not rows:
                return
            returned = conn.execute(stmt, rows).all()
        except sa_exc.DBAPIError as exc:
            raise translate(exc, table) from exc
        except UNENCODABLE as exc:
            raise unencodable(type(exc).__name__) from exc
        except sa_exc.StatementError as exc:
            # Raised by the driver before the server saw the statement: a value it cannot
            # send. Rows are validated when decoded, so this is one row's problem.
            raise unencodable(type(exc.orig).__name__) from exc
        _mark(records, indexes, [tuple(str(v) for v in row) for row in returned], result)

    def _rows(self, conn: Connection, table: str, records: Sequence[Record],
              indexes: Sequence[int], result: WriteResult, *, look_for_existing: bool = True,
              ) -> tuple[list[dict[str, Any]], Sequence[int]]:
        """The rows to insert and whose they are: the records' values, and with the hash
        chain on, each audit_events row linked into its chain (or left unhashed when late);
        a row whose chain another writer holds is left out, DEFERRED."""
        chainer = self._chainer(conn) if table == AUDIT_EVENTS else None
        if chainer is None:
            return [records[i].values for i in indexes], indexes
        for i in indexes:  # a write done again links again
            result.chained.pop(i, None)
        links, late, deferred = chainer.link(conn, records, indexes,
                                             look_for_existing=look_for_existing)
        for i in deferred:
            result.outcomes[i] = Outcome.DEFERRED
        if deferred:
            skip = set(deferred)
            indexes = [i for i in indexes if i not in skip]
        rows = []
        for i in indexes:
            link = links.get(i)
            rows.append({**records[i].values,
                         "event_hash": link.event_hash if link else None,
                         "previous_event_hash": link.previous_event_hash if link else None,
                         "hash_algorithm": link.hash_algorithm if link else chain.SHA256})
            if link is not None:
                result.chained[i] = True
        for i in late:
            result.chained[i] = False
        return rows, indexes

    def _chainer(self, conn: Connection) -> chain.Chainer | None:
        """The chain mode, decided once: ``auto`` links when the target schema has the
        platform's hash columns and lock function (HMAC when a key is configured)."""
        if self._chain_decided:
            return self._chain
        mode = self.config.hash_chain
        key = self.config.hash_chain_key.encode() if self.config.hash_chain_key else None
        if mode == "auto":
            supported = chain.schema_supports_chain(conn)
            mode = ("hmac" if key else "sha256") if supported else "off"
            log.info("hash chain mode decided from the target schema",
                     extra={"event": "hash_chain", "mode": mode,
                            "schema_has_chain": supported})
        self._chain = None if mode == "off" else chain.Chainer(
            chain.HMAC if mode == "hmac" else chain.SHA256, key if mode == "hmac" else None)
        self._chain_decided = True
        return self._chain

    def _insert_isolating(
        self,
        conn: Connection,
        table: str,
        records: Sequence[Record],
        indexes: list[int],
        result: WriteResult,
    ) -> None:
        tried_months: set[dt.date] = set()
        chainer = self._chainer(conn) if table == AUDIT_EVENTS else None
        if chainer is not None:
            # Every chain of the batch locked once, in sorted order, outside the chunks'
            # savepoints (a savepoint rolled back gives its locks back).
            chainer.lock(conn, [str(records[i].values["correlation_id"]) for i in indexes])
        stack: list[list[int]] = [indexes]
        relinks = 0
        while stack:
            chunk = stack.pop()
            savepoint = conn.begin_nested()
            try:
                self._insert(conn, table, records, chunk, result)
                if relinks < _RELINKS and _linked_but_skipped(chunk, result):
                    relinks += 1
                    savepoint.rollback()
                    stack.append(chunk)
                    continue
                self._check_duplicates(conn, table, records, chunk, result)
                savepoint.commit()
                continue
            except RejectedError as err:
                savepoint.rollback()
                rejection = err
            if (
                isinstance(rejection, MissingPartition)
                and self.config.create_missing_partitions
                and table == AUDIT_EVENTS
            ):
                months = {month_start(records[i].values["event_date"]) for i in chunk}
                todo = sorted(m for m in months - tried_months if self._in_window(m))
                if todo:
                    tried_months.update(todo)
                    result.partitions_created += self._create_partitions(conn, todo)
                    stack.append(chunk)
                    continue
            if len(chunk) == 1:
                if isinstance(rejection, MissingPartition) and not self._in_window(
                        month_start(records[chunk[0]].values["event_date"])):
                    rejection = outside_window(self.config, rejection)
                result.outcomes[chunk[0]] = Outcome.REJECTED
                result.errors[chunk[0]] = rejection
                continue
            middle = len(chunk) // 2
            stack.append(chunk[middle:])
            stack.append(chunk[:middle])

    def _in_window(self, month: dt.date) -> bool:
        """Partitions are created only for months this near today: input never decides
        DDL for year 9999 or year 1 (see database.partition_months_back/_ahead)."""
        return month in partition_window(self.config)

    def _create_partitions(self, conn: Connection, months: list[dt.date]) -> list[str]:
        created: list[str] = []
        for month in months:
            exists = conn.execute(text("SELECT to_regclass(:name) IS NOT NULL"),
                                  {"name": partition_name(month)}).scalar_one()
            if exists:
                continue
            savepoint = conn.begin_nested()
            try:
                conn.exec_driver_sql(partition_ddl(month))
                savepoint.commit()
                created.append(partition_name(month))
                log.warning(
                    "created missing partition",
                    extra={"event": "partition_created", "partition": partition_name(month)},
                )
            except sa_exc.DBAPIError as exc:
                savepoint.rollback()
                if is_disconnect(exc):
                    raise translate(exc, AUDIT_EVENTS) from exc
                # Lacking the privilege, or a concurrent worker created it first: either
                # way the retried insert tells which.
                log.warning(
                    "could not create partition",
                    extra={
                        "event": "partition_create_failed",
                        "partition": partition_name(month),
                        "error": first_line(exc),
                    },
                )
        return created

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except (DatabaseUnavailable, RejectedError):
            raise
        except sa_exc.DBAPIError as exc:
            raise translate(exc) from exc
        except sa_exc.SQLAlchemyError as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {first_line(exc)}") from exc


#: How often a write is redone because a row it linked into a chain was not stored.
_RELINKS = 3


def _copy(cursor: Any, statement: str, data: str) -> None:
    """COPY the text in one piece: psycopg2 reads its file in chunks of ``size`` (8 KiB
    by default, some 60 for a batch of 500 rows), and gives the interpreter lock away
    and waits to have it back for each one, while the loop thread decodes."""
    cursor.copy_expert(statement, io.StringIO(data), size=max(8192, len(data)))


def _encoded(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    try:
        return pgcopy.encode_text(rows, columns)
    except UNENCODABLE as exc:
        raise unencodable(type(exc).__name__) from exc


def _passes(records: Sequence[Record], indexes: Sequence[int]) -> list[list[int]]:
    """The rows in passes that hold each key once: a second record under a key is written
    after the first one is stored, so it meets it as a duplicate or a conflict, and is
    never linked into a chain it will not be stored in."""
    passes: list[list[int]] = []
    seen: dict[tuple[Any, ...], int] = {}
    for i in indexes:
        key = tuple(records[i].key)
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n == len(passes):
            passes.append([])
        passes[n].append(i)
    return passes


def _linked_but_skipped(indexes: Sequence[int], result: WriteResult) -> bool:
    """A row linked into its chain that the database did not store: another writer
    stored its key first (under another chain, so no lock kept the two apart). Later
    rows of its chain would point at a row that does not exist: link again, and the
    key, committed now, is left out."""
    return any(result.chained.get(i) and result.outcomes[i] is Outcome.DUPLICATE
               for i in indexes)


def _mark(records: Sequence[Record], indexes: Sequence[int], returned: list[tuple[str, ...]],
          result: WriteResult) -> None:
    """New rows (their keys came back from RETURNING) are written; the others existed."""
    new_keys = set(returned)
    for i in indexes:
        key = tuple(str(v) for v in records[i].key)
        if key in new_keys:
            new_keys.discard(key)
            result.outcomes[i] = Outcome.WRITTEN
        else:
            result.outcomes[i] = Outcome.DUPLICATE


def check_connection(config: DatabaseConfig) -> None:
    """Fail fast with a StartupError if the database cannot be reached."""
    sink = Sink(config)
    try:
        sink.ping()
    except DatabaseUnavailable as exc:
        raise StartupError(
            f"PostgreSQL at {config.host}:{config.port}/{config.name}: {exc}"
        ) from exc
    finally:
        sink.close()


def partition_window(config: DatabaseConfig, today: dt.date | None = None) -> list[dt.date]:
    """The months whose partition the worker may create, around today (UTC)."""
    today = today or dt.datetime.now(dt.UTC).date()
    return months_around(today, config.partition_months_back, config.partition_months_ahead)


def outside_window(config: DatabaseConfig, err: RejectedError) -> RejectedError:
    return RejectedError(
        f"{err}; the row's month is outside the partition window "
        f"({config.partition_months_back} months back, {config.partition_months_ahead} ahead)",
        reason="outside_partition_window", sqlstate=err.sqlstate,
        signature=f"{err.signature} outside_window")



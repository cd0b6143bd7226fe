"""PostgreSQL as the sink uses it: the engine (every wait bounded, parameters never in an
error), and every driver error translated: DatabaseUnavailable when the server is the
problem, RejectedError (with its reason, see classify.py) when a row is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

from dlq_worker.config import DatabaseConfig
from dlq_worker.drain.classify import classify_database_error
from dlq_worker.drain.decode import dumps_exact
from dlq_worker.errors import (
    DatabaseUnavailable,
    RejectedError,
)


def database_url(config: DatabaseConfig) -> URL:
    query: dict[str, str] = {"sslmode": config.sslmode}
    for name in ("sslrootcert", "sslcert", "sslkey"):
        if getattr(config, name):
            query[name] = getattr(config, name)
    return URL.create(
        "postgresql+psycopg2",
        username=config.user,
        password=config.password or None,
        host=config.host,
        port=config.port,
        database=config.name,
        query=query,
    )


def make_engine(config: DatabaseConfig) -> Engine:
    timeouts = " ".join(f"-c {name}={int(float(value) * 1000)}" for name, value in (
        ("statement_timeout", config.statement_timeout),
        ("lock_timeout", config.lock_timeout),
        ("idle_in_transaction_session_timeout", config.idle_in_transaction_timeout)))
    return create_engine(
        database_url(config),
        # Payloads are audit data: SQLAlchemy must never put parameters in an error message.
        hide_parameters=True,
        # jsonb values keep every digit (decoded numbers may be Decimal).
        json_serializer=dumps_exact,
        pool_size=2,
        max_overflow=2,
        pool_recycle=1800,
        connect_args={
            "connect_timeout": max(1, int(config.connect_timeout)),
            "application_name": "dlq-worker",
            # Every wait bounded: a statement, a lock, and a session of ours left idle
            # inside a transaction (a frozen worker's locks are released by the server).
            "options": timeouts,
            # A vanished server is noticed in ~1 min instead of the kernel's hours.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        },
    )


#: What psycopg2 raises, unwrapped, for a value it cannot encode.
UNENCODABLE = (UnicodeError, ValueError, TypeError, OverflowError)


def unencodable(kind: str) -> RejectedError:
    return RejectedError(f"value cannot be sent to PostgreSQL: {kind}", reason="unencodable")


def translate(exc: sa_exc.DBAPIError, table: str | None = None,
               ) -> DatabaseUnavailable | RejectedError:
    if is_disconnect(exc):
        return DatabaseUnavailable(f"connection lost: {first_line(exc)}")
    return classify(exc.orig, table)


def classify(orig: Any, table: str | None) -> DatabaseUnavailable | RejectedError:
    diag = getattr(orig, "diag", None)
    return classify_database_error(
        getattr(orig, "pgcode", None), first_line(orig),
        constraint=getattr(diag, "constraint_name", None),
        column=getattr(diag, "column_name", None),
        # The logical table, not the partition PostgreSQL names (audit_events_2026_08):
        # one cause across a month's end must stay one signature.
        table=table or getattr(diag, "table_name", None))


def is_disconnect(exc: sa_exc.DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "pgcode", None) or ""
    return bool(exc.connection_invalidated) or sqlstate.startswith(("08", "57P"))


def first_line(exc: BaseException) -> str:
    """The driver's first line: no SQL, no parameters."""
    orig: Any = getattr(exc, "orig", None) or exc
    text_ = str(orig).strip()
    return text_.splitlines()[0][:240] if text_ else type(orig).__name__

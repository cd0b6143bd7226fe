"""The target tables: SQLAlchemy Core definitions for writing, DDL for ``db init``.

The worker writes only the columns below and lets the database fill the rest
(hash columns, legal hold, created_at...), so it runs against a schema the Data
Storage service created as well as against one made by ``dlq-worker db init``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import INET, JSONB, UUID
from sqlalchemy.engine import Dialect

from dlq_worker.drain.decode import AUDIT_EVENTS, NOTIFICATION_AUDIT, dumps_exact

metadata = MetaData()


class ExactJsonb(TypeDecorator[Any]):
    """jsonb sent as the decoder's JSON text (``Jsonb``: the producer's own, every digit),
    whatever JSON serializer the engine was made with."""

    impl = JSONB
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], str | None]:
        return lambda value: None if value is None else dumps_exact(value)

audit_events = Table(
    AUDIT_EVENTS,
    metadata,
    Column("event_id", UUID(as_uuid=False), primary_key=True),
    Column("event_version", String(10), nullable=False),
    Column("event_timestamp", DateTime(timezone=True), nullable=False),
    Column("event_date", Date, primary_key=True),
    Column("event_type", String(100), nullable=False),
    Column("event_category", String(50), nullable=False),
    Column("event_action", String(50), nullable=False),
    Column("event_outcome", String(20), nullable=False),
    Column("actor_type", String(50), nullable=False),
    Column("actor_id", String(255), nullable=False),
    Column("actor_ip", INET),
    Column("resource_type", String(100), nullable=False),
    Column("resource_id", String(255), nullable=False),
    Column("resource_name", String(255)),
    Column("correlation_id", String(255), nullable=False),
    Column("parent_event_id", UUID(as_uuid=False)),
    Column("parent_event_date", Date),
    Column("trace_id", String(255)),
    Column("span_id", String(255)),
    Column("namespace", String(253)),
    Column("cluster_id", String(255)),
    # none_as_null: an absent value is SQL NULL, as the COPY path writes it, never the JSON
    # value null (SQLAlchemy's default for JSON types).
    Column("event_data", ExactJsonb(none_as_null=True), nullable=False),
    Column("event_metadata", ExactJsonb(none_as_null=True)),
    Column("severity", String(20)),
    Column("duration_ms", Integer),
    Column("error_code", String(50)),
    Column("error_message", Text),
    Column("retention_days", Integer),
    Column("is_sensitive", Boolean),
    # The platform's hash chain (written only with the chain on; see chain/link.py).
    Column("event_hash", Text),
    Column("previous_event_hash", Text),
    Column("hash_algorithm", String(20)),
)

notification_audit = Table(
    NOTIFICATION_AUDIT,
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("remediation_id", String(255), nullable=False),
    Column("notification_id", String(255), nullable=False, unique=True),
    Column("recipient", String(255), nullable=False),
    Column("channel", String(50), nullable=False),
    Column("message_summary", Text, nullable=False),
    Column("status", String(50), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False),
    Column("delivery_status", Text),
    Column("error_message", Text),
    Column("escalation_level", Integer, nullable=False),
)

TABLES = {AUDIT_EVENTS: audit_events, NOTIFICATION_AUDIT: notification_audit}

#: The columns that make each insert idempotent (ON CONFLICT target).
CONFLICT_KEYS: dict[str, tuple[str, ...]] = {
    AUDIT_EVENTS: ("event_id", "event_date"),
    NOTIFICATION_AUDIT: ("notification_id",),
}

CREATE_TABLES = """
CREATE TABLE IF NOT EXISTS audit_events (
    event_id uuid NOT NULL,
    event_version varchar(10) NOT NULL DEFAULT '1.0',
    event_timestamp timestamptz NOT NULL,
    event_date date NOT NULL,
    event_type varchar(100) NOT NULL,
    event_category varchar(50) NOT NULL,
    event_action varchar(50) NOT NULL,
    event_outcome varchar(20) NOT NULL,
    actor_type varchar(50) NOT NULL,
    actor_id varchar(255) NOT NULL,
    actor_ip inet,
    resource_type varchar(100) NOT NULL,
    resource_id varchar(255) NOT NULL,
    resource_name varchar(255),
    correlation_id varchar(255) NOT NULL,
    parent_event_id uuid,
    parent_event_date date,
    trace_id varchar(255),
    span_id varchar(255),
    namespace varchar(253),
    cluster_id varchar(255),
    event_data jsonb NOT NULL,
    event_metadata jsonb,
    severity varchar(20),
    duration_ms integer,
    error_code varchar(50),
    error_message text,
    retention_days integer DEFAULT 2555 CHECK (retention_days BETWEEN 1 AND 2555),
    is_sensitive boolean DEFAULT false,
    event_hash text,
    previous_event_hash text,
    hash_algorithm varchar(20) NOT NULL DEFAULT 'sha256-unkeyed',
    legal_hold boolean DEFAULT false,
    legal_hold_reason text,
    legal_hold_placed_by text,
    legal_hold_placed_at timestamptz,
    PRIMARY KEY (event_id, event_date),
    FOREIGN KEY (parent_event_id, parent_event_date)
        REFERENCES audit_events (event_id, event_date)
) PARTITION BY RANGE (event_date);

CREATE OR REPLACE FUNCTION audit_events_immutable() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_events rows are immutable';
END
$$ LANGUAGE plpgsql;

CREATE INDEX IF NOT EXISTS audit_events_correlation_idx
    ON audit_events (correlation_id, event_timestamp DESC);

DROP TRIGGER IF EXISTS audit_events_no_update ON audit_events;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_immutable();

CREATE TABLE IF NOT EXISTS notification_audit (
    id bigserial PRIMARY KEY,
    remediation_id varchar(255) NOT NULL,
    notification_id varchar(255) NOT NULL UNIQUE,
    recipient varchar(255) NOT NULL,
    channel varchar(50) NOT NULL
        CHECK (channel IN ('slack', 'pagerduty', 'teams', 'console', 'file', 'log')),
    message_summary text NOT NULL,
    status varchar(50) NOT NULL
        CHECK (status IN ('sent', 'failed', 'acknowledged', 'escalated')),
    sent_at timestamptz NOT NULL,
    delivery_status text,
    error_message text,
    escalation_level integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""


def month_start(day: dt.date) -> dt.date:
    return day.replace(day=1)


def add_months(day: dt.date, months: int) -> dt.date:
    index = day.year * 12 + (day.month - 1) + months
    return dt.date(index // 12, index % 12 + 1, 1)


def partition_name(month: dt.date) -> str:
    return f"{AUDIT_EVENTS}_{month.year:04d}_{month.month:02d}"


def partition_ddl(month: dt.date) -> str:
    """DDL for the monthly partition holding ``month`` (idempotent)."""
    start = month_start(month)
    end = add_months(start, 1)
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(start)} PARTITION OF {AUDIT_EVENTS} "
        f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    )


def months_around(today: dt.date, back: int, ahead: int) -> list[dt.date]:
    start = month_start(today)
    return [add_months(start, k) for k in range(-back, ahead + 1)]

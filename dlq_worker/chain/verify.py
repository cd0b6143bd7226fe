"""How a chain is verified: the walk the platform's verify-chain makes, row by row."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, text

from dlq_worker.chain.link import HMAC, SHA256, event_hash, go_event_data, hashed_json

_ROW_COLUMNS = (
    "event_id::text AS event_id, event_timestamp, event_type, event_version, event_category, "
    "event_action, event_outcome, correlation_id, parent_event_id::text AS parent_event_id, "
    "parent_event_date, resource_type, resource_id, namespace, cluster_id, actor_id, "
    "actor_type, actor_ip::text AS actor_ip, severity, duration_ms, error_code, error_message, "
    "retention_days, is_sensitive, event_data::text AS event_data, event_hash, "
    "previous_event_hash, hash_algorithm")


@dataclass
class ChainReport:
    correlation_id: str
    total_events: int = 0
    verified_events: int = 0
    skipped_null_hash: int = 0
    tampered: list[tuple[str, str]] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.tampered


def verify(conn: Connection, correlation_ids: Sequence[str], key: bytes | None,
           ) -> list[ChainReport]:
    """Walk each chain as the platform's verifier does: hashed rows by event_timestamp then
    event_id, a running previous hash, and two checks per row (its previous_event_hash,
    its recomputed event_hash). Unhashed rows are counted and left out."""
    reports = []
    for cid in correlation_ids:
        report = ChainReport(cid)
        rows = conn.execute(text(
            f"SELECT {_ROW_COLUMNS} FROM audit_events WHERE correlation_id = :c "
            "ORDER BY event_timestamp, event_id"), {"c": cid}).mappings().all()
        previous = ""
        for row in rows:
            if row["event_hash"] is None:
                report.skipped_null_hash += 1
                continue
            report.total_events += 1
            view = dict(row)
            view["event_timestamp"] = row["event_timestamp"].astimezone(dt.UTC)
            view["event_data"] = go_event_data(row["event_data"])
            algorithm = row["hash_algorithm"] or SHA256
            if algorithm == HMAC and not key:
                raise ValueError(f"event {row['event_id']} is {HMAC}: a key is needed")
            if algorithm not in (SHA256, HMAC):
                raise ValueError(f"event {row['event_id']}: unknown hash_algorithm")
            expected = event_hash(previous, hashed_json(view),
                                  key if algorithm == HMAC else None)
            if row["previous_event_hash"] != previous:
                report.tampered.append((row["event_id"], "previous hash mismatch"))
            if row["event_hash"] != expected:
                report.tampered.append((row["event_id"], "event hash mismatch: tampered"))
            else:
                report.verified_events += 1
            previous = row["event_hash"]
        reports.append(report)
    return reports


def correlation_ids_since(conn: Connection, since: dt.datetime) -> list[str]:
    return list(conn.execute(text(
        "SELECT DISTINCT correlation_id FROM audit_events WHERE event_timestamp >= :t "
        "ORDER BY 1"), {"t": since}).scalars())

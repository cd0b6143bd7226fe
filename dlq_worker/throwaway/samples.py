"""Realistic audit records in the contract's shape, for the demo, tests and benchmarks."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from typing import Any

from dlq_worker.producer import go_timestamp

_EVENT_TYPES = [
    ("gateway.signal.received", "gateway", "received"),
    ("remediation.workflow.started", "remediation", "started"),
    ("remediation.workflow.completed", "remediation", "completed"),
    ("ai.analysis.requested", "analysis", "requested"),
    ("notification.sent", "notification", "sent"),
]
_CHANNELS = ["slack", "pagerduty", "teams", "console", "file", "log"]
_STATUSES = ["sent", "failed", "acknowledged", "escalated"]


def audit_event(rng: random.Random | None = None, *, full: bool = False,
                when: dt.datetime | None = None) -> dict[str, Any]:
    """An audit_event payload (before base64): ~600 bytes of event_data."""
    rng = rng or random.Random()
    kind, category, action = rng.choice(_EVENT_TYPES)
    when = when or dt.datetime.now(dt.UTC)
    n = rng.randrange(1_000_000)
    record: dict[str, Any] = {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "version": "1.0",
        "event_timestamp": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "event_type": kind,
        "event_category": category,
        "event_action": action,
        "event_outcome": rng.choice(["success", "failure", "pending"]),
        "actor_type": "service",
        "actor_id": f"{category}-service",
        "resource_type": "Signal",
        "resource_id": f"fp-{n:06x}",
        "correlation_id": f"rr-{when.year}-{n:06d}",
        "namespace": "default",
        "event_data": {
            "namespace": "default",
            "signal_name": rng.choice(["HighCPU", "OOMKilled", "DiskPressure", "CrashLoop"]),
            "fingerprint": f"{rng.getrandbits(160):040x}",
            "labels": {f"label_{i}": f"value-{rng.getrandbits(32):08x}" for i in range(8)},
            "annotations": {"summary": "x" * rng.randrange(150, 250),
                            "runbook": "https://runbooks.example/" + "r" * 20},
            "severity": rng.choice(["critical", "warning", "info"]),
        },
        "severity": rng.choice(["info", "warning", "critical"]),
        "duration_ms": rng.randrange(1, 5000),
        "retention_days": 2555,
        "is_sensitive": rng.random() < 0.1,
    }
    if full:
        record.update({
            "actor_ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            "resource_name": f"deployment/app-{n}",
            "trace_id": f"{rng.getrandbits(128):032x}",
            "span_id": f"{rng.getrandbits(64):016x}",
            "cluster_id": "cluster-eu-1",
            "event_metadata": {"source": "dlq-demo", "attempt": rng.randrange(1, 4)},
            "error_code": "E_TIMEOUT",
            "error_message": "upstream timed out",
        })
    return record


def notification(rng: random.Random | None = None) -> dict[str, Any]:
    """A notification_audit payload with the zero values producers also send."""
    rng = rng or random.Random()
    return {
        "id": 0,
        "remediation_id": f"rr-{rng.randrange(10**6):06d}",
        "notification_id": f"notif-{uuid.UUID(int=rng.getrandbits(128), version=4)}",
        "recipient": rng.choice(["#ops-alerts", "oncall@example.com", "pd-service-42"]),
        "channel": rng.choice(_CHANNELS),
        "message_summary": "Remediation workflow finished: " + "s" * rng.randrange(20, 120),
        "status": rng.choice(_STATUSES),
        "sent_at": go_timestamp(),
        "delivery_status": rng.choice([None, "delivered", "queued"]),
        "error_message": None,
        "escalation_level": rng.randrange(0, 3),
        "created_at": "0001-01-01T00:00:00Z",
        "updated_at": "0001-01-01T00:00:00Z",
    }


def contract_example(event_timestamp: str = "2026-08-22T18:08:55.412345Z") -> bytes:
    """The example message of the DLQ contract, byte for byte (timestamp replaceable)."""
    return (
        b'{"type":"audit_event","payload":{"event_id":"3f1c2b9e-7a4d-4c1e-9b2a-5d6e7f801234",'
        b'"version":"1.0","event_timestamp":"' + event_timestamp.encode() + b'",'
        b'"event_type":"gateway.signal.received","event_category":"gateway",'
        b'"event_action":"received","event_outcome":"success","actor_type":"service",'
        b'"actor_id":"gateway-service","resource_type":"Signal","resource_id":"fp-abc123",'
        b'"correlation_id":"rr-2026-001","namespace":"default",'
        b'"event_data":"eyJuYW1lc3BhY2UiOiJkZWZhdWx0Iiwic2lnbmFsX25hbWUiOiJIaWdoQ1BVIn0=",'
        b'"severity":"info","duration_ms":12,"retention_days":2555,"is_sensitive":false},'
        b'"timestamp":"2026-08-22T18:08:56.123456789Z","retry_count":0,'
        b'"last_error":"database write failed"}'
    )


#: Malformed entries as they can really arrive: each must be parked with its reason.
POISON_MESSAGES: list[bytes] = [
    b"not json at all",
    b'{"type":"audit_event","payload":{"event_id":"not-a-uuid"}}',
    b'{"type":"audit_event","payload":"{\\"truncated\\": ',
    b'{"type":"notification_audit","payload":{"notification_id":"n1","channel":"fax"}}',
    b"[1,2,3]",
]

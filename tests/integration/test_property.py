"""A property over the whole path: generated entries, valid and hostile, decoded, written
to real PostgreSQL or parked in real Redis by one running worker.

Invariant, for every generated entry: it ends as exactly one row or exactly one parked
entry; nothing is left in the stream or pending; the worker never dies.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from dlq_worker import producer
from dlq_worker.throwaway import samples
from tests.conftest import EVENTS, Bed, wait_until

DEAD = "audit:dead-letter:events"

#: Values PostgreSQL and the decoder must both survive: NUL, lone surrogates, huge
#: numbers, deep nesting, wrong types.
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(["\x00", "\ud800", "\\"]),
            max_size=300),
)
_json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                            max_leaves=10)

_FIELDS = ["event_id", "version", "event_timestamp", "event_type", "event_category",
           "event_action", "event_outcome", "actor_type", "actor_id", "actor_ip",
           "resource_type", "resource_id", "resource_name", "correlation_id",
           "parent_event_id", "trace_id", "namespace", "event_data", "event_metadata",
           "severity", "duration_ms", "retention_days", "is_sensitive"]


@st.composite
def entries(draw: Any) -> tuple[bytes, str]:
    """(message, event_id): a valid record, one with a field changed or removed, a record
    with a timestamp anywhere in 0001..9999, or bytes that are not a record at all."""
    record = samples.audit_event(random.Random(draw(st.integers(0, 2**32))))
    record["event_id"] = event_id = str(uuid.uuid4())
    kind = draw(st.sampled_from(["valid", "mutate", "drop", "timestamp", "data", "raw"]))
    if kind == "mutate":
        record[draw(st.sampled_from(_FIELDS[1:]))] = draw(_json_values)
    elif kind == "drop":
        record.pop(draw(st.sampled_from(_FIELDS[1:])), None)
    elif kind == "timestamp":
        moment = draw(st.datetimes(timezones=st.just(__import__("datetime").UTC)))
        record["event_timestamp"] = moment.isoformat().replace("+00:00", "Z")
    elif kind == "data":
        raw = draw(st.one_of(st.binary(max_size=50),
                             _json_values.map(lambda v: json.dumps(v).encode())))
        record["event_data"] = base64.b64encode(raw).decode()
    elif kind == "raw":
        return draw(st.binary(max_size=200)), event_id
    return producer.build_message(producer.AUDIT_EVENT, record), event_id


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(entries(), min_size=1, max_size=12))
def test_every_generated_entry_ends_as_one_row_or_one_parked_entry(
        batch: list[tuple[bytes, str]], bed: Bed, start_worker: Any) -> None:
    worker = _worker(bed, start_worker)
    ids = {}
    for message, event_id in batch:
        ids[bed.client.xadd(EVENTS, {"message": message}).decode()] = event_id
    wait_until(lambda: bed.drained(EVENTS), 60, "drained")

    parked = {f[b"original_id"].decode(): f for f in bed.parked(DEAD)}
    with bed.engine.connect() as conn:
        rows = dict(conn.execute(text(
            "SELECT event_id::text, count(*) FROM audit_events WHERE event_id::text = "
            "ANY(:ids) GROUP BY 1"), {"ids": list(ids.values())}).all())
    for entry_id, event_id in ids.items():
        ended = rows.get(event_id, 0) + (1 if entry_id in parked else 0)
        assert ended == 1, (entry_id, rows.get(event_id), parked.get(entry_id))
        if entry_id in parked:
            assert parked[entry_id][b"reason"], "parked without a reason"
    assert worker.thread.is_alive()
    assert worker.metric("dlq_worker_internal_errors_total", stage="loop") == 0


_running: dict[str, Any] = {}


def _worker(bed: Bed, start_worker: Any) -> Any:
    """One worker for all examples of a run (the fixtures are the test's, not per example)."""
    if _running.get("db") != bed.dbname:
        _running.clear()
        _running.update(db=bed.dbname, worker=start_worker(worker={
            "max_deliveries": 2, "reject_retry_initial": "50ms", "reject_retry_max": "100ms",
            "systemic_after": 1000}))
    return _running["worker"]

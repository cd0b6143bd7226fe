"""The hash chain's fast paths against the general Go encoder they stand in for (which
tests/chain holds against Go itself): the same bytes for any value and any row."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping
from typing import Any

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from dlq_worker import chain, producer
from dlq_worker.chain import gojson
from dlq_worker.drain import decode
from dlq_worker.errors import DecodeError
from dlq_worker.throwaway import samples

_strings = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"])
                   | st.sampled_from(["<", ">", "&", "\u2028", "\u2029", "\b", "\x01", "\\",
                                      '"', "é", "😀"]), max_size=12)
_scalars = st.one_of(st.none(), st.booleans(), _strings,
                     st.integers(-(2**70), 2**70), st.integers(-(2**53) - 2, 2**53 + 2),
                     st.floats(allow_nan=False, allow_infinity=False))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(_strings, inner, max_size=4), max_leaves=20)
#: What most audit payloads hold (the fast path's own ground): no floats, no big integers.
_plain_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _strings, st.integers(-(2**53), 2**53)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_strings, inner, max_size=4),
    max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_strings, _values | _plain_values, max_size=6))
@example({"a": "&"})
@example({"<": 1})
@example({"a": "\u2029", "b": [2**53, -(2**53)]})
@example({"a": 2**53 + 1})
def test_fast_marshal_is_the_general_encoders_bytes(value: dict[str, Any]) -> None:
    parts: list[str] = []
    gojson._encode(gojson.go_value(value), parts)
    assert gojson.dumps_unmarshalled(value) == "".join(parts)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.booleans(), st.dictionaries(_strings, _values, max_size=4),
       st.sampled_from([None, "", "x<y>&z", "\u2028"]), st.sampled_from([None, 0, 7]))
def test_hashed_row_is_the_general_encoders_bytes(seed: int, full: bool, data: dict[str, Any],
                                                  text: str | None, duration: int | None,
                                                  ) -> None:
    record = samples.audit_event(random.Random(seed), full=full)
    values = decode.decode_entry(decode.AUDIT_EVENTS, {b"message": producer.build_message(
        producer.AUDIT_EVENT, record)}).values
    view = chain.stored_view(values, values["event_data"], values.get("actor_ip"))
    view.update(event_data=data, severity=text, error_message=text, duration_ms=duration,
                parent_event_date=dt.date(2026, 1, 2) if full else None)
    assert chain.hashed_json(view) == hashed_json_struct(view)


def hashed_json_struct(row: Mapping[str, Any]) -> bytes:
    """``chain.hashed_json`` through the general encoder: the Go struct as declared."""
    g = gojson
    parent_date = row.get("parent_event_date")
    data = row.get("event_data")
    return g.dumps(g.Struct([
        g.Field("event_id", row["event_id"]),
        g.Field("event_timestamp", g.Time(row["event_timestamp"])),
        g.Field("event_date", None),
        g.Field("event_type", row["event_type"]),
        g.Field("version", row["event_version"]),
        g.Field("event_category", row["event_category"]),
        g.Field("event_action", row["event_action"]),
        g.Field("event_outcome", row["event_outcome"]),
        g.Field("correlation_id", row["correlation_id"]),
        g.Field("parent_event_id", row.get("parent_event_id")),
        g.Field("parent_event_date", None if parent_date is None else g.Time(
            dt.datetime(parent_date.year, parent_date.month, parent_date.day, tzinfo=dt.UTC))),
        g.Field("resource_type", row.get("resource_type") or "", omitempty=True),
        g.Field("resource_id", row.get("resource_id") or "", omitempty=True),
        g.Field("namespace", row.get("namespace") or "", omitempty=True),
        g.Field("cluster_name", row.get("cluster_id") or "", omitempty=True),
        g.Field("severity", row.get("severity") or "", omitempty=True),
        g.Field("duration_ms", row.get("duration_ms") or 0, omitempty=True),
        g.Field("error_code", row.get("error_code") or "", omitempty=True),
        g.Field("error_message", row.get("error_message") or "", omitempty=True),
        g.Field("actor_id", row.get("actor_id") or "", omitempty=True),
        g.Field("actor_type", row.get("actor_type") or "", omitempty=True),
        g.Field("actor_ip", row.get("actor_ip") or "", omitempty=True),
        g.Field("retention_days", int(row["retention_days"])),
        g.Field("is_sensitive", bool(row["is_sensitive"])),
        g.Field("event_hash", ""),
        g.Field("previous_event_hash", ""),
        g.Field("hash_algorithm", "", omitempty=True),
        g.Field("legal_hold", False),
        g.Field("legal_hold_reason", ""),
        g.Field("legal_hold_placed_by", ""),
        g.Field("legal_hold_placed_at", None),
        g.Field("event_data", None if data is None else g.go_value(data)),
    ]))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32), st.booleans(),
       st.sampled_from([None, "10.0.0.1", "192.168.001.1", "::1", "10.0.0.1/32", "0.0.0.0"]),
       st.dictionaries(_strings, _values, max_size=4))
def test_hash_input_made_before_the_write_is_the_writers(seed: int, full: bool,
                                                         actor_ip: str | None,
                                                         data: dict[str, Any]) -> None:
    # Given a decoded audit event with any actor_ip form and any event_data
    record = samples.audit_event(random.Random(seed), full=full)
    record["actor_ip"] = actor_ip
    record["event_data"] = data
    try:
        decoded = decode.decode_entry(decode.AUDIT_EVENTS, {
            b"message": producer.build_message(producer.AUDIT_EVENT, record)})
    except DecodeError:
        assume(False)  # (a NUL in the generated text: parked, never linked)
    # When its hash input is made outside the writing transaction
    linked = chain.with_hashed(decoded)
    made = linked.hashed
    assert linked == decoded  # the same record otherwise, every field
    # Then it is made only where the database is not needed (an address PostgreSQL would
    # print otherwise, a number beyond float64), and then it is the writer's bytes
    canonical = actor_ip in (None, "10.0.0.1", "0.0.0.0")
    values = decoded.values
    view = chain.stored_view(values, values["event_data"],
                             values["actor_ip"] + "/32" if values["actor_ip"] else None)
    try:
        expected: bytes | None = chain.hashed_json(view)
    except ValueError:
        expected = None
    assert made == (expected if canonical else None)

"""The hash chain's fast paths against the general Go encoder they stand in for (which
tests/chain holds against Go itself): the same bytes for any value and any row."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from dlq_worker import chain, decode, gojson, producer, samples

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
    assert chain.hashed_json(view) == chain.hashed_json_struct(view)

"""The COPY text encoder against real PostgreSQL: whatever a value holds (tabs, line
breaks, backslashes, the text ``\\N``), it reads back exactly as it was, and NULL stays
NULL. The encoder skips escaping for rows that need none, so both paths are exercised."""

from __future__ import annotations

import io
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlq_worker.drain import pgcopy
from dlq_worker.drain.decode import Jsonb
from tests.conftest import Bed

_TRICKY = st.sampled_from(["\t", "\n", "\r", "\\", "\\N", "\\t", " ", "é", "\u2028", "a"])
_piece = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8) | _TRICKY
_plain = st.lists(_piece, max_size=6).map("".join)
_text = st.one_of(st.none(), _plain)
_json = st.one_of(st.none(), st.dictionaries(
    _plain, st.one_of(st.integers(-(2**60), 2**60), st.booleans(), _text), max_size=4))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_text, _text, _json, st.one_of(st.none(), st.integers(-5, 5))),
                min_size=1, max_size=8))
def test_every_value_reads_back_as_it_was(bed: Bed,
                                          rows: list[tuple[Any, Any, Any, Any]]) -> None:
    # Given rows of hostile text, JSON (as the decoder hands it on) and NULLs
    columns = ["a", "b", "j", "n"]
    values = [{"a": a, "b": b, "j": None if j is None else Jsonb(json.dumps(j), j), "n": n}
              for a, b, j, n in rows]
    raw = bed.engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute("CREATE TEMPORARY TABLE copied (o serial, a text, b text, j jsonb, "
                        "n int)")
            # When the encoder's text is COPYed in
            cur.copy_expert("COPY copied (a, b, j, n) FROM STDIN",
                            io.StringIO(pgcopy.encode_text(values, columns)))
            cur.execute("SELECT a, b, j, n FROM copied ORDER BY o")
            back = cur.fetchall()
        raw.rollback()
    finally:
        raw.close()
    # Then every value reads back exactly, NULL as NULL
    assert back == [(a, b, j, n) for a, b, j, n in rows]


def test_jsonb_text_with_raw_whitespace_and_escapes_reads_back(bed: Bed) -> None:
    # Given jsonb whose own text holds what COPY must escape: JSON whitespace (tab, line
    # break, carriage return) between tokens, and escapes inside strings. The encoder's
    # first pass takes that text as it is and relies on the joined line's check.
    texts = ['{"a":\t1}', '{\n"b": [1,\r\n2]}', '{"c": "tab\\there \\\\ \\n"}', '{"d": "\\\\N"}']
    values = [{"j": Jsonb(t, json.loads(t)), "s": "plain"} for t in texts]
    raw = bed.engine.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.execute("CREATE TEMPORARY TABLE copied (o serial, j jsonb, s text)")
            # When the encoder's text is COPYed in
            cur.copy_expert("COPY copied (j, s) FROM STDIN",
                            io.StringIO(pgcopy.encode_text(values, ["j", "s"])))
            cur.execute("SELECT j, s FROM copied ORDER BY o")
            back = cur.fetchall()
        raw.rollback()
    finally:
        raw.close()
    # Then each document reads back as the one its text holds
    assert back == [(json.loads(t), "plain") for t in texts]

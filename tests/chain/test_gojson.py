"""Byte-level vectors: Go's encoding/json (the verifier program) against dlq_worker.gojson."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from dlq_worker.chain import gojson
from tests.chain.conftest import run

pytestmark = pytest.mark.go

VECTORS = [
    # floats: plain and exponent ranges, shortest digits, negative zero, extremes
    '{"f":[0.1,0.2,0.3,1e-7,1e-6,9.999e-7,1e20,1e21,1.5e21,123456.789,-0.0,5e-324,'
    '1.7976931348623157e308,100,1e2,2.5e-5,1e16,12345678901234567,0.000001]}',
    # integers: all float64 in Go, so big ones round
    '{"i":[0,1,-1,9007199254740993,123456789012345678901234567890,18446744073709551615]}',
    # HTML characters, quotes, backslashes, control characters, line separators, unicode
    '{"s":"<a href=\\"x\\">&amp;</a> \\\\ / \\n\\r\\t \\u0001 \\u001f \\u007f",'
    '"t":"\\u2028\\u2029 é ü 漢字 😀 \\ud83d\\ude00"}',
    # nested maps with unsorted keys, unicode keys, arrays of mixed types, null, bools
    '{"z":{"b":[1,"x",null,true,false,{"y":1,"a":2}],"a":{}},"é":1,"Z":2,"a":[],"":0}',
    # keys that sort differently by bytes than by code points
    '{"\\u00e9":1,"z":2,"\\ud83d\\ude00":3,"\\uffff":4,"A":5}',
    "[]",
    "{}",
]


def test_go_encoding_of_decoded_json_matches_byte_for_byte(verifier: Path) -> None:
    expected = run(verifier, "vectors", VECTORS)
    for text, go in zip(VECTORS, expected, strict=True):
        ours = gojson.dumps(gojson.go_value(json.loads(text, parse_float=Decimal)))
        assert ours.decode() == go, text
        # the fast path too, from either parser the decoder uses
        assert gojson.dumps_unmarshalled(json.loads(text, parse_float=Decimal)) == go, text
        assert gojson.dumps_unmarshalled(orjson.loads(text)) == go, text


def test_time_encoding_matches(verifier: Path) -> None:
    stamps = ["2026-08-22T18:08:56.123456Z", "2026-08-22T18:08:56Z",
              "2026-08-22T18:08:56.100000Z", "2026-01-01T00:00:00.000001Z",
              "2026-08-22T23:30:00.5+05:30", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z"]
    expected = run(verifier, "times", stamps)
    for stamp, go in zip(stamps, expected, strict=True):
        moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert gojson.dumps(gojson.Time(moment)).decode() == go, stamp


def test_struct_fields_keep_order_and_omitempty_drops_zero_values() -> None:
    value = gojson.Struct([gojson.Field("b", 0), gojson.Field("a", "", omitempty=True),
                           gojson.Field("c", None), gojson.Field("d", 0, omitempty=True),
                           gojson.Field("e", {"y": 1.0, "x": [True]}),
                           gojson.Field("f", False, omitempty=True)])
    assert gojson.dumps(value) == b'{"b":0,"c":null,"e":{"x":[true],"y":1}}'


def test_go_1_22_escapes_backspace_and_form_feed_short() -> None:
    # Go 1.22 and later (the platform's) write \b and \f; Go 1.19 (Debian's, which builds
    # the verifier here) wrote \u0008 and \u000c: so these two are not in the Go vectors.
    assert gojson.string("\b\f") == '"\\b\\f"'

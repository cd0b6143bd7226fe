"""JSON exactly as Go's ``encoding/json.Marshal`` writes it: pure, no I/O.

The platform's tamper-evident hash chain hashes ``json.Marshal`` of a Go struct, so a row
the worker links into a chain must hash the very same bytes. What Go does, and this does:

* struct fields in declaration order, ``omitempty`` dropping ``false``, ``0``, ``""``, nil
  and empty maps/slices; map keys sorted by their UTF-8 bytes; no whitespace;
* strings: ``\\"`` ``\\\\`` ``\\n`` ``\\r`` ``\\t`` ``\\b`` ``\\f`` (Go 1.22+), other control
  characters and the HTML characters ``<`` ``>`` ``&`` as ``\\u00xx``, U+2028 and U+2029
  escaped, everything else as UTF-8;
* float64: the shortest decimal that round-trips, in plain notation, except for magnitudes
  below 1e-6 or from 1e21 up, which use an exponent (``1e-7``, ``1e+21``);
* ``time.Time``: RFC 3339 with nanoseconds, trailing zeros of the fraction trimmed.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

#: What Go escapes, code point -> escape; everything else is written as it is (UTF-8).
_ESCAPES: dict[int, str] = {c: f"\\u00{c:02x}" for c in range(0x20)}
_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r",
                 ord("\t"): "\\t", ord("\b"): "\\b", ord("\f"): "\\f",
                 ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                 0x2028: "\\u2028", 0x2029: "\\u2029"})
_UNSAFE = re.compile("[\x00-\x1f\"\\\\<>&\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a Go struct: its JSON name, its value, and whether it has omitempty."""

    name: str
    value: Any
    omitempty: bool = False


@dataclass(frozen=True, slots=True)
class Struct:
    """A Go struct value: fields in declaration order."""

    fields: Sequence[Field]


@dataclass(frozen=True, slots=True)
class Time:
    """A Go ``time.Time`` (marshalled as RFC 3339 with nanoseconds)."""

    moment: dt.datetime


def dumps(value: Any) -> bytes:
    """``json.Marshal(value)`` as Go writes it, as bytes."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts).encode("utf-8")


def string(text: str) -> str:
    """A Go JSON string literal (HTML-escaped, as ``json.Marshal`` does)."""
    if _UNSAFE.search(text) is None:  # most strings: one C-level scan, nothing to escape
        return '"' + text + '"'
    return '"' + text.translate(_ESCAPES) + '"'


def float64(value: float) -> str:
    """A float64 as ``encoding/json`` formats it."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"json: unsupported value: {value!r}")
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        text = repr(value)  # shortest round-trip digits, in exponent form in these ranges
        if len(text) >= 4 and text[-4] == "e" and text[-3] == "-" and text[-2] == "0":
            text = text[:-2] + text[-1]  # Go writes e-7, not e-07
        return text
    return format(Decimal(repr(value)).normalize(), "f")


def rfc3339nano(moment: dt.datetime) -> str:
    """``time.Time`` in UTC as Go's MarshalJSON writes it."""
    utc = moment if moment.tzinfo is dt.UTC else moment.astimezone(dt.UTC)
    # isoformat pads the year to four digits and writes the fraction only when non-zero,
    # as six digits: Go trims its trailing zeros.
    text = utc.isoformat()[:-6]  # without its "+00:00"
    if utc.microsecond:
        text = text.rstrip("0")
    return text + "Z"


def go_value(value: Any) -> Any:
    """A decoded JSON value as Go's ``json.Unmarshal`` into ``interface{}`` holds it: every
    number a float64 (so ``1`` and ``1.0`` are alike, and big integers are rounded)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if math.isinf(number):
            raise ValueError("a number beyond float64")  # Go's Unmarshal refuses it too
        return number
    if isinstance(value, Mapping):
        return {str(k): go_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [go_value(v) for v in value]
    raise TypeError(f"not a JSON value: {type(value).__name__}")


#: The largest integer a float64 holds exactly (Go prints such a float64 with its digits).
_EXACT_INT = 2**53
#: U+2028 and U+2029 as orjson writes them (as they are), where Go escapes them.
_LS, _PS = "\u2028".encode(), "\u2029".encode()


def dumps_unmarshalled(value: Any, *, known_plain: bool = False) -> str:
    """A decoded JSON value as Go marshals it after ``json.Unmarshal`` into ``interface{}``
    (every number a float64, map keys sorted). Most audit payloads hold only strings,
    small integers, booleans and nesting: for those, orjson with sorted keys writes the
    very same bytes, checked for the few characters Go escapes and orjson does not.
    Anything else goes through the full encoder. Raises ValueError for a number beyond
    float64 (Go's Unmarshal refuses it). ``known_plain``: the caller has seen ``plain``
    say so (it walks the whole value)."""
    if known_plain or plain(value):
        out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        # In orjson's output, what Go would have written otherwise: an escape of any
        # kind, the HTML characters, U+2028 and U+2029 (spelled out: a generator over
        # them cost a fifth of this function).
        if not (b"\\" in out or b"<" in out or b">" in out or b"&" in out
                or _LS in out or _PS in out):
            return out.decode()
    parts: list[str] = []
    _encode(go_value(value), parts)
    return "".join(parts)


def plain(value: Any) -> bool:
    """Only strings, integers a float64 holds exactly, booleans, null, lists and maps."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is int:
            if not -_EXACT_INT <= item <= _EXACT_INT:
                return False
        elif not (kind is str or kind is bool or item is None):
            return False
    return True


def _empty(value: Any) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str | Mapping | list | tuple):
        return len(value) == 0
    return False


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(string(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(float64(value))
    elif isinstance(value, Time):
        out.append('"' + rfc3339nano(value.moment) + '"')
    elif isinstance(value, Struct):
        out.append("{")
        first = True
        for f in value.fields:
            if f.omitempty and _empty(f.value):
                continue
            if not first:
                out.append(",")
            first = False
            out.append(string(f.name) + ":")
            _encode(f.value, out)
        out.append("}")
    elif isinstance(value, Mapping):
        out.append("{")
        for i, key in enumerate(sorted(value, key=lambda k: str(k).encode("utf-8"))):
            if i:
                out.append(",")
            out.append(string(str(key)) + ":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode a {type(value).__name__} as Go does")

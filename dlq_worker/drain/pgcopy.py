"""Rows as PostgreSQL COPY text: pure encoding, no I/O (the sink streams it)."""

from __future__ import annotations

import datetime as dt
import io
import operator
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from dlq_worker.drain.decode import Jsonb, dumps_exact

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


_SPECIAL = re.compile(r"[\\\t\n\r]")


def _text(value: str) -> str:
    # Most values need no escaping: one C-level scan instead of a translate per value.
    return value.translate(_ESCAPES) if _SPECIAL.search(value) else value


def _json(value: Any) -> str:
    return _text(dumps_exact(value))


#: Exact type -> COPY text (a dict lookup per value: this runs for every field of every row).
_CONVERT: dict[type, Callable[[Any], str]] = {
    str: _text,
    bool: lambda v: "t" if v else "f",
    int: str,
    float: repr,
    dt.datetime: dt.datetime.isoformat,
    dt.date: dt.date.isoformat,
    uuid.UUID: str,
    dict: _json,
    Jsonb: lambda v: _text(v.text),
    list: _json,
}


#: The first, unescaped pass of ``encode_text``: the same, a jsonb value as its text.
_AS_IS: dict[type, Callable[[Any], str]] = {**_CONVERT, Jsonb: operator.attrgetter("text")}


def field(value: Any) -> str:
    """One value in COPY text format (``\\N`` for NULL)."""
    if value is None:
        return "\\N"
    try:
        return _CONVERT[type(value)](value)
    except KeyError:
        raise TypeError(f"cannot COPY a {type(value).__name__}") from None


def encode(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> io.StringIO:
    """The rows' ``columns`` as one COPY text stream (tab-separated, one row a line)."""
    return io.StringIO(encode_text(rows, columns))


def encode_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The rows' ``columns`` as COPY text (tab-separated, one row a line).

    Most rows need no escaping at all: a row is joined as it is (a jsonb value's text
    too), and escaped value by value only if the joined line holds a line break, or a
    backslash or a tab of its own (one backslash is each NULL's, one tab each
    separator's)."""
    convert = _CONVERT
    as_is = _AS_IS
    separators = len(columns) - 1
    # (itemgetter gives a tuple for two or more names, the value itself for one)
    pick = operator.itemgetter(*columns) if len(columns) > 1 else (
        lambda row: tuple(row[c] for c in columns))
    lines = []
    try:
        for row in rows:
            values = pick(row)
            line = "\t".join([v if type(v) is str else "\\N" if v is None
                               else as_is[type(v)](v) for v in values])
            if ("\n" in line or "\r" in line or line.count("\t") != separators
                    or line.count("\\") != values.count(None)):
                line = "\t".join(["\\N" if v is None else convert[type(v)](v)
                                   for v in values])
            lines.append(line)
    except KeyError as exc:
        raise TypeError(f"cannot COPY a value of {exc}") from None
    lines.append("")
    return "\n".join(lines)

"""Where a row's hash is computed: the platform's tamper-evident chain per correlation_id.

The platform hashes ``json.Marshal`` of its Go ``AuditEvent`` struct with the hash fields,
``event_date`` and the legal-hold fields zeroed, prefixed by the previous event's hash:
``event_hash = hex(SHA-256(previous_event_hash || json))``, or HMAC-SHA-256 with its key.
Its verifier rebuilds that struct **from the row read back from PostgreSQL** and walks
each chain by ``event_timestamp, event_id``. So the worker hashes what the row will hold
once stored (jsonb and inet as PostgreSQL prints them, numbers as float64), links an event
only after the head of its chain in that order, and writes a late event unhashed (the
verifier excludes unhashed rows; linking it would break the chain for it and the next).
The pure part is here; the queries (locks, heads, normalisation) are in ``link``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy import exc as sa_exc

from dlq_worker.chain import gojson
from dlq_worker.drain.decode import Jsonb, Record

log = logging.getLogger(__name__)

SHA256 = "sha256-unkeyed"
HMAC = "hmac-sha256"

#: ``audit_event_lock_id()`` as the platform's migration defines it (pgcrypto's digest);
#: built-in sha256() gives the same bytes, so ``db init`` needs no extension.
LOCK_ID_FUNCTION = """
CREATE OR REPLACE FUNCTION audit_event_lock_id(correlation_id_param TEXT)
RETURNS BIGINT AS $$
    SELECT ('x' || encode(substring(sha256(convert_to(correlation_id_param, 'UTF8')), 1, 8),
            'hex'))::bit(64)::bigint
$$ LANGUAGE sql IMMUTABLE;
"""


def lock_id(correlation_id: str) -> int:
    """``audit_event_lock_id(correlation_id)`` computed here: the first 8 bytes of the
    SHA-256 of its UTF-8 text, as a signed big-endian bigint. Used only where the
    database's own function was seen to agree (``lock_ids_agree``)."""
    digest = hashlib.sha256(correlation_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


#: Correlation IDs the database's lock function is asked about before ``lock_id`` stands
#: in for it: ASCII, accented and astral text, and the empty string.
_LOCK_PROBES = ("rr-2026-000001", "corrélation-é-ü", "\U0001f600-chain", "")


def lock_ids_agree(conn: Connection) -> bool:
    """Whether the target's ``audit_event_lock_id()`` gives what ``lock_id`` computes (the
    platform's migration and ``db init`` define it so; a database with another definition,
    or another encoding, keeps having its own function called). Asked under a savepoint:
    a probe the database cannot even take (text its encoding lacks) is a no."""
    savepoint = conn.begin_nested()
    try:
        got = conn.execute(text(
            "SELECT audit_event_lock_id(c) FROM unnest(CAST(:c AS text[])) WITH ORDINALITY "
            "AS p(c, o) ORDER BY o"), {"c": list(_LOCK_PROBES)}).scalars().all()
    except (sa_exc.DBAPIError, UnicodeEncodeError) as exc:
        # (psycopg2 encodes the probes in the connection's encoding before sending them)
        if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
            raise  # the database is gone, not in disagreement
        savepoint.rollback()
        return False
    savepoint.commit()
    return [int(v) for v in got] == [lock_id(c) for c in _LOCK_PROBES]


@dataclass(frozen=True)
class Link:
    """What a linked row carries."""

    event_hash: str
    previous_event_hash: str
    hash_algorithm: str


def hashed_json(row: Mapping[str, Any], event_data_json: str | None = None) -> bytes:
    """The bytes the platform hashes for a stored row: its Go struct, marshalled, with the
    hash fields, ``event_date`` and the legal-hold fields zeroed. ``row`` holds the values
    as the platform's verifier reads them back (see ``stored_view``); ``event_data_json``
    is event_data already marshalled, if the caller has it.

    Written out field by field, in the struct's declaration order (the tests hold it to
    the same struct marshalled by the general encoder)."""
    s = gojson.string
    parent_id = row.get("parent_event_id")
    parent_date = row.get("parent_event_date")
    out = ['{"event_id":', s(row["event_id"]),
           ',"event_timestamp":"', gojson.rfc3339nano(row["event_timestamp"]),
           '","event_date":null,"event_type":', s(row["event_type"]),
           ',"version":', s(row["event_version"]),
           ',"event_category":', s(row["event_category"]),
           ',"event_action":', s(row["event_action"]),
           ',"event_outcome":', s(row["event_outcome"]),
           ',"correlation_id":', s(row["correlation_id"]),
           ',"parent_event_id":', "null" if parent_id is None else s(parent_id),
           ',"parent_event_date":', "null" if parent_date is None else '"' + gojson.rfc3339nano(
               dt.datetime(parent_date.year, parent_date.month, parent_date.day,
                           tzinfo=dt.UTC)) + '"']
    for name, column in _OMITEMPTY_BEFORE_DURATION:
        value = row.get(column)
        if value:
            out += [',"', name, '":', s(value)]
    duration = row.get("duration_ms")
    if duration:
        out.append(f',"duration_ms":{int(duration)}')
    for name, column in _OMITEMPTY_AFTER_DURATION:
        value = row.get(column)
        if value:
            out += [',"', name, '":', s(value)]
    out += [f',"retention_days":{int(row["retention_days"])}',
            ',"is_sensitive":', "true" if row["is_sensitive"] else "false",
            ',"event_hash":"","previous_event_hash":"","legal_hold":false,'
            '"legal_hold_reason":"","legal_hold_placed_by":"","legal_hold_placed_at":null,'
            '"event_data":']
    if event_data_json is None:
        data = row.get("event_data")
        event_data_json = "null" if data is None else gojson.dumps_unmarshalled(data)
    out += [event_data_json, "}"]
    return "".join(out).encode("utf-8")


#: Go's omitempty string fields (JSON name, column), around duration_ms.
_OMITEMPTY_BEFORE_DURATION = (("resource_type", "resource_type"),
                              ("resource_id", "resource_id"), ("namespace", "namespace"),
                              # the Go field is ClusterID, its JSON key still cluster_name
                              ("cluster_name", "cluster_id"), ("severity", "severity"))
_OMITEMPTY_AFTER_DURATION = (("error_code", "error_code"), ("error_message", "error_message"),
                             ("actor_id", "actor_id"), ("actor_type", "actor_type"),
                             ("actor_ip", "actor_ip"))


def event_hash(previous: str, payload: bytes, key: bytes | None) -> str:
    """``hex(SHA-256(previous || payload))``, or HMAC-SHA-256 with ``key``."""
    message = previous.encode("ascii") + payload
    if key:
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return hashlib.sha256(message).hexdigest()


def go_event_data(stored_text: str | None) -> Any:
    """jsonb text, decoded with every digit (``hashed_json`` makes each number a float64,
    as the Go verifier's ``json.Unmarshal`` into a map does)."""
    if stored_text is None:
        return None
    return json.loads(stored_text, parse_float=Decimal)


def stored_view(values: Mapping[str, Any], event_data: Any,
                actor_ip_text: str | None) -> dict[str, Any]:
    """A record's values as the row will read back: event_data decoded (``hashed_json``
    makes its numbers float64, as Go does), inet as PostgreSQL prints it, the rest as
    the worker writes them."""
    return _stored_view(values, event_data, actor_ip_text)[0]


def _stored_view(values: Mapping[str, Any], event_data: Any,
                 actor_ip_text: str | None) -> tuple[dict[str, Any], bool]:
    """``stored_view``, and whether its event_data is plain (see ``gojson.plain``)."""
    view = dict(values)
    view["event_id"] = str(values["event_id"]).lower()
    view["parent_event_id"] = (None if values.get("parent_event_id") is None
                               else str(values["parent_event_id"]).lower())
    data = event_data.value if isinstance(event_data, Jsonb) else event_data
    is_plain = gojson.plain(data)
    view["event_data"] = data if is_plain else _as_stored(data)
    view["actor_ip"] = actor_ip_text
    return view, is_plain


def _as_stored(value: Any) -> Any:
    """A decoded jsonb value as PostgreSQL gives it back: its numeric has no negative zero
    (-0.0 reads back as 0.0, which Go writes as 0, not -0)."""
    kind = type(value)
    if kind is dict:
        return {k: _as_stored(v) for k, v in value.items()}
    if kind is list:
        return [_as_stored(v) for v in value]
    if kind is float and value == 0:
        return 0.0
    if kind is Decimal and value == 0:
        return Decimal(0)
    return value


def with_hashed(record: Record) -> Record:
    """The audit event with the bytes its link will hash (``hashed_json`` of the row as
    it will read back), made without the database: for an ``actor_ip`` absent or in
    canonical IPv4 form (the others are printed by PostgreSQL when linked) and
    event_data within float64. Otherwise the record as it was."""
    values = record.values
    actor_ip = values.get("actor_ip")
    if actor_ip and not _canonical_ipv4(actor_ip):
        return record
    made = _hash_input(values, actor_ip + "/32" if actor_ip else None)
    if made is None:
        return record  # a number beyond float64: written unhashed (see Chainer._stored)
    # (built field by field: dataclasses.replace cost three times as much; the tests hold
    # the copy equal to the record)
    return Record(table=record.table, key=record.key, values=values,
                  correlation_id=record.correlation_id, sensitive=record.sensitive,
                  hashed=made[1])


def _hash_input(values: Mapping[str, Any], actor_ip_text: str | None,
                ) -> tuple[dict[str, Any], bytes] | None:
    """The row as it will read back (``stored_view``) and the bytes its link hashes
    (``hashed_json``, event_data marshalled as Go does); None for event_data with a number
    beyond float64, which the verifier could not read either."""
    view, is_plain = _stored_view(values, values["event_data"], actor_ip_text)
    data = view["event_data"]
    try:
        marshalled = "null" if data is None else gojson.dumps_unmarshalled(
            data, known_plain=is_plain)
    except ValueError:
        return None
    return view, hashed_json(view, marshalled)


def order_key(row: Mapping[str, Any]) -> tuple[dt.datetime, str]:
    """The verifier's walk order: event_timestamp, then event_id."""
    return (row["event_timestamp"], str(row["event_id"]).lower())


#: The savepoint the chains' locks are first tried under, all at once.
_TRY_ALL = "dlq_chain_locks"

#: PostgreSQL's answers to a lock wait that must end: lock_timeout, and the deadlock
#: detector breaking a cycle.
_LOCK_GAVE_UP = frozenset({"55P03", "40P01"})


@dataclass
class Chainer:
    """Links audit_events rows into their chains, in the transaction that inserts them."""

    algorithm: str  # SHA256 or HMAC
    key: bytes | None = None
    #: After a chain's lock was not had within lock_timeout, it is only tried (never
    #: waited on) for this long: a frozen writer costs one wait, not one per batch.
    busy_for: float = 10.0
    clock: Callable[[], float] = time.monotonic
    #: Whether the database's lock function agrees with ``lock_id`` (None: not asked yet):
    #: then the chains' locks are taken by their bigint keys, computed here, instead of
    #: calling it once per chain. Asked again every ``lock_ids_recheck`` seconds, so a
    #: function the platform redefines is followed within that.
    local_lock_ids: bool | None = None
    lock_ids_recheck: float = 300.0
    _lock_ids_at: float = float("-inf")
    _busy_until: dict[str, float] = field(default_factory=dict)

    def link(self, conn: Connection, records: Sequence[Record], indexes: Sequence[int],
             *, look_for_existing: bool = True,
             ) -> tuple[dict[int, Link], list[int], list[int]]:
        """(links for the rows to hash, indexes of late events written unhashed, indexes
        of rows whose chain another writer holds: not written now, left for later).

        Takes the platform's advisory lock for every correlation_id of these rows (see
        _lock), reads all chain heads in one query, and links each chain's new rows in the
        verifier's order. Rows whose key already exists (redelivery) are left out: they
        are not written. Without ``look_for_existing`` every row is taken as new: for a
        write that fails as a whole if any key exists (COPY straight into the table),
        whose caller links again, looking, when it does.
        """
        rows = {i: records[i].values for i in indexes}
        if not rows:
            return {}, [], []
        busy, open_savepoint = self._lock(
            conn, sorted({str(v["correlation_id"]) for v in rows.values()}), release=False)
        deferred = [i for i, v in rows.items() if str(v["correlation_id"]) in busy]
        for i in deferred:
            del rows[i]
        if not rows:
            return {}, [], deferred  # (some were busy: the savepoint is released)
        correlations = sorted({str(v["correlation_id"]) for v in rows.values()})
        # One round trip: the chain heads, and which of these keys exist already.
        existing: set[tuple[str, Any]] = set()
        heads: dict[str, tuple[str, dt.datetime, str]] = {}
        # Both shaped as one index lookup per value (a LATERAL ... LIMIT 1 per chain, = ANY
        # on the key), whatever the table's statistics say: a plan from stale statistics
        # (a bulk load not analyzed yet) scanned every partition, 50 us per row.
        heads_sql = (
            (f"RELEASE SAVEPOINT {_TRY_ALL}; " if open_savepoint else "") +
            "SELECT 'head', c, h.event_hash, h.event_timestamp, h.event_id::text, NULL "
            "FROM unnest(CAST(:c AS text[])) AS c, LATERAL (SELECT event_hash, "
            "event_timestamp, event_id FROM audit_events WHERE correlation_id = c "
            "AND event_hash IS NOT NULL ORDER BY event_timestamp DESC, event_id DESC "
            "LIMIT 1) AS h")
        params: dict[str, Any] = {"c": correlations}
        if look_for_existing:
            heads_sql += (
                " UNION ALL SELECT 'key', NULL, NULL, NULL, event_id::text, event_date "
                "FROM audit_events WHERE event_id = ANY(CAST(:ids AS uuid[])) "
                "AND event_date = ANY(CAST(:dates AS date[]))")
            params.update(ids=[str(v["event_id"]) for v in rows.values()],
                          dates=sorted({v["event_date"] for v in rows.values()}))
        for kind, c, h, ts, eid, day in conn.execute(text(heads_sql), params).all():
            if kind == "head":
                heads[c] = (h, ts, eid.lower())
            else:
                existing.add((eid.lower(), day))
        new = [i for i, v in rows.items()
               if (str(v["event_id"]).lower(), v["event_date"]) not in existing]
        stored, payloads = self._stored(conn, records, rows, new)
        links: dict[int, Link] = {}
        # A row the platform's Go verifier could not even read (event_data with a number
        # beyond float64) is written unhashed too, like a late one.
        late: list[int] = [i for i in new if i not in stored]
        for i in sorted(stored, key=lambda j: (str(rows[j]["correlation_id"]),
                                               order_key(stored[j]))):
            view = stored[i]
            cid = str(view["correlation_id"])
            head = heads.get(cid)
            if head is not None and order_key(view) <= (head[1], head[2]):
                late.append(i)  # older than the head: linking it would break the chain
                continue
            previous = head[0] if head is not None else ""
            digest = event_hash(previous, payloads[i], self.key)
            links[i] = Link(digest, previous, self.algorithm)
            heads[cid] = (digest, view["event_timestamp"], view["event_id"])
        return links, late, deferred

    def lock(self, conn: Connection, correlations: Sequence[str]) -> set[str]:
        """Take the advisory lock of each chain for this transaction; the chains left busy.
        Taken again inside the transaction, a lock is had at once."""
        return self._lock(conn, sorted(set(correlations)))[0]

    def _lock(self, conn: Connection, correlations: list[str], *,
              release: bool = True) -> tuple[set[str], bool]:
        """Lock each chain, in sorted order: the chains left busy, and whether the
        savepoint of the first try is still open (only with ``release=False``).

        Every lock is first only tried, all at once, under a savepoint set in the same
        round trip. If all are had, the savepoint is released, or left open for the
        caller to release with its next statement (``release=False``: each round trip
        costs the writer a wait for the interpreter lock while the loop thread decodes).
        If one is held by another writer, all are given back (the savepoint) and taken
        again one by one in sorted order, each waited on for at most the session's
        lock_timeout: a writer that waits holds no chain after the one it waits for, so
        writers never wait on each other in a cycle. A chain still locked after that (a
        frozen replica in the middle of its write) is busy: its rows wait for a later
        batch while the rest are written, and for ``busy_for`` it is only tried.
        """
        now = self.clock()
        if now - self._lock_ids_at >= self.lock_ids_recheck:
            self.local_lock_ids = lock_ids_agree(conn)
            self._lock_ids_at = now
        if self.local_lock_ids:
            got = conn.execute(text(
                f"SAVEPOINT {_TRY_ALL}; SELECT bool_and(pg_try_advisory_xact_lock(k)) "
                "FROM unnest(CAST(:k AS bigint[])) AS k"),
                {"k": [lock_id(c) for c in correlations]}).scalar()
        else:
            got = conn.execute(text(
                f"SAVEPOINT {_TRY_ALL}; "
                "SELECT bool_and(pg_try_advisory_xact_lock(audit_event_lock_id(c))) "
                "FROM unnest(CAST(:c AS text[])) AS c"), {"c": correlations}).scalar()
        if got or not correlations:
            if release:
                conn.exec_driver_sql(f"RELEASE SAVEPOINT {_TRY_ALL}")
            for cid in correlations:
                self._busy_until.pop(cid, None)
            return set(), not release
        # gives back every lock it took
        conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {_TRY_ALL}; RELEASE SAVEPOINT {_TRY_ALL}")
        now = self.clock()
        busy: set[str] = set()
        for cid in correlations:
            key, params = (("CAST(:k AS bigint)", {"k": lock_id(cid)}) if self.local_lock_ids
                           else ("audit_event_lock_id(:c)", {"c": cid}))
            if self._busy_until.get(cid, 0.0) > now:
                # only tried: a try never waits, so it cannot close a cycle either
                if not conn.execute(text(f"SELECT pg_try_advisory_xact_lock({key})"),
                                    params).scalar():
                    busy.add(cid)
                continue
            savepoint = conn.begin_nested()
            try:
                conn.execute(text(f"SELECT pg_advisory_xact_lock({key})"), params)
                savepoint.commit()
                self._busy_until.pop(cid, None)
            except sa_exc.DBAPIError as exc:
                if getattr(exc.orig, "pgcode", None) not in _LOCK_GAVE_UP:
                    raise
                savepoint.rollback()
                busy.add(cid)
                self._busy_until[cid] = now + self.busy_for
                log.warning("a hash chain is locked by another writer past lock_timeout: its "
                            "rows wait for a later batch", extra={
                                "event": "chain_busy", "correlation_id": cid[:255]})
        if len(self._busy_until) > 10_000:  # forget the oldest: a bounded memory
            for cid in sorted(self._busy_until, key=self._busy_until.__getitem__)[:5_000]:
                del self._busy_until[cid]
        return busy, False

    def _stored(self, conn: Connection, records: Sequence[Record],
                rows: Mapping[int, Mapping[str, Any]], indexes: Sequence[int],
                ) -> tuple[dict[int, Mapping[str, Any]], dict[int, bytes]]:
        """The rows as they will read back, and the bytes each one's link hashes (made
        already for most: see ``with_hashed``). inet is printed by PostgreSQL itself (one
        query, for the rows whose address is not in canonical IPv4 form), as the verifier
        reads it (the text of the inet: 10.0.0.1 reads back as 10.0.0.1/32). event_data
        needs no round trip: jsonb keeps every digit and the last of duplicate keys, as
        the decoder does, so its float64 view is the same from either side."""
        views: dict[int, Mapping[str, Any]] = {}
        payloads: dict[int, bytes] = {}
        for i in indexes:
            hashed = records[i].hashed
            if hashed is not None:
                views[i] = rows[i]  # (its IDs are lower case already, its times the same)
                payloads[i] = hashed
        indexes = [i for i in indexes if i not in payloads]
        if not indexes:
            return views, payloads
        addresses = {i: rows[i]["actor_ip"] for i in indexes if rows[i].get("actor_ip")}
        # an IPv4 address in canonical dotted form reads back as itself with its host
        # mask (10.0.0.1 as 10.0.0.1/32): only the others are asked about
        printed = {i: ip + "/32" for i, ip in addresses.items() if _canonical_ipv4(ip)}
        addresses = {i: ip for i, ip in addresses.items() if i not in printed}
        if addresses:
            printed |= {int(o): str(ip) for o, ip in conn.execute(text(
                "SELECT o, CAST(ip AS inet)::text FROM unnest(CAST(:o AS int[]), "
                "CAST(:ip AS text[])) AS a(o, ip)"),
                {"o": list(addresses), "ip": list(addresses.values())}).all()}
        for i in indexes:
            made = _hash_input(rows[i], printed.get(i))
            if made is not None:  # (else written unhashed: see link)
                views[i], payloads[i] = made
        return views, payloads


def _canonical_ipv4(text: str) -> bool:
    """Four decimal octets without leading zeros (PostgreSQL reads ``010.1.2.3`` too, as
    10.1.2.3: such text is left for it to print)."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        p.isascii() and p.isdigit() and len(p) <= 3 and int(p) <= 255
        and (p == "0" or p[0] != "0") for p in parts)


def schema_supports_chain(conn: Connection) -> bool:
    """The target has the hash columns and the platform's lock function."""
    columns = set(conn.execute(text(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'audit_events' "
        "AND column_name IN ('event_hash', 'previous_event_hash', 'hash_algorithm')"))
        .scalars())
    function = conn.execute(text(
        "SELECT count(*) FROM pg_proc WHERE proname = 'audit_event_lock_id'")).scalar_one()
    return len(columns) == 3 and bool(function)

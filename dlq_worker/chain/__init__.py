"""The platform's hash chain: where a row's hash is computed and linked (``link``),
the Go JSON bytes it hashes (``gojson``), and how a chain is verified (``verify``).
The names the rest of the worker uses are here too."""

from dlq_worker.chain.link import (
    HMAC,
    LOCK_ID_FUNCTION,
    SHA256,
    Chainer,
    Link,
    event_hash,
    go_event_data,
    hashed_json,
    lock_id,
    lock_ids_agree,
    order_key,
    schema_supports_chain,
    stored_view,
    with_hashed,
)
from dlq_worker.chain.verify import ChainReport, correlation_ids_since, verify

__all__ = [
    "HMAC",
    "LOCK_ID_FUNCTION",
    "SHA256",
    "ChainReport",
    "Chainer",
    "Link",
    "correlation_ids_since",
    "event_hash",
    "go_event_data",
    "hashed_json",
    "lock_id",
    "lock_ids_agree",
    "order_key",
    "schema_supports_chain",
    "stored_view",
    "verify",
    "with_hashed",
]

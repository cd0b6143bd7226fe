"""The drain: the loop, the Redis side, decoding, batching, the PostgreSQL side.

An entry's way: ``worker`` (the loop) reads it through ``source`` (Redis Streams,
its Lua scripts in ``scripts``, the client in ``redis_io``), ``decode`` checks it
against the contract, ``flush`` batches and completes it, ``sink`` writes it
(``pgcopy`` encodes COPY, ``conflicts`` tells a duplicate from a conflict,
``classify`` and ``systemic`` judge PostgreSQL's refusals, ``schema`` is the
contract's tables), ``policy`` decides when to flush and how long to wait.
"""

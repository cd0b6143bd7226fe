"""dlq-worker: drains the audit dead-letter-queue Redis Streams into PostgreSQL."""

from __future__ import annotations

__version__ = "0.1.0"

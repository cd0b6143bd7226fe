from __future__ import annotations

from dlq_worker.cli import main

main()

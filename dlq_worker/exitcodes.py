"""Exit codes: one table for every command, no two meanings sharing a number.

Scripts and Kubernetes hooks branch on these; docs/operations.md lists them and a test holds the
two together.
"""

from __future__ import annotations

OK = 0
#: Something unforeseen (a bug): the message says what.
ERROR = 1
#: The command line itself is wrong (unknown option, missing argument): click's own code.
USAGE = 2
#: The configuration is invalid: one line names the key, where it came from, the value.
CONFIG = 3
#: A server (Redis, PostgreSQL) cannot be reached, or the worker cannot start (port taken).
UNAVAILABLE = 4
#: What was asked for does not exist (a stream, an entry ID, a correlation ID).
NOT_FOUND = 5
#: doctor: every check passed but some warn.
DOCTOR_WARN = 6
#: doctor: at least one check failed.
DOCTOR_FAIL = 7
#: verify-chain: at least one hash chain does not verify (tampered rows).
TAMPERED = 8
#: dead-letter replay / move: the DLQ stream has no room under the producers' cap.
NO_ROOM = 9
#: A second SIGTERM/SIGINT: exit at once, without waiting for the final flush.
FORCED = 130

#: code -> meaning, for docs/operations.md and `dlq-worker --help`.
TABLE = {
    OK: "success (doctor: every check passed; verify-chain: every chain verifies)",
    ERROR: "unexpected error",
    USAGE: "usage error (unknown option, missing argument)",
    CONFIG: "invalid configuration",
    UNAVAILABLE: "a server cannot be reached, or the worker cannot start",
    NOT_FOUND: "not found (stream, entry, correlation ID)",
    DOCTOR_WARN: "doctor: warnings",
    DOCTOR_FAIL: "doctor: a check failed",
    TAMPERED: "verify-chain: a chain does not verify",
    NO_ROOM: "replay/move: the DLQ stream has no room under the producers' cap",
    FORCED: "forced exit on a second signal",
}

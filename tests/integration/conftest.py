"""Fixtures shared by the integration tests' modules."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.test_auth import AuthServers
from tests.integration.test_tls import _write_certs


@pytest.fixture
def tls_servers() -> Iterator[AuthServers]:
    """Both servers speaking TLS (Redis requires a client certificate) with passwords."""
    with tempfile.TemporaryDirectory(prefix="dlq-tls-") as root:
        Path(root).chmod(0o755)
        certs = _write_certs(trustme.CA(), Path(root) / "certs")
        servers = AuthServers(Path(root), tls=certs)
        yield servers
        servers.close()

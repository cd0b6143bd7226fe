"""The Go verifier, compiled once per run from tests/chain/verifier.go (standard library
only; Debian's golang-go). A missing Go toolchain fails these tests: it never skips them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_name("verifier.go")


@pytest.fixture(scope="session")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    assert go, "the Go toolchain is required for -m go (apt-get install golang-go)"
    binary = tmp_path_factory.mktemp("go") / "verifier"
    subprocess.run([go, "build", "-o", str(binary), str(SOURCE)], check=True,
                   capture_output=True, cwd=binary.parent)
    return binary


def run(binary: Path, command: str, lines: list[str]) -> list[str]:
    result = subprocess.run([str(binary), command], input="\n".join(lines) + "\n",
                            capture_output=True, text=True, check=True, timeout=60)
    return result.stdout.splitlines()

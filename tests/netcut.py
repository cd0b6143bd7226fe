"""A TCP proxy in front of a real server that can lose a reply on the wire: the command
reaches the server and runs, and the connection breaks before its answer comes back (a
node's network failing at the wrong moment)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class Proxy:
    def __init__(self, port: int) -> None:
        self.target = port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lose = threading.Event()
        self._marker = b""
        self.lost = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_reply_to(self, marker: bytes) -> None:
        """The reply to the next command that holds ``marker`` is dropped, and that
        connection cut, once the server has run it."""
        self.lost.clear()
        self._marker = marker

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            armed = threading.Event()
            threading.Thread(target=self._pipe, args=(client, server, armed, False),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, armed, True),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, armed: threading.Event,
              replies: bool) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                if not replies and self._marker and self._marker in data:
                    self._marker = b""
                    armed.set()
                if replies and armed.is_set():
                    self.lost.set()
                    break
                dst.sendall(data)
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@contextmanager
def proxy(port: int) -> Iterator[Proxy]:
    p = Proxy(port)
    try:
        yield p
    finally:
        p.close()

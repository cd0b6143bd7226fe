"""The HTTP side: /healthz (liveness), /readyz (readiness), /metrics (Prometheus)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dlq_worker.watch.health import Health
from dlq_worker.watch.metrics import Metrics

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, host: str, port: int, health: Health, metrics: Metrics) -> None:
        health_ref, metrics_ref = health, metrics

        class Handler(BaseHTTPRequestHandler):
            server_version = "dlq-worker"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    ok, detail = health_ref.live()
                    self._json(200 if ok else 503, {"status": "ok" if ok else "fail",
                                                    "detail": detail})
                elif path == "/readyz":
                    ready, reasons, warnings = health_ref.ready()
                    metrics_ref.ready.set(1 if ready else 0)
                    self._json(200 if ready else 503, {
                        "status": "ready" if ready else "not ready",
                        "reasons": reasons,
                        "warnings": warnings,
                    })
                elif path == "/metrics":
                    body = generate_latest(metrics_ref.registry)
                    self._send(200, CONTENT_TYPE_LATEST, body)
                else:
                    self._json(404, {"status": "not found",
                                     "endpoints": ["/healthz", "/readyz", "/metrics"]})

            def _json(self, code: int, doc: dict[str, Any]) -> None:
                self._send(code, "application/json", json.dumps(doc).encode() + b"\n")

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds are not events worth a log line

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("http endpoints listening", extra={"event": "http_started", "port": self.port})

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

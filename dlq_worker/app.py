"""Assemble and run the daemon: HTTP endpoints, monitor thread, run loop, signals."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

from prometheus_client import CollectorRegistry

from dlq_worker import exitcodes
from dlq_worker.config import Config
from dlq_worker.drain.redis_io import make_client
from dlq_worker.drain.sink import Sink
from dlq_worker.drain.source import Source
from dlq_worker.drain.worker import Worker
from dlq_worker.errors import StartupError
from dlq_worker.watch.endpoints import HttpServer
from dlq_worker.watch.health import Health
from dlq_worker.watch.heartbeat import Heartbeat
from dlq_worker.watch.metrics import Metrics
from dlq_worker.watch.monitor import Monitor

log = logging.getLogger(__name__)

#: Exit codes, named (dramatiq does the same).
EXIT_OK = exitcodes.OK
EXIT_FORCED = exitcodes.FORCED


class App:
    """One worker process: everything `dlq-worker run` starts, owned in one place."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = Metrics(registry)
        self.health = Health(liveness_timeout=float(config.worker.liveness_timeout),
                             unready_after=float(config.worker.unready_after),
                             stalled_after=float(config.worker.stalled_after))
        self.consumer = config.consumer_name()
        self.source = Source(config, self.consumer)
        self.sink = Sink(config.database)
        self.heartbeat: Heartbeat | None = None
        if float(config.worker.takeover_after) > 0:
            self.heartbeat = Heartbeat(
                make_client(config.redis), config.streams.group, self.consumer,
                takeover_after=float(config.worker.takeover_after),
                forget_after=max(float(config.worker.consumer_idle_delete), 3600.0))
        self.worker = Worker(config, self.source, self.sink, self.metrics, self.health,
                             heartbeat=self.heartbeat)
        self.monitor = Monitor(config, self.metrics, self.health, self.sink,
                               streams=lambda: list(self.worker.streams))
        self.worker.before_first_read = self.monitor.count_before_reading
        self.http: HttpServer | None = None
        if config.http.enabled:
            try:
                self.http = HttpServer(config.http.host, config.http.port, self.health,
                                       self.metrics)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {config.http.host}:{config.http.port}: {exc.strerror}"
                ) from exc

    def run(self) -> None:
        """Serve until stop() (or a signal, when installed); returns after the final flush."""
        if self.http:
            self.http.start()
        self.monitor.start()
        if self.heartbeat:
            self.heartbeat.start()
        try:
            self.worker.run()
        finally:
            if self.heartbeat:
                self.heartbeat.stop()
            self.monitor.stop()
            if self.http:
                self.http.stop()
            self.source.close()
            self.sink.close()

    def stop(self) -> None:
        self.worker.request_stop()

    def _exit_at_deadline(self) -> None:
        try:
            left = len(self.worker.held())
        except RuntimeError:  # changed size meanwhile (another thread): a count will do
            left = -1
        log.warning("shutdown timeout reached with entries in hand: left pending for "
                    "redelivery", extra={"event": "shutdown_incomplete", "entries": left})
        log.info("worker stopped", extra={"event": "stopped", "left_pending": left})
        logging.shutdown()
        os._exit(EXIT_OK)

    def install_signal_handlers(self) -> None:
        """First SIGTERM/SIGINT: graceful stop. A second one: exit at once (nothing is
        acked that was not committed, so the entries in hand are simply redelivered)."""

        def handle(signum: int, frame: FrameType | None) -> None:
            if self.worker.stopping:
                log.warning("second signal: exiting now",
                            extra={"event": "forced_exit", "signal": signum})
                os._exit(EXIT_FORCED)
            held = len(self.worker.held())
            if self.worker.failing and not held:
                # A server is down and nothing is in hand: nothing to finish, so no reason to
                # sit out a connect timeout in the call under way.
                log.info("signal received while a server is down, nothing in hand: exiting",
                         extra={"event": "stopped", "signal": signum, "left_pending": 0})
                logging.shutdown()
                os._exit(EXIT_OK)
            log.info("signal received: finishing the batch in hand",
                     extra={"event": "stopping", "signal": signum})
            self.stop()
            # Whatever call is under way (a connect to a vanished server can last its
            # timeout), the exit comes by the deadline: what is held stays pending in Redis.
            timer = threading.Timer(float(self.config.worker.shutdown_timeout) + 0.5,
                                    self._exit_at_deadline)
            timer.daemon = True
            timer.start()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handle)
            signal.signal(signal.SIGINT, handle)


#: The cyclic garbage collector's first threshold in the daemon (Python's default is 700).
#: A batch allocates tens of thousands of containers (rows, decoded JSON) that reference
#: counting frees; at 700 the collector ran some 500 times per 30,000 entries, and every
#: hundredth run walked every live object: 18-21% of the worker's CPU, measured with
#: ``gc.callbacks`` (docs/performance.md). Cyclic garbage is still collected, within this
#: many container allocations not yet freed.
GC_THRESHOLD = 50_000


def tune_collector() -> None:
    """Set the collector for a long-running drain: what start-up built lives as long as
    the process and is frozen out of every collection; the first threshold is raised
    (see GC_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, second, third)


def serve(config: Config, on_ready: Callable[[App], None] | None = None) -> int:
    app = App(config)
    app.install_signal_handlers()
    if on_ready:
        on_ready(app)
    tune_collector()
    app.run()
    if app.worker.flusher.inflight is not None:
        # A write still hangs past the shutdown deadline; its thread would hold the exit
        # until a statement timeout. Its entries are pending in Redis: leave now.
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK

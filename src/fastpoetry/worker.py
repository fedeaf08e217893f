"""A worker process of ``serve --workers N``: the serving tree, driven by the main process.

Forked by :mod:`.supervisor` before any event loop runs, a worker serves
the tree of :mod:`.app` on the sockets it inherited, starting with the
poems the main process read.  What a server on its own tells systemd
(readiness, reload outcomes, counters) goes over its :mod:`.link` to the
main process instead, which alone talks to systemd.

The main process does not forward signals: ``systemctl stop`` sends
SIGTERM to every process of the unit at once (KillMode=control-group, the
default) and Ctrl-C sends SIGINT to the whole process group, so a worker
would get the same request twice, and a second request to stop means
"stop waiting for poems in flight".  A worker therefore counts requests to
stop by origin (signals sent to it, the main process, the main process
going away): after the first, only a second one of the same origin gets
through (:class:`Requests`).  SIGHUP sent to a worker is ignored: the main
process reloads every worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

import trio

from . import app, exits, lifecycle, link
from .link import Link
from .options import ServeConfig
from .report import Reporter, Source
from .stream import StreamServer

if TYPE_CHECKING:
    from .lifecycle import RequestSender

log = logging.getLogger(__name__)


def run(
    number: int,
    config: ServeConfig,
    prepared: app.Prepared,
    heartbeat: float,
    sock: socket.socket,
    leave: Callable[[], None],
) -> NoReturn:
    """Serve in the forked process until told to stop, then end it.

    ``sock`` is the worker's end of its link; ``leave`` closes what the
    worker inherited of the main process (the other ends of the links, the
    control socket), so that a link ends when the process at its far end
    does.  It never returns into the main process's code: the exit status
    is :data:`.exits.OK` after a clean shutdown and :data:`.exits.CRASH`
    after a crash, whose traceback is logged.  The handled signals are
    still blocked, as they were at the fork; the worker's own receiver
    takes them.
    """
    status = exits.CRASH
    try:
        leave()
        status = trio.run(_work, config, prepared, Link(sock), heartbeat, os.getppid())
    except BaseException:
        log.critical("worker %d crashed", number, exc_info=True)
    finally:
        logging.shutdown()
        os._exit(status)


async def _work(config: ServeConfig, prepared: app.Prepared, to_main: Link, heartbeat: float, main_pid: int) -> int:
    reporters: list[LinkReporter] = []

    def reporter(sources: Sequence[Source], servers: Sequence[StreamServer]) -> Reporter:
        made = LinkReporter(sources, servers, to_main, heartbeat)
        reporters.append(made)
        return made

    with lifecycle.signal_receiver() as signals:
        send, receive = lifecycle.open_requests()
        requests = Requests(send, main_pid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(requests.relay_signals, signals)
            nursery.start_soon(requests.relay_main, to_main)
            status = await app.serve_prepared(config, prepared, nursery, receive, reporter)
            for made in reporters:
                made.update_status()  # what it served in the end, for the total
            nursery.cancel_scope.cancel()
    return status


class LinkReporter(Reporter):
    """A worker's reporter: what a server on its own tells systemd goes over the link instead."""

    def __init__(
        self, sources: Sequence[Source], servers: Sequence[StreamServer], to_main: Link, interval: float
    ) -> None:
        super().__init__(sources, servers)
        self.interval = interval
        self._link = to_main

    def ready(self) -> None:
        """After the start and after every reload: say so, and whether the reload failed."""
        sent = self._link.send(
            link.READY, serving=self.serving(), reload_failure=self.reload_failure, **self._counts()
        )
        if not sent:
            log.warning("could not tell the main process that this worker is ready")
        else:
            log.debug("ready: told the main process")

    def update_status(self) -> None:
        # Sent from the event loop, also before ready(): it is the worker's
        # heartbeat as well as its counters.
        self._link.send(link.REPORT, **self._counts())

    def _counts(self) -> dict[str, int]:
        return {
            "poems_served": self.poems_served,
            "bytes_served": self.bytes_served,
            "poems_in_flight": self.poems_in_flight,
        }

    def reloading(self) -> None:
        """The main process tells systemd."""

    def stopping(self, status: str) -> None:
        """The main process tells systemd."""


class Requests:
    """Relays what a worker is asked to do into ``send``: from signals, and from the main process.

    After the first request to stop, one goes through only if its origin
    asked before (see the module's docstring).
    """

    def __init__(self, send: RequestSender, main_pid: int) -> None:
        self._send = send
        self._main_pid = main_pid
        self._stops: Counter[str] = Counter()

    def stop(self, origin: str, what: str) -> None:
        """A request to stop from ``origin`` (``signal``, ``main``, ``gone``), named ``what`` in the log."""
        self._stops[origin] += 1
        if self._stops[origin] == 1 and self._stops.total() > 1:
            log.debug("received %s: already shutting down", what)
            return
        self._send.send_nowait(lifecycle.Request(reload=False, what=what))

    async def relay_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info(
                    "ignoring SIGHUP: the main process (PID %d) reloads every worker when it gets one",
                    self._main_pid,
                )
                continue
            self.stop("signal", name)

    async def relay_main(self, to_main: Link) -> None:
        while (message := await to_main.receive()) is not None:
            if message["type"] == link.RELOAD:
                what = "a reload request from the main process"
                self._send.send_nowait(lifecycle.Request(reload=True, what=what))
            elif message["type"] == link.STOP:
                self.stop("main", "a stop request from the main process")
            else:
                raise ValueError(f"unknown message from the main process: {message!r}")
        # The main process keeps its end open until this worker has exited.
        log.warning("the main process (PID %d) is gone", self._main_pid)
        self.stop("gone", "end of file from the main process")

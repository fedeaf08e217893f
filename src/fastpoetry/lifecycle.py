"""A server's life after its start: requests to reload or stop, and the way it stops.

Requests come from signals (SIGHUP reloads, SIGTERM and SIGINT stop) and
from the control socket (:mod:`.control`, whose asker waits for the
outcome), through one channel, in the order they came.  A running server,
whether one process or the supervisor of several, is a :class:`Runtime`:
:func:`take_requests` answers its reloads until a request to stop, and
:func:`shut_down` stops it, where one rule holds for both: a second
request to stop ends the wait for poems in flight.

The handled signals are blocked from the first moment (:func:`signals_held`)
until an event loop's receiver takes them (:func:`signal_receiver`): a
SIGTERM or SIGHUP that arrives while the server is still starting waits for
it instead of killing it.  The mask is a thread's: it holds for the process
because nothing starts a thread before (trio's threads come later, and
inherit it).
"""

from __future__ import annotations

import logging
import math
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from . import control

log = logging.getLogger(__name__)

#: The signals the server handles; they are blocked until it can (see signals_held).
SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

#: The answer to a reload asked for while the server is shutting down.
SHUTTING_DOWN = "the server is shutting down"


@dataclass(frozen=True)
class Request:
    """A request to reload the poems or to stop, and what brought it."""

    reload: bool
    #: What came, as the log names it: ``SIGTERM``, ``a stop request from ...``.
    what: str
    #: Where a reload's outcome goes, when someone waits for it (the control socket).
    outcome: control.Outcome | None = None

    def answer(self, failure: str | None) -> None:
        """Tell whoever waits how the request ended: None for success, else why not."""
        if self.outcome is not None:
            self.outcome.set(failure)

    def given_up(self) -> bool:
        """Whether the request is to be dropped: whoever asked has stopped waiting (see :mod:`.control`).

        Answers it if so.
        """
        if self.outcome is None or not self.outcome.asker_gone():
            return False
        log.warning(
            "not reloading for %s: it has given up waiting (under systemd: the reload "
            "took longer than the unit's TimeoutStartSec=, and systemd said it failed)",
            self.what,
        )
        self.outcome.set(control.GONE)
        return True


#: Where a server takes its requests out.
Requests = AsyncIterator[Request]

if TYPE_CHECKING:  # trio 0.22's channels cannot be subscripted at run time
    RequestSender = trio.MemorySendChannel[Request]


def open_requests() -> tuple[RequestSender, trio.MemoryReceiveChannel[Request]]:
    """The channel that brings a server its requests, in the order they came; never full."""
    return trio.open_memory_channel(math.inf)


# -- signals --------------------------------------------------------------------


def block_signals() -> None:
    """Hold the handled signals until an event loop's receiver is ready for them.

    Called as early as possible; a process forked meanwhile starts with
    them blocked too.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold the handled signals for an event loop's receiver, from now until the process exits.

    They stay blocked until :func:`signal_receiver` unblocks them; those
    that come once serving is over are ignored.
    """
    block_signals()
    # A signal that comes while the process exits must not kill it, in any
    # thread. The receiver puts back the handlers it found when it closes:
    # finding this one, not the default action, covers the way out of the
    # event loop. SIG_IGN would also drop the signals held back during
    # start-up, so it is only set once serving is over; the interpreter
    # resets Python handlers to the default action when it finalizes, but
    # leaves SIG_IGN alone.
    for signum in SIGNALS:
        signal.signal(signum, _ignore_late_signal)
    try:
        yield
    finally:
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _ignore_late_signal(signum: int, frame: object) -> None:
    """Handler for the signals that arrive once serving is over."""


@contextmanager
def signal_receiver() -> Iterator[AsyncIterator[int]]:
    """trio's receiver of the handled signals; those held back since start-up arrive now."""
    with trio.open_signal_receiver(*SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        yield signals


async def relay_signals(signals: AsyncIterator[int], send: RequestSender) -> None:
    """Pass the handled signals on as requests: SIGHUP reloads, SIGTERM and SIGINT stop."""
    async for signum in signals:
        send.send_nowait(Request(reload=signum == signal.SIGHUP, what=signal.Signals(signum).name))


async def serve_control(
    sock: socket.socket | None, path: str | None, nursery: trio.Nursery, send: RequestSender
) -> None:
    """Take reload requests on the control socket ``sock`` (at ``path``) into ``send``; None takes none."""
    if sock is None or path is None:
        return

    def submit(what: str, outcome: control.Outcome) -> None:
        send.send_nowait(Request(reload=True, what=what, outcome=outcome))

    await nursery.start(control.serve, sock, path, submit)
    log.info("taking reload requests on %s", path)


# -- the running server -----------------------------------------------------------


class Runtime(Protocol):
    """A running server, as its lifecycle drives it: one process, or a supervisor."""

    async def reload(self, request: Request) -> str | None:
        """Reload the poems; None once done, else why it failed."""

    async def stop(self) -> None:
        """Shut down, letting poems in flight finish; returns once stopped."""

    def hurry(self, what: str) -> None:
        """A second request to stop (``what``) came: end the wait for poems in flight."""


async def take_requests(runtime: Runtime, requests: Requests) -> int:
    """Answer reload requests until one to stop comes; return how many stops came (0 or 1).

    A reload whose asker gave up waiting is dropped.  0 means the requests
    ended, or the caller cancelled this.
    """
    async for request in requests:
        if not request.reload:
            log.info("received %s: shutting down", request.what)
            return 1
        if not request.given_up():
            request.answer(await runtime.reload(request))
    return 0


async def shut_down(runtime: Runtime, requests: Requests, stops: int) -> None:
    """Stop ``runtime``, taking the requests that come meanwhile.

    ``stops`` is how many requests to stop came already: the one that
    brought the shutdown, or none when something else did (a worker that
    died).  Once two have come, :meth:`Runtime.hurry` is called, and again
    for each after.  Reloads are refused: the server is going away.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_take_requests_while_stopping, runtime, requests, stops)
        await runtime.stop()
        nursery.cancel_scope.cancel()


async def _take_requests_while_stopping(runtime: Runtime, requests: Requests, stops: int) -> None:
    async for request in requests:
        if request.reload:
            log.info("ignoring %s while shutting down", request.what)
            request.answer(SHUTTING_DOWN)
            continue
        stops += 1
        if stops == 1:
            log.info("received %s while shutting down already", request.what)
            continue
        runtime.hurry(request.what)

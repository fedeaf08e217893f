"""Turning clients away for a while before a server that cannot start exits.

A server that cannot start because of its configuration (a bad poem: exit
status 1; a bad command line: 2) is not restarted by the unit, and it turns
away the clients waiting on the sockets systemd passed it: left queued,
each would make systemd start it again at once.  Under load that is not
enough: a client arriving a moment after it exits starts it again, and so
does the next, a start every few hundred milliseconds, each one reading its
configuration, failing and logging why.  So a server that found clients
waiting keeps its sockets a little longer and closes every client that
arrives, then exits.  The socket stays listening in systemd throughout, and
starts cost one per :data:`HOLD` seconds of load, however many clients come.

Why not the socket unit's ``TriggerLimitIntervalSec=``/``TriggerLimitBurst=``:
hitting that limit puts the socket unit in a failed state and closes it, the
very thing to avoid.  ``PollLimitIntervalSec=`` would pause it instead, but
only from systemd 255 (Debian 13); this works under both.
"""

from __future__ import annotations

import logging
import select
import signal
import socket
import time
from collections.abc import Sequence
from types import FrameType

from . import listeners, systemd
from .phrases import count

log = logging.getLogger(__name__)

#: How long a server that cannot start, and found clients waiting, turns
#: arriving clients away before it exits.  Each start costs a Python
#: start-up (about 0.11 s of CPU, measured in a Debian 12 box on 2026-12-07);
#: an administrator who fixes the configuration and runs ``systemctl
#: restart`` does not wait for it.
HOLD = 5.0

#: How often the hold looks at whether a stop signal came.
_TICK = 0.1

#: The signals that end the hold at once: a stop (``systemctl stop`` or
#: ``restart``).  SIGHUP asks for a reload, which a server that is not
#: running cannot do: it is ignored.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def hold(sockets: Sequence[socket.socket], seconds: float = HOLD) -> int:
    """Turn away every client that arrives on ``sockets`` for ``seconds``; close them.

    Ends early when SIGTERM or SIGINT comes, including one that was
    blocked (held) before the call; SIGHUP is ignored meanwhile.  The
    signal handlers and mask are put back as they were.  The sockets are
    closed on the way out, never shut down (systemd shares them).
    Returns how many clients were turned away.
    """
    if not sockets:
        return 0
    stopped: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)

    handlers = {signum: signal.signal(signum, stop) for signum in _STOP_SIGNALS}
    handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Signals held back until now are delivered here, to stop().
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, list(handlers))
    log.info(
        "turning away the clients that arrive for %g s before exiting, so that "
        "they do not start the server again and again",
        seconds,
    )
    turned = 0
    try:
        poller = select.poll()
        by_fd = {sock.fileno(): sock for sock in sockets}
        for fd, sock in by_fd.items():
            sock.setblocking(False)  # turn_away() accepts until the queue is empty
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + seconds
        while not stopped and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(min(left, _TICK) * 1000):
                turned += listeners.turn_away(by_fd[fd])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for sock in sockets:
            sock.close()
    how = f"stopped by {signal.Signals(stopped[0]).name}" if stopped else "exiting"
    log.warning("turned away %s while failing to start; %s", count(turned, "more connection"), how)
    return turned


def take_waiting() -> list[socket.socket]:
    """For a start that fails before it takes its sockets: turn away the clients on those systemd passed.

    A command line that cannot be parsed, or a control socket that cannot
    be made, fails before the listening sockets are taken, and the clients
    that started the service would start it again at once.  Returns the
    passed sockets if clients were waiting on them (turned away now), for
    :func:`hold`; otherwise closes them and returns none.  Takes nothing
    without socket activation or when the passed descriptors are unusable
    (the first failure is what to report).

    SIGTERM, SIGINT and SIGHUP are blocked from here on, for :func:`hold`
    to take: a client turned away now may be the one whose test, or whose
    administrator, sends SIGTERM next, and the default action would kill
    the process before the hold is there to end cleanly.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, [*_STOP_SIGNALS, signal.SIGHUP])
    try:
        passed = systemd.listen_sockets()
    except systemd.ActivationError:
        return []
    sockets = []
    for fd in passed:
        try:
            sockets.append(listeners.adopt(fd))
        except (OSError, listeners.ListenerError):
            continue
    return turn_away_waiting(sockets)


def turn_away_waiting(sockets: Sequence[socket.socket]) -> list[socket.socket]:
    """Close the clients waiting on ``sockets`` unserved, for a start that failed.

    Logs a warning per socket that had any.  Returns ``sockets`` if any
    client was waiting (they are for :func:`hold`, still open); otherwise
    closes them and returns none.
    """
    turned = 0
    for sock in sockets:
        here = listeners.turn_away(sock)
        if here:
            log.warning(
                "closed %s waiting on %s without a poem: cannot start",
                count(here, "connection"),
                listeners.describe(sock),
            )
        turned += here
    if turned:
        return list(sockets)
    for sock in sockets:
        sock.close()
    return []

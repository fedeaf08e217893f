"""The accepting thread: the common case of the serving path, outside the event loop.

Nearly every poem fits in a new connection's send buffer, so serving a
client is a handful of system calls and no waiting: accept, one ``send()``,
end the stream, close.  Going through an event loop for that costs more
than the calls themselves.  Each wake-up of a trio task is a turn of the
scheduler and a re-arm of trio's one-shot epoll registration; with one
client at a time that was over a quarter of a poem's CPU time
(bench/README.md, "Where the time goes").  So the listening sockets are
watched by a thread of their own, blocked in a level-triggered epoll that
is set up once, and the thread serves every client whose poem the kernel
takes whole.  What has to wait is handed to the event loop: the rest of a
poem the kernel did not take at once, and a client that must linger
before it is closed.

The thread holds the GIL only while it runs Python code; every system call
releases it, so the event loop's thread (signals, reloads, lingering
clients) is never kept waiting for long.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from .linger import nothing_at_stake
from .listeners import CLIENT_GONE_ERRNOS, describe, format_peer, turn_away
from .phrases import count, reason
from .proxy_protocol import (
    CUT_SHORT,
    MAX_LENGTH,
    V2_PROXY_TCP4,
    V2_PROXY_TCP4_LENGTH,
    Header,
    HeaderError,
    parse,
)

log = logging.getLogger(__name__)

#: Connections closed at a time, while there is no poem, before the stop
#: request is looked at again.
TURN_AWAY_BATCH = 64

#: How long to wait before accepting again when out of descriptors or memory.
ACCEPT_RETRY = 0.1

#: How often, at most, running out of descriptors or memory is logged.
CAPACITY_LOG_INTERVAL = 10.0

# accept() fails like this when the process or the system is out of a
# resource; the connection stays queued, so wait and try again.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

#: How often, at most, connections refused for want of a valid PROXY
#: protocol header are logged as a warning (each one is, at debug level).
REFUSED_LOG_INTERVAL = 10.0

#: Why a client that closed before its PROXY protocol header was whole is refused.
CLOSED_FIRST = "the client closed before it was whole"

#: SO_LINGER on, with a zero timeout: close() resets the connection.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)

#: The families whose connections have a struct tcp_info to ask.
TCP_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})

# Level-triggered: while connections wait, every poll reports the socket,
# so one accept() per report takes them all, as nginx does by default
# (multi_accept off).  Accepting until accept() fails would cost a system
# call and a Python exception for every batch, more than the polls saved:
# at 64 clients a batch was under two connections.  With EPOLLEXCLUSIVE
# (Linux 4.5), a connection wakes one of the processes waiting on a shared
# listening socket (serve --workers), not all of them.
_LISTENING = select.EPOLLIN | getattr(select, "EPOLLEXCLUSIVE", 0)


class PoemSource(Protocol):
    """Where a server gets the poem it sends: a :class:`~.poetry.PoetryService`."""

    @property
    def poem(self) -> bytes: ...

    @property
    def label(self) -> str: ...


#: :attr:`Acceptor.stage`: between connections, sending a poem, ending a stream.
IDLE, SENDING, ENDING = 0, 1, 2

#: Takes a connection whose poem is not all sent: (connection, poem, bytes
#: sent, bytes of its input read: its PROXY protocol header).
SendRest = Callable[[_socket.socket, bytes, int, int], None]

#: Takes a connection that has its whole poem, to close later: (connection,
#: bytes sent if it may close once nothing is at stake, else None, bytes of
#: its input read: its PROXY protocol header).
Linger = Callable[[_socket.socket, "int | None", int], None]

#: Takes a connection whose PROXY protocol header has not all arrived:
#: (connection, the bytes of it received so far, the balancer's address).
AwaitHeader = Callable[[_socket.socket, bytes, str], None]


class Acceptor:
    """Accepts connections on ``listeners`` and serves them the poem of ``source``.

    :meth:`run` is the thread's body and returns after :meth:`stop`, which
    any thread may call.  A poem the kernel does not take whole goes to
    ``send_rest``; a client that has its whole poem but may not be closed
    yet goes to ``linger``; both are called in this thread and must return
    at once.  ``always_linger`` hands every client to ``linger`` (TCP or
    not); otherwise a TCP client is closed here when nothing is at stake
    (:func:`~.linger.nothing_at_stake`).  The listening sockets stay open:
    they are their owner's to close, after :meth:`run` has returned.

    With ``await_header``, every client must send a PROXY protocol header
    first (:mod:`~.proxy_protocol`).  One already there is read here; one
    still on its way goes to ``await_header`` with what came of it; one
    that can never be valid is reset and counted in ``refused``.
    """

    def __init__(
        self,
        source: PoemSource,
        listeners: list[socket.socket],
        *,
        send_rest: SendRest,
        linger: Linger,
        always_linger: bool = False,
        await_header: AwaitHeader | None = None,
        refused: Refusals | None = None,
    ) -> None:
        self.source = source
        self.listeners = listeners
        self.send_rest = send_rest
        self.linger = linger
        self.always_linger = always_linger
        self.await_header = await_header
        #: Connections refused for want of a valid header, shared with ``await_header``'s side.
        self.refused = refused if refused is not None else header_refusals(source)
        # Where a header is received: only this thread uses it.
        self._header = bytearray(MAX_LENGTH)
        # Only the accepting thread writes the figures below; the event
        # loop's thread reads them, and each write is one store, seen whole.
        #: Poems handed whole to the kernel by the accepting thread, and their bytes.
        self.poems_served = 0
        self.bytes_served = 0
        #: Poems handed to ``send_rest`` so far.
        self.poems_handed_over = 0
        #: Where the connection being served is: SENDING its poem, or ENDING
        #: its stream and closing it (or handing it on); IDLE between
        #: connections.  A client that has seen the end of its poem finds its
        #: connection counted as lingering until the closer has it.
        self.stage = IDLE
        # What stop() writes to; run() watches it with the listening sockets.
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._trouble = AcceptTrouble(source)

    def stop(self) -> None:
        """Make :meth:`run` return before it accepts another client (from any thread)."""
        os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """Release what the acceptor holds, once :meth:`run` has returned (or never ran)."""
        os.close(self._wake)

    def run(self) -> None:
        """Serve until :meth:`stop`; the thread's body.

        An unexpected error from ``accept()`` ends it with that error.
        """
        epoll = select.epoll()
        served = {sock.fileno(): _Listening(sock, not self.always_linger) for sock in self.listeners}
        try:
            epoll.register(self._wake, select.EPOLLIN)
            for fd in served:
                epoll.register(fd, _LISTENING)
            poll = epoll.poll
            while True:
                for fd, _ in poll():
                    if fd == self._wake:
                        return
                    if not self._serve_one(served[fd]):
                        self._pause()
        finally:
            epoll.close()
            for listening in served.values():
                listening.sockets.forget()

    def _serve_one(self, listening: _Listening) -> bool:
        """Accept a client and send it the poem; False if out of descriptors or memory."""
        poem = self.source.poem
        size = len(poem)
        if not size:
            self._trouble.turn_away(listening.listener)
            return True
        try:
            fd, address = listening.accept()
        except BlockingIOError:  # another process took it (serve --workers)
            return True
        except OSError as exc:
            return self._trouble.failed(listening.listener, exc)
        conn = listening.sockets.get(fd)
        if self.await_header is not None:
            self._read_header(listening, conn, fd, address, poem)
            return True
        if log.isEnabledFor(logging.DEBUG):
            self._log_sending(size, format_peer(listening.family, address))
        self._send(listening, conn, fd, poem, 0)
        return True

    def _send(self, listening: _Listening, conn: _socket.socket, fd: int, poem: bytes, header: int) -> None:
        """Send the poem to the client just accepted; ``header``: the bytes of its header read."""
        size = len(poem)
        self.stage = SENDING
        try:
            sent = conn.send(poem, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.stage = IDLE
            log_lost(exc)
            os.close(fd)
            return
        if sent == size:
            # Counted before the end of the stream goes out: a client that
            # has it finds its poem counted.
            self.stage = ENDING
            self.poems_served += 1
            self.bytes_served += size
            self._finish(listening, conn, fd, size, header)
            self.stage = IDLE
        else:
            # Counted as handed over and no longer as sending in one go (no
            # thread switch between two stores): send_rest() wakes the event
            # loop, which may count at once.
            self.poems_handed_over += 1
            self.stage = IDLE
            self.send_rest(listening.sockets.take(fd), poem, sent, header)

    def _read_header(
        self, listening: _Listening, conn: _socket.socket, fd: int, address: object, poem: bytes
    ) -> None:
        """Read the client's PROXY protocol header, then send the poem, as far as it arrived."""
        try:
            received = conn.recv_into(self._header, MAX_LENGTH, socket.MSG_DONTWAIT)
        except BlockingIOError:  # nothing yet
            received = -1
        except OSError as exc:
            log_lost(exc)
            os.close(fd)
            return
        if received >= V2_PROXY_TCP4_LENGTH and self._header[:16] == V2_PROXY_TCP4:
            # What a balancer nearly always sends: only its length matters,
            # unless the line below names the client.
            if log.isEnabledFor(logging.DEBUG):
                self._log_behind(len(poem), parse(self._header[:received]), listening, address)
            self._send(listening, conn, fd, poem, V2_PROXY_TCP4_LENGTH)
            return
        data = self._header[:received] if received > 0 else b""
        try:
            header = parse(data)
        except HeaderError as exc:
            self._refuse(listening, conn, fd, address, exc.kind, str(exc))
            return
        if not received:
            self._refuse(listening, conn, fd, address, CUT_SHORT, str(HeaderError(CUT_SHORT, CLOSED_FIRST)))
        elif header is None:
            assert self.await_header is not None
            self.await_header(listening.sockets.take(fd), bytes(data), format_peer(listening.family, address))
        else:
            if log.isEnabledFor(logging.DEBUG):
                self._log_behind(len(poem), header, listening, address)
            self._send(listening, conn, fd, poem, header.length)

    def _log_behind(self, size: int, header: Header | None, listening: _Listening, address: object) -> None:
        assert header is not None
        log_sending_behind(self.source.label, size, header, format_peer(listening.family, address))

    def _refuse(
        self, listening: _Listening, conn: _socket.socket, fd: int, address: object, kind: str, detail: str
    ) -> None:
        """Reset a connection that brought no valid header, and count it."""
        self.refused.add(kind, format_peer(listening.family, address), detail)
        reset(conn)
        os.close(fd)

    def _finish(self, listening: _Listening, conn: _socket.socket, fd: int, size: int, header: int) -> None:
        """The whole poem is with the kernel: close, or end the stream and linger."""
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:  # the client is already gone
            os.close(fd)
            return
        # The end of the poem is on its way before the question is asked:
        # input arriving between the question and close() then makes the
        # close a reset after the end of the poem, not instead of it.
        if not listening.quick:
            self.linger(listening.sockets.take(fd), None, header)
        elif nothing_at_stake(conn, size, header):
            os.close(fd)
        else:  # not acknowledged yet, or the client has spoken
            self.linger(listening.sockets.take(fd), size, header)

    def _pause(self) -> None:
        """Wait ACCEPT_RETRY seconds before accepting again, or until :meth:`stop`."""
        poll = select.poll()
        poll.register(self._wake, select.POLLIN)
        poll.poll(ACCEPT_RETRY * 1000)

    def _log_sending(self, size: int, peer: str) -> None:
        log_sending(self.source.label, size, peer)

class AcceptTrouble:
    """What accepting runs into, said now and then: no poem to serve yet, no descriptor or memory left.

    The accepting thread's, and the event loop's accept loop's (over TLS).
    """

    def __init__(self, source: PoemSource) -> None:
        self.source = source
        self._failed_accepts = Tally(CAPACITY_LOG_INTERVAL)
        self._turned_away = Tally(CAPACITY_LOG_INTERVAL)

    def turn_away(self, listener: socket.socket) -> None:
        """No poem yet (a proxy whose upstream never answered): close the waiting clients at once."""
        turned = self._turned_away.add(turn_away(listener, TURN_AWAY_BATCH))
        if turned:
            log.warning(
                "no poem to serve yet: closed %s on %s without one",
                count(turned, "connection"),
                describe(listener),
                extra={"POEM": self.source.label, "CLIENTS": turned},
            )

    def failed(self, listener: socket.socket, exc: OSError) -> bool:
        """After accept() failed: True to go on, False to wait ACCEPT_RETRY (out of descriptors or memory).

        Any other error is raised.
        """
        if exc.errno in CLIENT_GONE_ERRNOS:
            return True
        if exc.errno not in _CAPACITY_ERRNOS:
            raise exc
        # Every queued connection fails the same way until a descriptor is
        # free again: say so once in a while, with how often it happened.
        failures = self._failed_accepts.add(1)
        if failures:
            log.warning(
                "cannot accept connections on %s: %s; retrying (%d failed accepts since the last report)",
                describe(listener),
                reason(exc),
                failures,
                extra={"POEM": self.source.label, "ERRNO": exc.errno},
            )
        return False


class _Listening:
    """One listening socket as the accepting thread uses it."""

    def __init__(self, listener: socket.socket, may_close_early: bool) -> None:
        self.listener = listener
        # listener.accept() wraps each connection in a socket.socket and reads
        # the listener's family and type through properties that build enum
        # members: a tenth of the CPU time of a poem.  The C-level accept and
        # socket type underneath do the same without that.
        self.accept = listener._accept  # type: ignore[attr-defined]
        self.family = int(listener.family)
        # Only TCP says, through struct tcp_info, when nothing is at stake.
        self.quick = may_close_early and self.family in TCP_FAMILIES
        self.sockets = SocketsByNumber(self.family, int(listener.type), listener.proto)


class SocketsByNumber:
    """Socket objects for accepted descriptors, kept for the next connection with the same number.

    CPython's socket constructor checks that a descriptor is a socket by
    asking for its address (``getsockname()``), one system call in seven of
    a poem.  The kernel gives each new connection the lowest free number,
    so the same few numbers come back all the time, and an object made for
    one number serves every later connection with that number.

    The rule that makes it safe: a kept object never closes its descriptor
    itself.  The thread closes the descriptor with ``os.close()`` and keeps
    the object, whose number then belongs to no one until ``accept()``
    returns it again; :meth:`take` hands an object on for good (it leaves
    the cache, and its new owner closes it), and :meth:`forget` detaches
    every kept object, so that none can close a number that is someone
    else's by then when it is collected.
    """

    def __init__(self, family: int, kind: int, proto: int) -> None:
        self._make = lambda fd: _socket.socket(family, kind, proto, fd)
        self._kept: dict[int, _socket.socket] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def get(self, fd: int) -> _socket.socket:
        """The object for the connection just accepted as ``fd``; it stays here."""
        sock = self._kept.get(fd)
        if sock is None:
            sock = self._kept[fd] = self._make(fd)
        return sock

    def take(self, fd: int) -> _socket.socket:
        """The object for ``fd``, no longer kept: the caller owns the connection now."""
        sock = self._kept.pop(fd, None)
        return sock if sock is not None else self._make(fd)

    def forget(self) -> None:
        """Detach every kept object without closing anything."""
        for sock in self._kept.values():
            sock.detach()
        self._kept.clear()


class Refusals:
    """Connections refused before their poem began, logged now and then.

    Each is logged at debug level, as "``action`` a connection from PEER:
    detail"; a warning sums them up at most once per REFUSED_LOG_INTERVAL,
    by kind, as "``action`` N connections that ``what``".  Safe to use from
    any thread.
    """

    def __init__(
        self, source: PoemSource, action: str, what: str, *, field: str = "PEER", interval: float | None = None
    ) -> None:
        self.source = source
        self.action = action
        self.what = what
        # The journal field that names the peer: BALANCER= for a connection
        # that brought no header, since no client was named.
        self._field = field
        #: Every connection refused so far.
        self.total = 0
        self._kinds: Counter[str] = Counter()
        self._tally = Tally(REFUSED_LOG_INTERVAL if interval is None else interval)
        self._lock = threading.Lock()

    def add(self, kind: str, peer: str, detail: str) -> None:
        """Count a connection from ``peer`` refused, of ``kind`` (a word or two: "timed out")."""
        log.debug(
            "%s a connection from %s: %s",
            self.action,
            peer,
            detail,
            extra={"POEM": self.source.label, self._field: peer},
        )
        with self._lock:
            self.total += 1
            self._kinds[kind] += 1
            if self._tally.add(1):
                self._report()

    def flush(self) -> None:
        """Log the connections refused since the last warning, if any: for the end of serving."""
        with self._lock:
            if self._kinds:
                self._report()

    def _report(self) -> None:
        # Called with the lock held.
        kinds, self._kinds = self._kinds, Counter()
        refused = sum(kinds.values())
        log.warning(
            "%s %s that %s (%s)",
            self.action,
            count(refused, "connection"),
            self.what,
            ", ".join(f"{number} {kind}" for kind, number in sorted(kinds.items())),
            extra={"POEM": self.source.label, "CLIENTS": refused},
        )


def header_refusals(source: PoemSource) -> Refusals:
    """The count of connections reset for want of a valid PROXY protocol header."""
    return Refusals(source, "reset", "sent no valid PROXY protocol header", field="BALANCER")


class Tally:
    """Counts what happens too often to log each time, for a report now and then."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._count = 0
        self._reported_at = -interval

    def add(self, number: int) -> int:
        """Count ``number`` more; the count to report now (then start again), or 0 if too soon."""
        self._count += number
        now = self._clock()
        if not self._count or now - self._reported_at < self.interval:
            return 0
        count, self._count, self._reported_at = self._count, 0, now
        return count


def log_sending(label: str, size: int, peer: str) -> None:
    """The debug line of a poem about to be sent to ``peer``."""
    log.debug("sending %d bytes of poetry to %s", size, peer, extra={"POEM": label, "PEER": peer, "BYTES": size})


def log_sending_behind(label: str, size: int, header: Header, balancer: str) -> None:
    """The debug line of a poem about to be sent through ``balancer``, for the client ``header`` names.

    PEER= is that client; a header that names none (a LOCAL health check,
    or a client the balancer could not tell) leaves the balancer there.
    """
    if header.family:
        peer = format_peer(header.family, header.source)
        how = f"{peer} via {balancer}"
    else:
        peer = balancer
        how = f"{balancer} (the balancer's {'health check' if header.local else 'header names no client'})"
    log.debug(
        "sending %d bytes of poetry to %s",
        size,
        how,
        extra={"POEM": label, "PEER": peer, "BALANCER": balancer, "BYTES": size},
    )


def reset(conn: _socket.socket) -> None:
    """Make closing ``conn`` a reset: for a client that must not take what it has for a whole poem."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)


def abort(conn: _socket.socket) -> None:
    """Close, with a reset, a connection whose poem is not all sent, or was refused.

    End of stream is the only end-of-poem mark the protocol has: a plain
    close would hand the client a truncated poem that looks whole.
    """
    reset(conn)
    conn.close()


def take_header(conn: _socket.socket, taken: bytes) -> tuple[bytes, Header | None]:
    """Take more of a PROXY protocol header from ``conn``, and not a byte past it.

    ``taken`` is what was taken of it before.  Returns what is taken now,
    and the header once it is whole (None before).  Whatever arrived while
    the header is not yet whole is all header, and is taken; the bytes
    after a whole one (a TLS client's handshake) are only looked at
    (MSG_PEEK) and stay for whoever reads next.

    Raises BlockingIOError if nothing new has arrived, :exc:`HeaderError`
    if the bytes cannot become a valid header or the client closed first
    (CUT_SHORT), and OSError if the connection failed.
    """
    more = conn.recv(MAX_LENGTH - len(taken), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if not more:
        raise HeaderError(CUT_SHORT, CLOSED_FIRST)
    header = parse(taken + more)
    # Already received, so one recv() takes all of it.
    rest = len(more) if header is None else header.length - len(taken)
    return taken + conn.recv(rest, socket.MSG_DONTWAIT), header


def log_lost(exc: OSError) -> None:
    log.debug("a client went away before it had its poem: %s", reason(exc))

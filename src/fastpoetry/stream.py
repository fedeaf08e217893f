"""The serving path: one whole poem to every client of a stream socket.

The protocol is the fast poetry server's: a client connects, receives the
poem's bytes exactly, and the server closes the connection.

Most poems fit in a socket's send buffer, so the common case is one
``send()`` that takes the whole poem.  The accept loop is built for it: it
accepts connections in batches, sends each poem straight from the loop,
closes the connection at once when nothing is at stake (see
:mod:`~.linger`) or hands it to a :class:`~.linger.LingeringCloser`, and
spawns a task only for a poem the kernel did not take at once.  (The
idiomatic ``trio.serve_tcp`` spends a task and a stream object on every
client and serves several times fewer poems a second.)

The server takes ready-made listening sockets and does not care whether
they were bound here or passed in by systemd.
"""

from __future__ import annotations

import _socket
import errno
import logging
import socket
import struct
from typing import Protocol

import trio

from .linger import LingeringCloser, discard_input, nothing_at_stake
from .listeners import CLIENT_GONE_ERRNOS, describe, format_peer, turn_away
from .phrases import count, reason
from .service import Service

log = logging.getLogger(__name__)

#: Connections accepted per wake-up before other tasks get a turn.
ACCEPT_BATCH = 64

#: How long to wait before accepting again when out of descriptors or memory.
ACCEPT_RETRY = 0.1

#: How often, at most, running out of descriptors or memory is logged.
CAPACITY_LOG_INTERVAL = 10.0

# accept() fails like this when the process or the system is out of a
# resource; the connection stays queued, so wait and try again.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

# The families whose connections have a struct tcp_info to ask.
_TCP_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})

# SO_LINGER on, with a zero timeout: close() resets the connection.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class PoemSource(Protocol):
    """Where a server gets the poem it sends: a :class:`~.poetry.PoetryService`."""

    @property
    def poem(self) -> bytes: ...

    @property
    def label(self) -> str: ...


class StreamServer(Service):
    """Serves the poem of ``source`` on listening stream sockets.

    The sockets (TCP or AF_UNIX, non-blocking) belong to the server from then
    on and are closed when it stops accepting.  A client is dropped if it has
    not taken the whole poem within ``send_timeout`` seconds (with a reset,
    so that it cannot take part of the poem for all of it), or has not
    closed within that time once it has it.

    A client that has the whole poem is closed as soon as nothing is at
    stake (:func:`~.linger.nothing_at_stake`): at once, or when its late
    acknowledgement arrives, unless it has sent something.  With
    ``always_linger`` every client is kept until it closes, which also
    spares a client that starts writing only after it has the poem a reset
    on its writes.
    """

    def __init__(
        self,
        source: PoemSource,
        listeners: list[socket.socket],
        *,
        send_timeout: float,
        always_linger: bool = False,
        name: str = "stream",
    ) -> None:
        super().__init__(name)
        self.source = source
        self.listeners = listeners
        self.send_timeout = send_timeout
        self.always_linger = always_linger
        #: Poems handed whole to the kernel, and their bytes.
        self.poems_served = 0
        self.bytes_served = 0
        #: Poems being sent by a task of their own right now.
        self.poems_in_flight = 0
        self._closer = LingeringCloser(send_timeout)
        self._accepting = trio.CancelScope()
        self._everything = trio.CancelScope()
        self._stopped = trio.Event()
        self._failed_accepts = _Tally(CAPACITY_LOG_INTERVAL)
        self._turned_away = _Tally(CAPACITY_LOG_INTERVAL)

    @property
    def clients_lingering(self) -> int:
        """Clients that have their poem, but have not closed yet."""
        return len(self._closer)

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        for sock in self.listeners:
            log.info(
                "serving %s on %s",
                self.source.label,
                describe(sock),
                extra={"POEM": self.source.label, "LISTEN": describe(sock)},
            )
        nursery.start_soon(self._serve)

    async def stop(self) -> None:
        """Stop accepting, then wait for the poems in flight.

        If the caller's deadline cuts the wait short, the connections still
        open are closed at once.
        """
        await super().stop()
        self._accepting.cancel()
        try:
            await self._stopped.wait()
        finally:
            self._everything.cancel()
            with trio.CancelScope(shield=True):
                await self._stopped.wait()

    async def _serve(self) -> None:
        try:
            with self._everything:
                async with trio.open_nursery() as lingering:
                    lingering.start_soon(self._closer.run)
                    async with trio.open_nursery() as senders:
                        with self._accepting:
                            async with trio.open_nursery() as acceptors:
                                for sock in self.listeners:
                                    acceptors.start_soon(self._accept_loop, sock, senders)
                        self._close_listeners()
                    self._closer.finish()
        finally:
            self._close_listeners()
            self._stopped.set()

    def _close_listeners(self) -> None:
        # Only our descriptor goes; a socket systemd passed stays open in
        # systemd and queues connections for the next start.
        for sock in self.listeners:
            sock.close()

    async def _accept_loop(self, listener: socket.socket, senders: trio.Nursery) -> None:
        # listener.accept() wraps each connection in a socket.socket and reads
        # the listener's family and type through properties that build enum
        # members: a tenth of the CPU time of a poem.  The C-level accept and
        # socket type underneath do the same without that.
        accept = listener._accept  # type: ignore[attr-defined]
        family, kind, proto = int(listener.family), int(listener.type), listener.proto
        # Only TCP says, through struct tcp_info, when nothing is at stake.
        quick = family in _TCP_FAMILIES and not self.always_linger
        finish = self._finish
        while True:
            await trio.lowlevel.wait_readable(listener)
            poem = self.source.poem
            size = len(poem)
            if not size:
                self._turn_away(listener)
                continue
            debug = log.isEnabledFor(logging.DEBUG)
            served = 0
            exhausted = False
            for _ in range(ACCEPT_BATCH):
                try:
                    fd, address = accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in CLIENT_GONE_ERRNOS:
                        continue
                    if exc.errno not in _CAPACITY_ERRNOS:
                        raise
                    self._report_capacity(listener, exc)
                    exhausted = True
                    break
                conn = _socket.socket(family, kind, proto, fd)
                if debug:
                    self._log_sending(size, format_peer(family, address))
                try:
                    sent = conn.send(poem, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    _log_lost(exc)
                    conn.close()
                    continue
                if sent == size:
                    finish(conn, size, quick)
                    served += 1
                else:
                    senders.start_soon(self._send_rest, conn, quick, poem, sent)
            self.poems_served += served
            self.bytes_served += served * size
            if exhausted:
                await trio.sleep(ACCEPT_RETRY)

    async def _send_rest(self, conn: _socket.socket, quick: bool, poem: bytes, sent: int) -> None:
        """Send what the first ``send()`` left of ``poem``, then finish.

        What the client sends meanwhile is read and dropped: a client that
        writes more than the socket buffers hold before it reads would
        otherwise wait on us while we wait on it.
        """
        view = memoryview(poem)
        failure: OSError | None = None
        self.poems_in_flight += 1
        try:
            with trio.move_on_after(self.send_timeout) as timeout:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_discard_input, conn)
                    # Caught here, not around the nursery, which would wrap
                    # it in an exception group.
                    try:
                        while sent < len(view):
                            await trio.lowlevel.wait_writable(conn)
                            try:
                                sent += conn.send(view[sent:], socket.MSG_DONTWAIT)
                            except BlockingIOError:
                                pass
                    except OSError as exc:
                        failure = exc
                    nursery.cancel_scope.cancel()
        except BaseException:  # cancelled: the shutdown deadline
            _abort(conn)
            raise
        finally:
            self.poems_in_flight -= 1
        if failure is not None:
            _log_lost(failure)
            conn.close()
            return
        if timeout.cancelled_caught:
            log.info(
                "dropped a client that did not take its poem within %g s (%d of %d bytes sent)",
                self.send_timeout,
                sent,
                len(view),
                extra={"POEM": self.source.label, "BYTES": sent},
            )
            _abort(conn)
            return
        self._finish(conn, len(view), quick)
        self.poems_served += 1
        self.bytes_served += len(view)

    def _finish(self, conn: _socket.socket, size: int, quick: bool) -> None:
        """The whole poem is with the kernel: close, or end the stream and linger.

        ``size``: the bytes sent; ``quick``: close at once if nothing is at stake.
        """
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:  # the client is already gone
            conn.close()
            return
        # The end of the poem is on its way before the question is asked:
        # input arriving between the question and close() then makes the
        # close a reset after the end of the poem, not instead of it.
        if not quick:
            self._closer.close_when_done(conn)
        elif nothing_at_stake(conn, size):
            conn.close()
        else:  # not acknowledged yet, or the client has spoken
            self._closer.close_when_done(conn, size)

    def _log_sending(self, size: int, peer: str) -> None:
        log.debug(
            "sending %d bytes of poetry to %s",
            size,
            peer,
            extra={"POEM": self.source.label, "PEER": peer, "BYTES": size},
        )

    def _turn_away(self, listener: socket.socket) -> None:
        """No poem yet (a proxy whose upstream never answered): close at once."""
        turned = self._turned_away.add(turn_away(listener, ACCEPT_BATCH))
        if turned:
            log.warning(
                "no poem to serve yet: closed %s on %s without one",
                count(turned, "connection"),
                describe(listener),
                extra={"POEM": self.source.label, "CLIENTS": turned},
            )

    def _report_capacity(self, listener: socket.socket, exc: OSError) -> None:
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


class _Tally:
    """Counts what happens too often to log each time, for a report now and then."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._count = 0
        self._reported_at = -interval

    def add(self, number: int) -> int:
        """Count ``number`` more; the count to report now (then start again), or 0 if too soon."""
        self._count += number
        now = trio.current_time()
        if not self._count or now - self._reported_at < self.interval:
            return 0
        count, self._count, self._reported_at = self._count, 0, now
        return count


async def _discard_input(conn: _socket.socket) -> None:
    """Read and drop whatever the client sends, until it stops sending."""
    while not discard_input(conn):
        await trio.lowlevel.wait_readable(conn)


def _abort(conn: _socket.socket) -> None:
    """Close a connection whose poem is not all sent, with a reset.

    End of stream is the only end-of-poem mark the protocol has: a plain
    close would hand the client a truncated poem that looks whole.
    """
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    conn.close()


def _log_lost(exc: OSError) -> None:
    log.debug("a client went away before it had its poem: %s", reason(exc))

"""The serving path: one whole poem to every client of a stream socket.

The protocol is the fast poetry server's: a client connects, receives the
poem's bytes exactly, and the server closes the connection.

Most poems fit in a socket's send buffer, so the common case is one
``send()`` that takes the whole poem, and an accepting thread serves it
without the event loop (see :mod:`~.acceptor`).  The event loop does what
has to wait: a task for each poem the kernel did not take at once, and the
:class:`~.linger.LingeringCloser` for clients that may not be closed yet.
(The idiomatic ``trio.serve_tcp`` spends a task and a stream object on
every client and serves several times fewer poems a second.)

Over TLS every client waits for a round trip of the handshake, so the
event loop accepts and serves each itself, in a task (see :mod:`~.tls`).

The server takes ready-made listening sockets and does not care whether
they were bound here or passed in by systemd.
"""

from __future__ import annotations

import _socket
import logging
import socket
import ssl
import threading
from typing import Protocol

import trio

from .acceptor import (
    ACCEPT_RETRY,
    ENDING,
    SENDING,
    TCP_FAMILIES,
    AcceptTrouble,
    Acceptor,
    PoemSource,
    Refusals,
    header_refusals,
    log_lost,
    log_sending,
    log_sending_behind,
    reset,
)
from .linger import LingeringCloser, discard_input, nothing_at_stake, settled
from .listeners import describe, format_peer
from .options import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_HEADER_TIMEOUT
from .proxy_protocol import CUT_SHORT, MAX_LENGTH, TIMED_OUT, Header, HeaderError, parse
from .service import Service
from .tls import HandshakeFailed, close_notify, handshake, send_poem

#: Connections accepted at a time by the event loop (over TLS) before it
#: looks at its other tasks again.
ACCEPT_BATCH = 16

log = logging.getLogger(__name__)


__all__ = ["PoemSource", "StreamServer", "TlsSource"]


class TlsSource(Protocol):
    """Where a TLS server gets the context it serves with: a :class:`~.tls.Credentials`."""

    @property
    def context(self) -> ssl.SSLContext: ...


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

    With ``proxy_protocol``, every client must send a PROXY protocol
    header first (a load balancer's, :mod:`~.proxy_protocol`), within
    ``header_timeout`` seconds.  A connection without a valid one gets no
    byte of the poem: it is reset, and counted in a warning now and then.

    With ``tls``, every client is served over TLS with ``tls.context``
    (:mod:`~.tls`), accepted and served in the event loop: a handshake
    that fails or does not finish within ``handshake_timeout`` seconds
    gets no byte of the poem, and is counted in a warning now and then.
    The poem ends with a close_notify.  A PROXY protocol header comes
    before the handshake, in plain text.
    """

    def __init__(
        self,
        source: PoemSource,
        listeners: list[socket.socket],
        *,
        send_timeout: float,
        always_linger: bool = False,
        proxy_protocol: bool = False,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        tls: TlsSource | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        name: str = "stream",
    ) -> None:
        super().__init__(name)
        self.source = source
        self.listeners = listeners
        self.send_timeout = send_timeout
        self.always_linger = always_linger
        self.proxy_protocol = proxy_protocol
        self.header_timeout = header_timeout
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        #: Connections dropped for a TLS handshake that failed or was too slow.
        self.handshakes_failed = Refusals(source, "dropped", "did not complete a TLS handshake")
        self._header_refusals = header_refusals(source)
        # Over TLS: the scopes of the clients still before their poem (their
        # header or handshake), which stopping cancels.
        self._before_poem: set[trio.CancelScope] = set()
        self._stopping = False
        self._acceptor: Acceptor | None = None
        # Poems handed over (by the accepting thread, and by the tasks that
        # waited for a header or a handshake), those whose task has started,
        # the tasks sending right now, and the poems they finished (and
        # their bytes); the thread counts its own.
        self._handed_over_here = 0
        self._tasks_started = 0
        self._tasks_sending = 0
        self._finished = 0
        self._finished_bytes = 0
        self._closer = LingeringCloser(send_timeout)
        self._accepting = trio.CancelScope()
        self._everything = trio.CancelScope()
        self._stopped = trio.Event()

    @property
    def poems_served(self) -> int:
        """Poems handed whole to the kernel."""
        return self._finished + (self._acceptor.poems_served if self._acceptor else 0)

    @property
    def bytes_served(self) -> int:
        """The bytes of :attr:`poems_served`."""
        return self._finished_bytes + (self._acceptor.bytes_served if self._acceptor else 0)

    @property
    def poems_in_flight(self) -> int:
        """Poems begun and not yet handed whole to the kernel."""
        acceptor = self._acceptor
        if acceptor is None:  # over TLS: only tasks send
            return self._tasks_sending
        # The thread counts a poem as handed over and leaves SENDING in two
        # stores with nothing between them where CPython switches threads,
        # and these reads are the same: a poem is counted once.
        sending = acceptor.stage == SENDING
        waiting = acceptor.poems_handed_over + self._handed_over_here - self._tasks_started
        return sending + waiting + self._tasks_sending

    @property
    def headers_refused(self) -> int:
        """Connections reset for want of a valid PROXY protocol header."""
        return self._header_refusals.total

    @property
    def clients_lingering(self) -> int:
        """Clients that have their poem, but have not closed yet."""
        acceptor = self._acceptor
        ending = acceptor is not None and acceptor.stage == ENDING
        return ending + len(self._closer)

    async def start(self, nursery: trio.Nursery) -> None:
        await super().start(nursery)
        over = " over TLS" if self.tls is not None else ""
        for sock in self.listeners:
            log.info(
                "serving %s%s on %s",
                self.source.label,
                over,
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
                            if self.tls is None:
                                # Clients whose header is still on its way
                                # have begun no poem: stopping drops them.
                                async with trio.open_nursery() as not_begun:
                                    await self._accept_in_thread(senders, not_begun)
                            else:
                                await self._accept_here(senders)
                        self._drop_clients_before_their_poem()
                        self._close_listeners()
                    self._closer.finish()
        finally:
            self._closer.close_stragglers()
            self._close_listeners()
            self._header_refusals.flush()
            self.handshakes_failed.flush()
            self._stopped.set()

    def _close_listeners(self) -> None:
        # Only our descriptor goes; a socket systemd passed stays open in
        # systemd and queues connections for the next start.
        for sock in self.listeners:
            sock.close()

    async def _accept_in_thread(self, senders: trio.Nursery, not_begun: trio.Nursery) -> None:
        """Run the accepting thread until cancelled; its error, if it fails, is raised here.

        The thread is always stopped and waited for before this returns, so
        that nothing is handed over once the nurseries close.
        """
        token = trio.lowlevel.current_trio_token()
        ended = trio.Event()
        failure: list[BaseException] = []

        def send_rest(conn: _socket.socket, poem: bytes, sent: int, header: int) -> None:
            # Called in the thread: the task is started in the event loop's.
            def start() -> None:
                try:
                    senders.start_soon(self._send_rest, conn, poem, sent, header)
                except RuntimeError:  # the nursery is closed: shutting down
                    _abort(conn)

            token.run_sync_soon(start)

        def await_header(conn: _socket.socket, data: bytes, balancer: str) -> None:
            def start() -> None:
                try:
                    not_begun.start_soon(self._await_header, conn, data, balancer, senders)
                except RuntimeError:
                    _abort(conn)

            token.run_sync_soon(start)


        def body() -> None:
            try:
                acceptor.run()
            except BaseException as exc:  # raised in the event loop's thread
                failure.append(exc)
            finally:
                token.run_sync_soon(ended.set)

        acceptor = self._acceptor = Acceptor(
            self.source,
            self.listeners,
            send_rest=send_rest,
            linger=self._closer.close_when_done,
            always_linger=self.always_linger,
            await_header=await_header if self.proxy_protocol else None,
            refused=self._header_refusals,
        )
        try:
            threading.Thread(target=body, name=f"fastpoetry {self.name}", daemon=True).start()
            try:
                await ended.wait()
            finally:
                acceptor.stop()
                with trio.CancelScope(shield=True):
                    await ended.wait()
        finally:
            acceptor.close()
        if failure:
            raise failure[0]

    async def _await_header(
        self, conn: _socket.socket, data: bytes, balancer: str, senders: trio.Nursery
    ) -> None:
        """Wait for the rest of a PROXY protocol header, then send the poem in ``senders``.

        ``data`` is what arrived of the header so far.  A header that is not
        whole within the header timeout, or can never be valid, costs the
        client a reset, before any byte of the poem.
        """
        assert self._acceptor is not None
        refused = self._acceptor.refused
        header: Header | None = None
        handed_over = False
        try:
            with trio.move_on_after(self.header_timeout):
                while header is None:
                    await trio.lowlevel.wait_readable(conn)
                    try:
                        more = conn.recv(MAX_LENGTH - len(data), socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        log_lost(exc)
                        return
                    if not more:
                        refused.add(CUT_SHORT, balancer, "closed before its PROXY protocol header was whole")
                        return
                    data += more
                    try:
                        header = parse(data)
                    except HeaderError as exc:
                        refused.add(exc.kind, balancer, str(exc))
                        return
            if header is None:
                refused.add(
                    TIMED_OUT, balancer, f"no whole PROXY protocol header within {self.header_timeout:g} s"
                )
                return
            poem = self.source.poem
            if not poem:  # a proxy that has lost its poem meanwhile: nothing to send
                return
            if log.isEnabledFor(logging.DEBUG):
                log_sending_behind(self.source.label, len(poem), header, balancer)
            self._handed_over_here += 1
            senders.start_soon(self._send_rest, conn, poem, 0, header.length)
            handed_over = True
        finally:
            if not handed_over:
                _abort(conn)

    async def _accept_here(self, senders: trio.Nursery) -> None:
        """Accept clients in the event loop until cancelled, each served over TLS by a task of ``senders``.

        Not in the accepting thread: a handshake needs a round trip, so the
        event loop waits for every client anyway, and handing each over
        would add a wake-up of the loop and a hand-over of the GIL between
        the two threads (five futex calls a poem, measured).
        """
        trouble = AcceptTrouble(self.source)
        async with trio.open_nursery() as accepting:
            for listener in self.listeners:
                accepting.start_soon(self._accept_on, listener, trouble, senders)

    async def _accept_on(self, listener: socket.socket, trouble: AcceptTrouble, senders: trio.Nursery) -> None:
        # The C-level accept, as in the accepting thread: no socket object
        # (and no getsockname()) until it is needed.
        accept = listener._accept  # type: ignore[attr-defined]
        family, kind, proto = int(listener.family), int(listener.type), listener.proto
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                if not self.source.poem:
                    trouble.turn_away(listener)
                    break
                try:
                    fd, address = accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if not trouble.failed(listener, exc):
                        await trio.sleep(ACCEPT_RETRY)
                    break
                conn = socket.socket(family, kind, proto, fd)
                if family in TCP_FAMILIES:
                    # The poem and the close_notify are two writes: with
                    # Nagle's algorithm the second could wait for the
                    # client's acknowledgement of the first, which Linux may
                    # delay by up to 40 ms (nginx's stream module also sets
                    # tcp_nodelay).
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                senders.start_soon(self._serve_tls, conn, format_peer(family, address))
            await trio.lowlevel.checkpoint()

    def _drop_clients_before_their_poem(self) -> None:
        """Stopping: cancel the clients over TLS still before their poem, and any yet to start."""
        self._stopping = True
        for scope in self._before_poem:
            scope.cancel()

    async def _serve_tls(self, conn: socket.socket, peer: str) -> None:
        """Serve a client over TLS: its PROXY protocol header if expected, the handshake, the poem.

        A client without a valid header is reset, one whose handshake fails
        or takes more than the handshake timeout is dropped: either way
        before any byte of the poem, and counted.  Until its poem begins a
        stop drops it; once begun, the poem may finish as any other.
        """
        begun = None
        with trio.CancelScope() as before_poem:
            if self._stopping:
                before_poem.cancel()
            self._before_poem.add(before_poem)
            try:
                begun = await self._begin_tls(conn, peer)
            finally:
                self._before_poem.discard(before_poem)
        if begun is None:  # refused, failed, or stopped: the connection is closed
            return
        tls, header = begun
        poem = self.source.poem
        if not poem:  # a proxy that has lost its poem meanwhile
            _abort(tls)
            return
        if log.isEnabledFor(logging.DEBUG):
            if header is None:
                log_sending(self.source.label, len(poem), peer)
            else:
                log_sending_behind(self.source.label, len(poem), header, peer)
        await self._send_over_tls(tls, poem)

    async def _begin_tls(
        self, conn: socket.socket, peer: str
    ) -> tuple[ssl.SSLSocket, Header | None] | None:
        """The PROXY protocol header if expected, then the handshake; None (and ``conn`` closed) if refused."""
        assert self.tls is not None
        header: Header | None = None
        if self.proxy_protocol:
            try:
                header = await self._header_before_tls(conn, peer)
            finally:
                if header is None:
                    _abort(conn)
            if header is None:
                return None
        try:
            with trio.fail_after(self.handshake_timeout):
                return await handshake(conn, self.tls.context), header
        except trio.TooSlowError:
            self.handshakes_failed.add(TIMED_OUT, peer, f"no TLS handshake within {self.handshake_timeout:g} s")
        except HandshakeFailed as exc:
            self.handshakes_failed.add(exc.kind, peer, str(exc))
        return None

    async def _header_before_tls(self, conn: socket.socket, balancer: str) -> Header | None:
        """Read the PROXY protocol header and not a byte more; None if refused (and counted).

        The bytes after the header are the client's TLS handshake, which
        OpenSSL reads from the socket itself: they are looked at
        (MSG_PEEK), and only those of the header taken.  Whatever arrived
        while the header is not yet whole is all header, and is taken, so
        that the next wait is for new bytes.
        """
        refused = self._header_refusals
        taken = b""
        with trio.move_on_after(self.header_timeout):
            while True:
                await trio.lowlevel.wait_readable(conn)
                try:
                    more = conn.recv(MAX_LENGTH - len(taken), socket.MSG_PEEK | socket.MSG_DONTWAIT)
                    if not more:
                        refused.add(CUT_SHORT, balancer, "closed before its PROXY protocol header was whole")
                        return None
                    try:
                        header = parse(taken + more)
                    except HeaderError as exc:
                        refused.add(exc.kind, balancer, str(exc))
                        return None
                    # Already received, so one recv() takes all of it.
                    rest = len(more) if header is None else header.length - len(taken)
                    taken += conn.recv(rest, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    log_lost(exc)
                    return None
                if header is not None:
                    return header
        refused.add(TIMED_OUT, balancer, f"no whole PROXY protocol header within {self.header_timeout:g} s")
        return None

    async def _send_over_tls(self, tls: ssl.SSLSocket, poem: bytes) -> None:
        """Send ``poem`` and a close_notify over ``tls``, then close, or end the stream and linger."""
        failure: OSError | None = None
        self._tasks_sending += 1
        try:
            with trio.move_on_after(self.send_timeout) as timeout:
                try:
                    await send_poem(tls, poem)
                    await close_notify(tls)
                except OSError as exc:  # ssl.SSLError included
                    failure = exc
        except BaseException:  # cancelled: the shutdown deadline
            _abort(tls)
            raise
        finally:
            self._tasks_sending -= 1
        if self._given_up(tls, failure, timeout.cancelled_caught, "over TLS"):
            return
        self._finished += 1
        self._finished_bytes += len(poem)
        # As for a plain poem (_finish), but the bytes on the wire are
        # OpenSSL's to count: the kernel's queues say whether any is at
        # stake.  The client's own close_notify comes after ours, so a
        # client that has everything is closed before it arrives.
        if not self.always_linger and tls.family in TCP_FAMILIES and settled(tls):
            tls.close()
            return
        try:
            tls.shutdown(socket.SHUT_WR)  # TLS is done with, as is this side of the stream
        except OSError:
            tls.close()
            return
        self._closer.close_when_done(tls)

    async def _send_rest(self, conn: _socket.socket, poem: bytes, sent: int, header: int) -> None:
        """Send what the first ``send()`` left of ``poem``, then finish; ``header``: the bytes of it read.

        What the client sends meanwhile is read and dropped: a client that
        writes more than the socket buffers hold before it reads would
        otherwise wait on us while we wait on it.
        """
        view = memoryview(poem)
        failure: OSError | None = None
        self._tasks_started += 1
        self._tasks_sending += 1
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
            self._tasks_sending -= 1
        if self._given_up(conn, failure, timeout.cancelled_caught, f"{sent} of {len(view)} bytes sent", sent):
            return
        self._finish(conn, len(view), header)
        self._finished += 1
        self._finished_bytes += len(view)

    def _given_up(
        self, conn: _socket.socket, failure: OSError | None, timed_out: bool, how: str, sent: int | None = None
    ) -> bool:
        """Close ``conn`` if its poem did not all go out (``failure``, or the send timeout); whether it did not.

        A client that was too slow is reset, so that it cannot take part of
        the poem for all of it; ``how`` says how far it got, for the log.
        """
        if failure is not None:
            log_lost(failure)
            conn.close()
            return True
        if timed_out:
            fields: dict[str, object] = {"POEM": self.source.label}
            if sent is not None:
                fields["BYTES"] = sent
            log.info(
                "dropped a client that did not take its poem within %g s (%s)", self.send_timeout, how, extra=fields
            )
            _abort(conn)
            return True
        return False

    def _finish(self, conn: _socket.socket, size: int, header: int) -> None:
        """The whole poem is with the kernel: close, or end the stream and linger.

        As the accepting thread does (:meth:`.Acceptor._finish`), for a poem
        that took more than one ``send()``.
        """
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:  # the client is already gone
            conn.close()
            return
        if self.always_linger or conn.family not in TCP_FAMILIES:
            self._closer.close_when_done(conn)
        elif nothing_at_stake(conn, size, header):
            conn.close()
        else:  # not acknowledged yet, or the client has spoken
            self._closer.close_when_done(conn, size, header)


async def _discard_input(conn: _socket.socket) -> None:
    """Read and drop whatever the client sends, until it stops sending."""
    while not discard_input(conn):
        await trio.lowlevel.wait_readable(conn)


def _abort(conn: _socket.socket) -> None:
    """Close a connection whose poem is not all sent, with a reset.

    End of stream is the only end-of-poem mark the protocol has: a plain
    close would hand the client a truncated poem that looks whole.
    """
    reset(conn)
    conn.close()

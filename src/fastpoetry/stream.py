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
event loop accepts and serves them itself (:mod:`~.tls_clients`,
:mod:`~.tls`).

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
    ENDING,
    SENDING,
    TCP_FAMILIES,
    Acceptor,
    PoemSource,
    Refusals,
    abort,
    header_refusals,
    log_lost,
    log_sending_behind,
    take_header,
)
from .linger import LingeringCloser, discard_input, nothing_at_stake
from .listeners import describe
from .options import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_HEADER_TIMEOUT
from .proxy_protocol import TIMED_OUT, Header, HeaderError
from .service import Service
from .tls import CHUNK, Handshake
from .tls_clients import TlsClients

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
        self._handshake_failures = Refusals(source, "dropped", "did not complete a TLS handshake")
        self._header_refusals = header_refusals(source)
        self._acceptor: Acceptor | None = None
        # Sending tasks the event loop spawned itself (after a late PROXY
        # protocol header, and over TLS when the kernel did not take the
        # poem at once; the accepting thread counts those it hands over),
        # the tasks that have started (of both), the tasks sending right
        # now, and the poems they finished (and their bytes); the thread
        # counts its own.
        self._tasks_spawned_here = 0
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
        if acceptor is None:  # over TLS: only tasks wait to send
            return self._tasks_spawned_here - self._tasks_started + self._tasks_sending
        # The thread counts a poem as handed over and leaves SENDING in two
        # stores with nothing between them where CPython switches threads,
        # and these reads are the same: a poem is counted once.
        sending = acceptor.stage == SENDING
        waiting = acceptor.poems_handed_over + self._tasks_spawned_here - self._tasks_started
        return sending + waiting + self._tasks_sending

    @property
    def headers_refused(self) -> int:
        """Connections reset for want of a valid PROXY protocol header."""
        return self._header_refusals.total

    @property
    def handshakes_failed(self) -> int:
        """Connections dropped for a TLS handshake that failed or was too slow."""
        return self._handshake_failures.total

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
                                await self._serve_tls_clients(senders)
                        self._close_listeners()
                    self._closer.finish()
        finally:
            self._closer.close_stragglers()
            self._close_listeners()
            self._header_refusals.flush()
            self._handshake_failures.flush()
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
                    abort(conn)

            token.run_sync_soon(start)

        def await_header(conn: _socket.socket, data: bytes, balancer: str) -> None:
            def start() -> None:
                try:
                    not_begun.start_soon(self._await_header, conn, data, balancer, senders)
                except RuntimeError:
                    abort(conn)

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

        ``data`` is what the accepting thread took of the header.  A header
        that is not whole within the header timeout, or can never be valid,
        costs the client a reset, before any byte of the poem.
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
                        data, header = take_header(conn, data)
                    except BlockingIOError:
                        continue
                    except HeaderError as exc:
                        refused.add(exc.kind, balancer, str(exc))
                        return
                    except OSError as exc:
                        log_lost(exc)
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
            self._tasks_spawned_here += 1
            senders.start_soon(self._send_rest, conn, poem, 0, header.length)
            handed_over = True
        finally:
            if not handed_over:
                abort(conn)

    async def _serve_tls_clients(self, senders: trio.Nursery) -> None:
        """Accept and serve clients over TLS until cancelled (:mod:`~.tls_clients`).

        Not in the accepting thread: a handshake needs a round trip, so the
        event loop waits for every client anyway, and handing each over
        would add a wake-up of the loop and a hand-over of the GIL between
        the two threads (five futex calls a poem, measured).
        """
        assert self.tls is not None
        tls = self.tls

        def serve(conn: socket.socket, handshake: Handshake, poem: bytes) -> None:
            self._serve_over_tls(conn, handshake, poem, senders)

        clients = TlsClients(
            self.source,
            self.listeners,
            lambda: tls.context,
            serve,
            refused=self._header_refusals,
            failed=self._handshake_failures,
            proxy_protocol=self.proxy_protocol,
            header_timeout=self.header_timeout,
            handshake_timeout=self.handshake_timeout,
        )
        await clients.run()

    def _serve_over_tls(self, conn: socket.socket, tls: Handshake, poem: bytes, senders: trio.Nursery) -> None:
        """Send the poem and the close_notify now if the kernel takes them, else in a task of ``senders``.

        The bytes are plain bytes by then, and a poem whose records the
        kernel did not take whole is sent on as a plain one is
        (:meth:`_send_rest`); a poem bigger than a chunk is encrypted a
        chunk at a time as the client takes it (:meth:`_send_over_tls`).
        """
        if len(poem) > CHUNK:
            self._tasks_spawned_here += 1
            senders.start_soon(self._send_over_tls, conn, tls, poem)
            return
        try:
            data = tls.seal(poem) + tls.close_notify()
            sent = conn.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # ssl.SSLError included: the client's TLS went wrong
            log_lost(exc)
            conn.close()
            return
        if sent < len(data):
            self._tasks_spawned_here += 1
            senders.start_soon(self._send_rest, conn, data, sent, tls.received, tls.sent, len(poem))
            return
        self._finished += 1
        self._finished_bytes += len(poem)
        self._finish(conn, tls.sent + len(data), tls.received)

    async def _send_over_tls(self, conn: socket.socket, tls: Handshake, poem: bytes) -> None:
        """Send a poem bigger than a chunk over ``tls``, a chunk encrypted at a time, then its close_notify.

        As :meth:`_send_rest` sends a plain one: what the client sends
        meanwhile is dropped, and the send timeout applies.
        """
        view = memoryview(poem)
        sent = tls.sent  # every byte on the wire, the handshake's included
        failure: OSError | None = None
        self._tasks_started += 1
        self._tasks_sending += 1
        try:
            with trio.move_on_after(self.send_timeout) as timeout:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_discard_input, conn)
                    try:
                        for start in range(0, len(view), CHUNK):
                            last = start + CHUNK >= len(view)
                            data = tls.seal(view[start : start + CHUNK])
                            records = memoryview(data + tls.close_notify() if last else data)
                            done = 0
                            while done < len(records):
                                await trio.lowlevel.wait_writable(conn)
                                try:
                                    done += conn.send(records[done:], socket.MSG_DONTWAIT)
                                except BlockingIOError:
                                    pass
                            sent += done
                    except OSError as exc:  # ssl.SSLError included
                        failure = exc
                    nursery.cancel_scope.cancel()
        except BaseException:  # cancelled: the shutdown deadline
            abort(conn)
            raise
        finally:
            self._tasks_sending -= 1
        if self._given_up(conn, failure, timeout.cancelled_caught, f"{sent} bytes sent over TLS", sent):
            return
        self._finish(conn, sent, tls.received)
        self._finished += 1
        self._finished_bytes += len(poem)

    async def _send_rest(
        self, conn: _socket.socket, poem: bytes, sent: int, header: int, earlier: int = 0, size: int | None = None
    ) -> None:
        """Send what the first ``send()`` left of ``poem``, then finish; ``header``: the bytes of input read.

        Over TLS, ``poem`` is the poem's records and close_notify, ``earlier``
        the bytes the handshake sent, and ``size`` the poem's own.

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
            abort(conn)
            raise
        finally:
            self._tasks_sending -= 1
        if self._given_up(conn, failure, timeout.cancelled_caught, f"{sent} of {len(view)} bytes sent", sent):
            return
        self._finish(conn, earlier + len(view), header)
        self._finished += 1
        self._finished_bytes += len(view) if size is None else size

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
            abort(conn)
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

"""The TLS clients of a server, from accept to their poem, driven by one task through a private epoll.

A TLS client needs a round trip before its poem (the handshake, and the
PROXY protocol header before it if a balancer sends one), so it cannot be
served the way the accepting thread serves a plain one (:mod:`~.acceptor`).
A trio task for each, waiting on its socket, costs a task, a cancel scope,
a timeout and two epoll registrations a client (with it, fastpoetry took
1.43x nginx's CPU a poem over TLS; without, 1.18x to 1.23x: bench/README.md,
"Over TLS").  So one task accepts every client, watches all of them
through an epoll instance of its own, registered once each, and moves each
on as its bytes arrive, as :class:`~.linger.LingeringCloser` does for the
clients that linger.  What has to wait for the client to read (a poem
bigger than the socket buffers) goes to a task of its own.

Deadlines: every client still waiting for its header is in one dict, every
client in its handshake in another; each dict has one timeout, so
insertion order is deadline order and the expired clients are at the front.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import ssl
from collections.abc import Callable

import trio

from .acceptor import (
    ACCEPT_RETRY,
    AcceptTrouble,
    PoemSource,
    Refusals,
    abort,
    log_lost,
    log_sending,
    log_sending_behind,
    take_header,
)
from .listeners import format_peer
from .proxy_protocol import TIMED_OUT, Header, HeaderError
from .tls import Handshake, HandshakeFailed

log = logging.getLogger(__name__)

#: Connections accepted at a time from one listening socket before the
#: clients already there are moved on again.
ACCEPT_BATCH = 16

#: Takes a client whose handshake is done, its TLS, and the poem to send it.
Serve = Callable[[socket.socket, Handshake, bytes], None]


class _Client:
    """One client before its poem."""

    __slots__ = ("conn", "tls", "family", "address", "deadline", "taken", "header", "waiting_for")

    def __init__(self, conn: socket.socket, family: int, address: object) -> None:
        self.conn = conn
        self.tls: Handshake | None = None
        self.family = family
        self.address = address
        self.deadline = math.inf
        #: The bytes of its PROXY protocol header taken so far.
        self.taken = b""
        self.header: Header | None = None
        #: What the epoll watches its socket for.
        self.waiting_for = select.EPOLLIN

    @property
    def peer(self) -> str:
        # Only a log line needs it: made when asked for.
        return format_peer(self.family, self.address)


class TlsClients:
    """Accepts on ``listeners`` and takes every client through its header and handshake.

    A client whose handshake is done goes to ``serve`` with the poem, in
    this task; ``serve`` must not wait.  With ``proxy_protocol`` the
    client's PROXY protocol header comes first, in plain text; one that
    is invalid or not whole within ``header_timeout`` seconds is reset and
    counted in ``refused``.  A handshake that fails, or is not done within
    ``handshake_timeout`` seconds, costs the client its connection, counted
    in ``failed``.  :meth:`run` returns only when cancelled (a stop): the
    clients still before their poem are reset then.
    """

    def __init__(
        self,
        source: PoemSource,
        listeners: list[socket.socket],
        context: Callable[[], ssl.SSLContext],
        serve: Serve,
        *,
        refused: Refusals,
        failed: Refusals,
        proxy_protocol: bool,
        header_timeout: float,
        handshake_timeout: float,
    ) -> None:
        self.source = source
        self.listeners = listeners
        self.context = context
        self.serve = serve
        self.refused = refused
        self.failed = failed
        self.proxy_protocol = proxy_protocol
        self.header_timeout = header_timeout
        self.handshake_timeout = handshake_timeout
        self._epoll = select.epoll()
        # Each listener with what its connections are made of (its
        # properties build enum members at every call).
        self._listening = {
            sock.fileno(): (sock, int(sock.family), int(sock.type), sock.proto) for sock in listeners
        }
        self._paused: dict[int, float] = {}
        self._awaiting_header: dict[int, _Client] = {}
        self._handshaking: dict[int, _Client] = {}
        self._trouble = AcceptTrouble(source)

    def __len__(self) -> int:
        """Clients before their poem."""
        return len(self._awaiting_header) + len(self._handshaking)

    async def run(self) -> None:
        """Serve until cancelled; then reset every client still before its poem (once only)."""
        try:
            for fd in self._listening:
                self._epoll.register(fd, select.EPOLLIN)
            while True:
                with trio.move_on_at(self._next_deadline()):
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0):
                    client = self._handshaking.get(fd) or self._awaiting_header.get(fd)
                    if client is not None:
                        self._move_on(client, fd)
                    elif fd in self._listening:
                        self._accept(*self._listening[fd])
                self._expire(trio.current_time())
        finally:
            for clients in (self._awaiting_header, self._handshaking):
                for client in clients.values():
                    abort(client.conn)
                clients.clear()
            # trio watches the epoll's descriptor: it must forget it first.
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()

    def _next_deadline(self) -> float:
        """The earliest deadline: each dict's first client's, and the end of any pause."""
        firsts = [clients[next(iter(clients))] for clients in (self._awaiting_header, self._handshaking) if clients]
        return min([*(client.deadline for client in firsts), *self._paused.values()], default=math.inf)

    def _accept(self, listener: socket.socket, family: int, kind: int, proto: int) -> None:
        now = trio.current_time()
        for _ in range(ACCEPT_BATCH):
            if not self.source.poem:
                self._trouble.turn_away(listener)
                return
            try:
                fd, address = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                if not self._trouble.failed(listener, exc):
                    # Level-triggered: left registered, it would be reported at once, again and again.
                    self._epoll.unregister(listener.fileno())
                    self._paused[listener.fileno()] = now + ACCEPT_RETRY
                return
            # No TCP_NODELAY: the poem's last record and the close_notify
            # leave in one send(), as a plain poem does.
            conn = socket.socket(family, kind, proto, fd)
            client = _Client(conn, family, address)
            self._epoll.register(fd, select.EPOLLIN)
            if self.proxy_protocol:
                client.deadline = now + self.header_timeout
                self._awaiting_header[fd] = client
            else:
                self._begin_handshake(client, fd, now)
            # A client is quick, or its bytes came before the accept
            # (TCP_DEFER_ACCEPT): try at once, as the epoll would say.
            self._move_on(client, fd)

    def _begin_handshake(self, client: _Client, fd: int, now: float) -> None:
        client.deadline = now + self.handshake_timeout
        self._handshaking[fd] = client

    def _move_on(self, client: _Client, fd: int) -> None:
        """Take ``client``, whose descriptor is ``fd``, as far as the bytes that arrived allow."""
        if fd in self._awaiting_header and not self._read_header(client, fd):
            return
        if client.tls is None:
            client.tls = Handshake(self.context(), len(client.taken))
        try:
            waiting_for = client.tls.step(client.conn)
        except HandshakeFailed as exc:
            del self._handshaking[fd]
            self.failed.add(exc.kind, client.peer, str(exc))
            client.conn.close()  # after OpenSSL's alert, if any: it says why
            return
        if waiting_for:
            if waiting_for != client.waiting_for:  # rare: a full send buffer mid-handshake
                self._epoll.modify(fd, waiting_for)
                client.waiting_for = waiting_for
            return
        del self._handshaking[fd]
        conn = client.conn
        poem = self.source.poem
        if not poem:  # a proxy that has lost its poem meanwhile
            abort(conn)
            return
        if log.isEnabledFor(logging.DEBUG):
            if client.header is None:
                log_sending(self.source.label, len(poem), client.peer)
            else:
                log_sending_behind(self.source.label, len(poem), client.header, client.peer)
        # It leaves this epoll before serve() closes it or gives it to a new
        # owner (a task, or the lingering close).
        self._epoll.unregister(fd)
        self.serve(conn, client.tls, poem)

    def _read_header(self, client: _Client, fd: int) -> bool:
        """Take the PROXY protocol header and not a byte more; True once it is whole.

        The bytes after the header are the client's TLS handshake, which
        OpenSSL reads from the socket itself (:func:`~.acceptor.take_header`).
        """
        try:
            client.taken, header = take_header(client.conn, client.taken)
        except BlockingIOError:
            return False
        except HeaderError as exc:
            return self._refuse(client, fd, exc.kind, str(exc))
        except OSError as exc:
            log_lost(exc)
            del self._awaiting_header[fd]
            abort(client.conn)
            return False
        if header is None:
            return False
        client.header = header
        del self._awaiting_header[fd]
        self._begin_handshake(client, fd, trio.current_time())
        return True

    def _refuse(self, client: _Client, fd: int, kind: str, detail: str) -> bool:
        del self._awaiting_header[fd]
        self.refused.add(kind, client.peer, detail)
        abort(client.conn)
        return False

    def _expire(self, now: float) -> None:
        """Reset the clients whose header or handshake is late, and accept again where paused."""
        for fd, resume in list(self._paused.items()):
            if resume <= now:
                del self._paused[fd]
                self._epoll.register(fd, select.EPOLLIN)
        while self._awaiting_header:
            fd, client = next(iter(self._awaiting_header.items()))
            if client.deadline > now:
                break
            self._refuse(client, fd, TIMED_OUT, f"no whole PROXY protocol header within {self.header_timeout:g} s")
        while self._handshaking:
            fd, client = next(iter(self._handshaking.items()))
            if client.deadline > now:
                break
            del self._handshaking[fd]
            self.failed.add(TIMED_OUT, client.peer, f"no TLS handshake within {self.handshake_timeout:g} s")
            abort(client.conn)

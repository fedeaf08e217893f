"""The accepting thread on its own: real sockets, a real thread, no event loop.

StreamServer's tests (test_stream.py) cover what a client sees; these cover
what the thread hands over, how it stops, and the socket objects it keeps
by descriptor number.  Waits are hang guards only (``WAIT``).
"""

from __future__ import annotations

import gc
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from helpers import POEMS, WAIT
from fastpoetry.acceptor import IDLE, Acceptor, SocketsByNumber, take_header
from fastpoetry.listeners import bind
from fastpoetry.proxy_protocol import CUT_SHORT, MALFORMED, HeaderError

LEDGER = POEMS / "harbour-ledger.txt"


class Source:
    def __init__(self, poem: bytes) -> None:
        self.poem = poem
        self.label = "test-poem"


class HandedOver:
    """Records what the thread hands on, and owns those connections."""

    def __init__(self) -> None:
        self.rest: list[tuple[socket.socket, bytes, int, int]] = []
        self.lingering: list[tuple[socket.socket, int | None, int]] = []
        self.awaiting: list[tuple[socket.socket, bytes, str]] = []
        self.changed = threading.Condition()

    def send_rest(self, conn: socket.socket, poem: bytes, sent: int, header: int) -> None:
        with self.changed:
            self.rest.append((conn, poem, sent, header))
            self.changed.notify_all()

    def linger(self, conn: socket.socket, sent: int | None, header: int) -> None:
        with self.changed:
            self.lingering.append((conn, sent, header))
            self.changed.notify_all()

    def await_header(self, conn: socket.socket, data: bytes, balancer: str) -> None:
        with self.changed:
            self.awaiting.append((conn, data, balancer))
            self.changed.notify_all()

    def wait_for(self, predicate: object) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout=WAIT)  # type: ignore[arg-type]

    def close(self) -> None:
        for conn, *_ in self.rest + self.lingering + self.awaiting:
            conn.close()


@contextmanager
def accepting(
    poem: bytes, listeners: list[socket.socket] | None = None, *, proxy_protocol: bool = False, **options: bool
) -> Iterator[tuple[Acceptor, HandedOver, list[socket.socket]]]:
    """An Acceptor running in a thread; stopped, joined and closed on the way out."""
    listeners = listeners if listeners is not None else bind("127.0.0.1", 0)
    handed = HandedOver()
    acceptor = Acceptor(
        Source(poem), listeners, send_rest=handed.send_rest, linger=handed.linger,
        await_header=handed.await_header if proxy_protocol else None, **options,
    )
    failure: list[BaseException] = []

    def body() -> None:
        try:
            acceptor.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    try:
        yield acceptor, handed, listeners
    finally:
        acceptor.stop()
        thread.join(WAIT)
        assert not thread.is_alive(), "run() did not return after stop()"
        acceptor.close()
        handed.close()
        for sock in listeners:
            sock.close()
    assert not failure, failure


def fetch_all(address: tuple[str, int]) -> bytes:
    with socket.create_connection(address, timeout=WAIT) as client:
        data = bytearray()
        while piece := client.recv(65536):
            data += piece
    return bytes(data)


def test_serves_each_client_the_whole_poem_and_counts_it() -> None:
    poem = LEDGER.read_bytes()
    with accepting(poem) as (acceptor, handed, [listener]):
        for _ in range(20):
            assert fetch_all(listener.getsockname()) == poem
        assert acceptor.poems_served == 20
        assert acceptor.bytes_served == 20 * len(poem)
        assert acceptor.poems_handed_over == 0
        assert acceptor.stage == IDLE


def test_stop_leaves_the_listening_sockets_open_for_their_owner() -> None:
    [listener] = bind("127.0.0.1", 0)
    with accepting(b"poem\n", [listener]):
        pass
    # accepting() closed it; before that, run() had returned with it open.
    assert listener.fileno() == -1
    [listener] = bind("127.0.0.1", 0)
    try:
        handed = HandedOver()
        acceptor = Acceptor(Source(b"poem\n"), [listener], send_rest=handed.send_rest, linger=handed.linger)
        acceptor.stop()  # before run(): run() returns at once
        acceptor.run()
        acceptor.close()
        assert listener.fileno() != -1
        listener.getsockname()  # still a working socket
    finally:
        listener.close()


def test_a_poem_the_kernel_does_not_take_at_once_is_handed_over_with_what_was_sent() -> None:
    poem = b"x" * (8 * 1024 * 1024)
    [listener] = bind("127.0.0.1", 0)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    with accepting(poem, [listener]) as (acceptor, handed, _):
        with socket.create_connection(listener.getsockname(), timeout=WAIT) as client:
            handed.wait_for(lambda: handed.rest)
            [(conn, given, sent, header)] = handed.rest
            assert given is poem and header == 0
            assert 0 <= sent < len(poem)
            assert acceptor.poems_handed_over == 1
            assert acceptor.poems_served == 0
            # The connection is the client's: what was sent has arrived.
            received = bytearray()
            while len(received) < sent:
                received += client.recv(sent - len(received))
            assert received == poem[:sent]
            assert conn.getpeername() == client.getsockname()
            assert conn.family == socket.AF_INET  # the listener's: the closer asks TCP


def test_always_linger_hands_every_client_to_the_closer_with_its_stream_ended() -> None:
    poem = LEDGER.read_bytes()
    with accepting(poem, always_linger=True) as (acceptor, handed, [listener]):
        with socket.create_connection(listener.getsockname(), timeout=WAIT) as client:
            handed.wait_for(lambda: handed.lingering)
            [(conn, sent, header)] = handed.lingering
            assert sent is None and header == 0  # kept until the client closes, whatever TCP says
            data = bytearray()
            while piece := client.recv(65536):  # the end of the stream has come
                data += piece
            assert data == poem
            assert conn.fileno() != -1  # and the connection is still open
            assert acceptor.poems_served == 1


def test_an_empty_poem_turns_clients_away_without_a_byte() -> None:
    with accepting(b"") as (acceptor, _, [listener]):
        assert fetch_all(listener.getsockname()) == b""
        assert acceptor.poems_served == 0


V2_HEADER = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([198, 51, 100, 7, 192, 0, 2, 1]) + b"\x9c\xbb\x27\x10"


def test_a_header_already_there_is_read_here_and_the_poem_sent_here() -> None:
    """Behind a balancer, the common case stays in the thread: no hand-over, the header's bytes counted."""
    poem = LEDGER.read_bytes()
    [listener] = bind("127.0.0.1", 0)
    with socket.create_connection(listener.getsockname(), timeout=WAIT) as client:
        client.sendall(V2_HEADER + b"hello?\n")  # there before the thread runs
        with accepting(poem, [listener], proxy_protocol=True) as (acceptor, handed, _):
            handed.wait_for(lambda: handed.lingering)
            data = bytearray()
            while piece := client.recv(65536):
                data += piece
            assert data == poem
            [(conn, sent, header)] = handed.lingering
            # The words after the header were input: it may not be closed yet.
            assert (sent, header) == (len(poem), len(V2_HEADER))
            assert acceptor.poems_served == 1 and not handed.awaiting and not handed.rest


def test_a_header_not_yet_whole_is_handed_over_with_what_came_of_it() -> None:
    [listener] = bind("127.0.0.1", 0)
    with socket.create_connection(listener.getsockname(), timeout=WAIT) as client:
        client.sendall(V2_HEADER[:9])
        with accepting(b"poem\n", [listener], proxy_protocol=True) as (acceptor, handed, _):
            handed.wait_for(lambda: handed.awaiting)
            [(conn, data, balancer)] = handed.awaiting
            assert data == V2_HEADER[:9]
            assert balancer == "%s:%d" % client.getsockname()
            assert conn.getpeername() == client.getsockname()
            assert acceptor.poems_served == 0 and acceptor.refused.total == 0


def test_a_header_that_cannot_be_valid_is_refused_with_a_reset() -> None:
    [listener] = bind("127.0.0.1", 0)
    with socket.create_connection(listener.getsockname(), timeout=WAIT) as client:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with accepting(b"poem\n", [listener], proxy_protocol=True) as (acceptor, handed, _):
            with pytest.raises(ConnectionResetError):
                assert client.recv(65536) == b"", "no poem byte, and no clean end either"
            assert acceptor.refused.total == 1 and acceptor.poems_served == 0
            assert not handed.awaiting and not handed.lingering


def test_take_header_takes_the_header_in_pieces_and_leaves_what_follows() -> None:
    """What comes before the header is whole is all header; after it, the client's bytes stay unread."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(BlockingIOError):
            take_header(ours, b"")
        theirs.sendall(V2_HEADER[:5])
        taken, header = take_header(ours, b"")
        assert (taken, header) == (V2_HEADER[:5], None)
        hello = b"\x16\x03\x01 and what a TLS client says first"
        theirs.sendall(V2_HEADER[5:] + hello)  # the rest, and more, in one segment
        taken, header = take_header(ours, taken)
        assert taken == V2_HEADER and header is not None and header.length == len(V2_HEADER)
        assert header.source == ("198.51.100.7", 40123)
        assert ours.recv(100) == hello


@pytest.mark.parametrize(
    ("sent", "kind"),
    [(V2_HEADER[:9], CUT_SHORT), (b"", CUT_SHORT), (b"GET / HTTP/1.0\r\n", MALFORMED)],
    ids=["closed halfway", "closed at once", "not a header"],
)
def test_take_header_refuses_a_client_that_closes_first_or_bytes_no_header_starts_with(sent: bytes, kind: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(sent)
        theirs.shutdown(socket.SHUT_WR)
        taken = b""
        with pytest.raises(HeaderError) as refused:
            while True:
                taken, header = take_header(ours, taken)
                assert header is None and taken == sent
        assert refused.value.kind == kind, refused.value


def test_two_threads_on_one_listening_socket_serve_each_client_once() -> None:
    """EPOLLEXCLUSIVE, as serve --workers shares a socket: no client is lost or served twice."""
    poem = LEDGER.read_bytes()
    [listener] = bind("127.0.0.1", 0)
    try:
        with accepting(poem, [listener]) as (first, _, _), accepting(poem, [listener.dup()]) as (second, _, _):
            for _ in range(200):
                assert fetch_all(listener.getsockname()) == poem
            assert first.poems_served + second.poems_served == 200
    finally:
        listener.close()


# -- SocketsByNumber ----------------------------------------------------------


def test_kept_objects_serve_the_next_connection_with_the_same_number() -> None:
    sockets = SocketsByNumber(socket.AF_UNIX, socket.SOCK_STREAM, 0)
    ours, theirs = socket.socketpair()
    fd = ours.detach()
    kept = sockets.get(fd)
    assert sockets.get(fd) is kept
    os.close(fd)  # as the thread closes a connection; the object stays
    theirs.close()
    ours, theirs = socket.socketpair()
    try:
        assert ours.fileno() == fd, "the premise: the kernel gives the lowest free number again"
        assert sockets.get(fd) is kept
        kept.send(b"to the new peer")
        assert theirs.recv(100) == b"to the new peer"
    finally:
        sockets.forget()
        ours.close()
        theirs.close()


def test_a_taken_object_leaves_the_cache_and_forget_closes_nothing() -> None:
    sockets = SocketsByNumber(socket.AF_UNIX, socket.SOCK_STREAM, 0)
    ours, theirs = socket.socketpair()
    fd = ours.detach()
    kept = sockets.get(fd)
    assert sockets.take(fd) is kept
    assert len(sockets) == 0
    kept.close()
    theirs.close()

    ours, theirs = socket.socketpair()
    fd = ours.detach()
    kept = sockets.get(fd)
    sockets.forget()
    assert kept.fileno() == -1
    del kept
    gc.collect()
    try:
        # Collecting the forgotten object closed nothing: the descriptor still works.
        os.write(fd, b"still open")
        assert theirs.recv(100) == b"still open"
    finally:
        os.close(fd)
        theirs.close()

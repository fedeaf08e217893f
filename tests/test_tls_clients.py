"""TlsClients: one task takes every TLS client through its header and handshake, over real loopback sockets.

``serve`` here is the test's: it sends the poem and the close_notify at
once, as StreamServer does for a poem the kernel takes whole, and notes
how many bytes went each way.  Waits are
hang guards only (``WAIT``).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from helpers import POEMS, WAIT, Pair, make_pair, receive, wait_until_async
from fastpoetry import tls
from fastpoetry.acceptor import Refusals, header_refusals
from fastpoetry.listeners import bind
from fastpoetry.tls_clients import TlsClients

LEDGER = POEMS / "harbour-ledger.txt"


class Source:
    def __init__(self, poem: bytes) -> None:
        self.poem = poem
        self.label = "test-poem"


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path / "tls")


class Running:
    def __init__(self, clients: TlsClients, served: list[tuple[int, int]]) -> None:
        self.clients = clients
        #: For each client served: the bytes received from it, and sent to it, as the server counted them.
        self.served = served
        self.address = clients.listeners[0].getsockname()


@asynccontextmanager
async def running(pair: Pair, source: Source, **options: object) -> AsyncIterator[Running]:
    context = tls.load(str(pair.cert), str(pair.key)).context
    served: list[tuple[int, int]] = []

    def serve(conn: socket.socket, handshake: tls.Handshake, poem: bytes) -> None:
        data = handshake.seal(poem) + handshake.close_notify()
        conn.sendall(data)
        served.append((handshake.received, handshake.sent + len(data)))
        conn.close()

    options.setdefault("proxy_protocol", False)
    options.setdefault("header_timeout", WAIT)
    options.setdefault("handshake_timeout", WAIT)
    clients = TlsClients(
        source,  # type: ignore[arg-type]
        bind("127.0.0.1", 0),
        lambda: context,
        serve,
        refused=header_refusals(source),  # type: ignore[arg-type]
        failed=Refusals(source, "dropped", "did not complete a TLS handshake"),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(clients.run)
        try:
            yield Running(clients, served)
        finally:
            nursery.cancel_scope.cancel()
    for sock in clients.listeners:
        sock.close()


def client_context(pair: Pair) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    pair.ca.configure_trust(context)
    return context


async def fetch(address: tuple[str, int], pair: Pair, before: bytes = b"") -> bytes:
    stream = await trio.open_tcp_stream(*address)
    if before:
        await stream.send_all(before)
    secure = trio.SSLStream(stream, client_context(pair), server_hostname="localhost")
    data = bytearray()
    async with secure:
        while piece := await secure.receive_some(65536):
            data += piece
    return bytes(data)


async def connect(address: tuple[str, int]) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect(address)
    return sock


async def test_every_client_of_a_burst_gets_its_poem(pair: Pair) -> None:
    """More clients at once than one accept batch takes: each is moved on as its bytes arrive."""
    poem = LEDGER.read_bytes()
    async with running(pair, Source(poem)) as server:
        results: list[bytes] = []

        async def one() -> None:
            results.append(await fetch(server.address, pair))

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for _ in range(100):
                    nursery.start_soon(one)
        assert results == [poem] * 100
        assert len(server.served) == 100 and len(server.clients) == 0


async def test_a_late_header_and_a_slow_handshake_each_have_their_own_timeout(pair: Pair) -> None:
    """A client without its header is reset at the header timeout; one in its handshake is not, yet."""
    poem = LEDGER.read_bytes()
    source = Source(poem)
    async with running(pair, source, proxy_protocol=True, header_timeout=0.2, handshake_timeout=10 * WAIT) as server:
        with trio.fail_after(WAIT):
            in_handshake = await connect(server.address)
            await in_handshake.send(b"PROXY TCP4 198.51.100.7 192.0.2.1 40123 10443\r\n")
            await wait_until_async(lambda: len(server.clients) == 1 and server.clients.refused.total == 0)
            silent = await connect(server.address)
            assert await receive(silent) == (b"", "reset")
        assert server.clients.refused.total == 1
        assert len(server.clients) == 1, "the client in its handshake is still there"
        assert server.clients.failed.total == 0
        in_handshake.close()
        silent.close()


async def test_without_a_poem_clients_are_turned_away(pair: Pair) -> None:
    async with running(pair, Source(b"")) as server:
        with trio.fail_after(WAIT):
            sock = await connect(server.address)
            data, _ = await receive(sock)
        assert data == b"" and server.served == []
        sock.close()


async def test_cancelling_resets_the_clients_before_their_poem(pair: Pair) -> None:
    poem = LEDGER.read_bytes()
    async with running(pair, Source(poem)) as server:
        with trio.fail_after(WAIT):
            sock = await connect(server.address)
            await wait_until_async(lambda: len(server.clients) == 1)
    with trio.fail_after(WAIT):
        assert await receive(sock) == (b"", "reset")
    sock.close()


async def test_the_header_and_the_client_hello_in_one_segment_are_told_apart_and_every_byte_counted(
    pair: Pair,
) -> None:
    """Only the header's bytes are taken; the ClientHello after them is OpenSSL's, whole.

    The server counts the PROXY header, the handshake both ways, the poem
    and the close_notify as the client does: the lingering close compares
    those counts with the kernel's (linger.nothing_at_stake).
    """
    poem = LEDGER.read_bytes()
    header = b"PROXY TCP4 198.51.100.7 192.0.2.1 40123 10443\r\n"
    async with running(pair, Source(poem), proxy_protocol=True) as server:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context(pair).wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            client.do_handshake()
        sent = received = 0
        with trio.fail_after(WAIT):
            sock = await connect(server.address)
            sent += await sock.send(header + outgoing.read())
            data = bytearray()
            while True:
                try:
                    while piece := client.read(65536):
                        data += piece
                    break
                except ssl.SSLWantReadError:
                    pass
                if pending := outgoing.read():
                    sent += await sock.send(pending)
                chunk = await sock.recv(65536)
                assert chunk, "the end of the stream came without a close_notify"
                received += len(chunk)
                incoming.write(chunk)
            assert await sock.recv(65536) == b""  # nothing after the close_notify
        assert bytes(data) == poem
        assert server.served == [(sent, received)]
        sock.close()

"""StreamServer in-process, over real loopback sockets.

Every client is a real socket (trio sockets, or blocking sockets for the
subprocess test); nothing of the code under test is replaced.  Waits are
hang guards only (``WAIT``): tests assert what arrived, never how fast.
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from helpers import POEMS, WAIT, clean_env, fetch, make_poem, needs_ipv6, serving_stream, wait_until_async
from fastpoetry import acceptor
from fastpoetry.listeners import ListenerError, bind
from fastpoetry.poetry import PoetryService
from fastpoetry.stream import StreamServer

LEDGER = POEMS / "harbour-ledger.txt"

KiB = 1024
MiB = 1024 * KiB

#: A receive buffer small enough that the kernel cannot hold a big poem for
#: a client that does not read (setting it also turns off autotuning).
SMALL_RCVBUF = 64 * KiB


def _big_poem_size() -> int:
    """A size the server's send buffer plus a small receive buffer cannot hold."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        wmem_max = 4 * MiB
    return max(8 * MiB, wmem_max + 4 * MiB)


BIG = _big_poem_size()




class Source:
    """A poem source whose poem a test can replace, as a reload does."""

    def __init__(self, poem: bytes, label: str = "test-poem") -> None:
        self.poem = poem
        self.label = label


# -- fixtures ---------------------------------------------------------------


@pytest.fixture(scope="module")
def big_poem(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A multi-MiB poem of numbered lines (truncation or mixing shows)."""
    return make_poem(tmp_path_factory.mktemp("big") / "big.txt", BIG)


# -- helpers ----------------------------------------------------------------


def address_of(listener: socket.socket) -> tuple[str, int]:
    host, port = listener.getsockname()[:2]
    return host, port


async def connect(
    address: object, family: int = socket.AF_INET, rcvbuf: int | None = None
) -> trio.socket.SocketType:
    """A connected trio client socket, with a fixed receive buffer if asked."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        with trio.fail_after(WAIT):
            await sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def receive_exactly(
    sock: trio.socket.SocketType, size: int, chunk: int = 64 * KiB, pause: float = 0.0
) -> bytes:
    """Read ``size`` bytes (fewer only at EOF), ``chunk`` at a time, pausing between reads."""
    data = bytearray()
    with trio.fail_after(WAIT):
        while len(data) < size:
            piece = await sock.recv(min(chunk, size - len(data)))
            if not piece:
                break
            data += piece
            if pause:
                await trio.sleep(pause)
    return bytes(data)


async def receive_to_eof(sock: trio.socket.SocketType) -> bytes:
    """Read until a clean EOF; a reset raises ConnectionResetError."""
    data = bytearray()
    with trio.fail_after(WAIT):
        while piece := await sock.recv(64 * KiB):
            data += piece
    return bytes(data)


async def assert_server_end_gone(sock: trio.socket.SocketType) -> None:
    """The server has closed its end: what the client sends now is answered with a reset."""
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        with trio.fail_after(WAIT):
            while True:
                await sock.send(b"still there?\n")
                await trio.sleep(0.01)


async def receive_until_closed(sock: trio.socket.SocketType) -> tuple[bytes, bool]:
    """Read until EOF or reset; return the bytes and whether it was a reset."""
    data = bytearray()
    with trio.fail_after(WAIT):
        while True:
            try:
                piece = await sock.recv(64 * KiB)
            except ConnectionResetError:
                return bytes(data), True
            if not piece:
                return bytes(data), False
            data += piece


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    with trio.fail_after(WAIT):
        while view:
            view = view[await sock.send(view) :]


async def send_junk(sock: trio.socket.SocketType, data: bytes, linger: str) -> None:
    """Send ``data`` as a client that does not care whether the server listens.

    Under ``--linger auto`` the server may have closed before the data
    arrived (the client had sent nothing and acknowledged the poem), and
    the writes then fail; under ``always`` they must not.
    """
    try:
        await send_all(sock, data)
    except (BrokenPipeError, ConnectionResetError):
        if linger == "always":
            raise


async def fetch_poem(address: object, family: int = socket.AF_INET, send: bytes = b"") -> bytes:
    """Connect, optionally send ``send``, read to a clean EOF, close."""
    with await connect(address, family) as sock:
        if send:
            await send_all(sock, send)
        return await receive_to_eof(sock)


def serving(
    source: object, listeners: list[socket.socket] | None = None, *, send_timeout: float = WAIT, always_linger: bool = False
) -> AbstractAsyncContextManager[StreamServer]:
    """A started StreamServer (on 127.0.0.1, a free port, unless given listeners)."""
    return serving_stream(source, listeners, send_timeout=send_timeout, always_linger=always_linger)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("fastpoetry")]


# -- 1. the common case -----------------------------------------------------


async def test_small_poem_arrives_byte_exact_then_clean_eof() -> None:
    """A 3 KB poem from a real PoetryService arrives byte-exact, then a clean EOF."""
    expected = LEDGER.read_bytes()
    async with trio.open_nursery() as nursery:
        poet = PoetryService(str(LEDGER))
        await poet.start(nursery)
        async with serving(poet) as server:
            address = address_of(server.listeners[0])
            with await connect(address) as sock:
                # EOF while our side is still open: the server half-closed.
                assert await receive_to_eof(sock) == expected
                assert server.poems_served == 1
                assert server.bytes_served == len(expected)
                assert server.poems_in_flight == 0
            await wait_until_async(lambda: server.clients_lingering == 0)
        await poet.stop()


# -- 2. big poems and slow readers -----------------------------------------


@pytest.mark.slow
async def test_big_poem_reaches_a_fast_reader_byte_exact(big_poem: bytes) -> None:
    """A multi-MiB poem reaches a reader that takes it as fast as it can, whole, then EOF."""
    async with serving(Source(big_poem)) as server:
        address = address_of(server.listeners[0])
        with await connect(address) as sock:
            assert await receive_to_eof(sock) == big_poem
            assert server.poems_in_flight == 0
            assert server.poems_served == 1
            assert server.bytes_served == len(big_poem)


@pytest.mark.slow
async def test_big_poem_reaches_a_slow_reader_byte_exact(big_poem: bytes) -> None:
    """A multi-MiB poem reaches a reader that starts slow, whole, via the partial-send task."""
    async with serving(Source(big_poem)) as server:
        address = address_of(server.listeners[0])
        with await connect(address, rcvbuf=SMALL_RCVBUF) as sock:
            await wait_until_async(lambda: server.poems_in_flight == 1)
            assert server.poems_served == 0  # not counted before the kernel has it all
            head = await receive_exactly(sock, 512 * KiB, chunk=4 * KiB, pause=0.001)
            assert server.poems_in_flight == 1
            rest = await receive_to_eof(sock)
            assert head + rest == big_poem
            assert server.poems_in_flight == 0
            assert server.poems_served == 1
            assert server.bytes_served == len(big_poem)


# -- 3. many clients at once ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("size", [3 * KiB, 256 * KiB], ids=["3KiB", "256KiB"])
async def test_many_concurrent_clients_each_get_the_whole_poem(tmp_path: Path, size: int) -> None:
    """300 clients connected at once each get the whole poem; every poem is counted."""
    clients = 300
    poem = make_poem(tmp_path / "poem.txt", size)
    received: list[bytes] = []
    async with serving(Source(poem)) as server:
        address = address_of(server.listeners[0])

        async def client() -> None:
            received.append(await fetch_poem(address))

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client)
        assert len(received) == clients
        assert all(data == poem for data in received)
        assert server.poems_served == clients
        assert server.bytes_served == clients * len(poem)
        assert server.poems_in_flight == 0
        await wait_until_async(lambda: server.clients_lingering == 0)


# -- 4. junk sent first ---------------------------------------------------------


@pytest.mark.parametrize(
    ("junk", "which"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", "small"),
        (b"x" * MiB, "small"),
        pytest.param(b"GET / HTTP/1.0\r\n\r\n", "big", marks=pytest.mark.slow),
    ],
    ids=["a-line", "1MiB", "a-line-big-poem"],
)
@pytest.mark.parametrize("linger", ["auto", "always"])
async def test_junk_sent_first_does_not_cut_the_poem(
    junk: bytes, which: str, linger: str, big_poem: bytes
) -> None:
    """A client that sends junk before reading gets the whole poem and a clean EOF."""
    poem = LEDGER.read_bytes() if which == "small" else big_poem
    # A small window keeps part of a big poem in the server's send buffer
    # when it finishes, where a reset (unread junk at close) would destroy it.
    rcvbuf = SMALL_RCVBUF if which == "big" else None
    async with serving(Source(poem), always_linger=linger == "always") as server:
        address = address_of(server.listeners[0])
        for _ in range(3):
            with await connect(address, rcvbuf=rcvbuf) as sock:
                await send_junk(sock, junk, linger)
                assert await receive_to_eof(sock) == poem
        assert server.poems_served == 3
        await wait_until_async(lambda: server.clients_lingering == 0)


@pytest.mark.slow
async def test_client_streaming_junk_while_reading_gets_the_whole_poem(big_poem: bytes) -> None:
    """A client that keeps sending data the whole time it reads gets the whole big poem."""
    async with serving(Source(big_poem)) as server:
        address = address_of(server.listeners[0])
        with await connect(address) as sock:
            sent = 0

            async def babble(cancel_scope: trio.CancelScope) -> None:
                nonlocal sent
                with cancel_scope:
                    junk = b"more words, more words\n" * 2800  # ~64 KiB
                    while True:
                        sent += await sock.send(junk)
                        await trio.sleep(0)

            talker = trio.CancelScope()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(babble, talker)
                data = await receive_to_eof(sock)
                talker.cancel()
            assert sent > 0
            assert data == big_poem
        assert server.poems_served == 1
        await wait_until_async(lambda: server.clients_lingering == 0)


@pytest.mark.slow
async def test_client_that_writes_more_than_the_buffers_before_reading_gets_the_poem(
    big_poem: bytes,
) -> None:
    """Input far beyond the socket buffers, sent before reading, cannot stall a big poem.

    The client only reads once all its junk is sent; a server that did not read
    while sending would wait on the client while the client waits on it.
    """
    junk = b"j" * (2 * len(big_poem))
    async with serving(Source(big_poem)) as server:
        with await connect(address_of(server.listeners[0])) as sock:
            await send_all(sock, junk)
            assert await receive_to_eof(sock) == big_poem
        assert server.poems_served == 1


@pytest.mark.slow
async def test_request_then_half_close_still_gets_the_whole_poem(big_poem: bytes) -> None:
    """A client that sends a line and shuts down its side, then reads slowly, gets it all."""
    async with serving(Source(big_poem)) as server:
        address = address_of(server.listeners[0])
        with await connect(address, rcvbuf=SMALL_RCVBUF) as sock:
            await send_all(sock, b"please\n")
            sock.shutdown(socket.SHUT_WR)
            head = await receive_exactly(sock, 256 * KiB, chunk=4 * KiB, pause=0.001)
            rest = await receive_to_eof(sock)
            assert head + rest == big_poem
        assert server.poems_served == 1


# -- 5. junk sent after part or all of the poem --------------------------------


@pytest.mark.slow
async def test_junk_after_part_of_the_poem_does_not_cut_it(big_poem: bytes) -> None:
    """A client that sends junk half-way through a big poem still gets all of it."""
    async with serving(Source(big_poem)) as server:
        address = address_of(server.listeners[0])
        with await connect(address, rcvbuf=SMALL_RCVBUF) as sock:
            head = await receive_exactly(sock, len(big_poem) // 2)
            await send_all(sock, b"are we there yet?\n" * 1000)
            rest = await receive_to_eof(sock)
            assert head + rest == big_poem
        assert server.poems_served == 1
        await wait_until_async(lambda: server.clients_lingering == 0)


@pytest.mark.parametrize("which", ["small", "big"])
@pytest.mark.parametrize("linger", ["auto", "always"])
async def test_junk_after_the_whole_poem_still_ends_in_a_clean_eof(
    which: str, linger: str, big_poem: bytes
) -> None:
    """A client that sends junk after the last byte of the poem still sees a clean EOF."""
    poem = LEDGER.read_bytes() if which == "small" else big_poem
    async with serving(Source(poem), always_linger=linger == "always") as server:
        address = address_of(server.listeners[0])
        with await connect(address) as sock:
            data = await receive_exactly(sock, len(poem))
            await send_junk(sock, b"thank you\n" * 10000, linger)
            assert data + await receive_to_eof(sock) == poem
        await wait_until_async(lambda: server.clients_lingering == 0)


# -- 5b. when a client that has its poem is closed ---------------------------------


async def test_a_quiet_client_is_closed_as_soon_as_it_has_its_poem() -> None:
    """--linger auto: a client that sent nothing and took the poem costs nothing afterwards.

    The server's end is gone at once (not after the send timeout): a write
    from the client is answered with a reset, and nothing lingers.
    """
    poem = LEDGER.read_bytes()
    async with serving(Source(poem), send_timeout=10 * WAIT) as server:
        with await connect(address_of(server.listeners[0])) as sock:
            assert await receive_to_eof(sock) == poem
            # At once, unless the acknowledgement came late: then at a sweep.
            await wait_until_async(lambda: server.clients_lingering == 0)
            await assert_server_end_gone(sock)
        assert server.poems_served == 1


async def test_a_quiet_client_is_closed_once_its_late_acknowledgement_arrives() -> None:
    """--linger auto: a quiet client that had not acknowledged the whole poem
    when it was sent is closed once it has, though it never closes its end."""
    poem = b"x" * (128 * KiB)
    [listener] = bind("127.0.0.1", 0)
    # Accepted sockets inherit the listener's send buffer: the kernel takes
    # the whole poem at once, while the client's small window holds little.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * KiB)
    async with serving(Source(poem), [listener], send_timeout=10 * WAIT) as server:
        with await connect(address_of(listener), rcvbuf=16 * KiB) as sock:
            await wait_until_async(lambda: server.poems_served == 1)
            assert server.clients_lingering == 1, "the premise: sent, not yet acknowledged"
            assert await receive_to_eof(sock) == poem
            await wait_until_async(lambda: server.clients_lingering == 0)
            await assert_server_end_gone(sock)


async def test_a_client_whose_words_came_first_lingers_until_it_closes() -> None:
    """--linger auto: input waiting when the poem is sent keeps the connection open."""
    poem = LEDGER.read_bytes()
    [listener] = bind("127.0.0.1", 0)
    # Connected and talking before the server runs: its words are certainly
    # there when the poem goes out.
    with await connect(address_of(listener)) as sock:
        await send_all(sock, b"hello?\n")
        async with serving(Source(poem), [listener]) as server:
            assert await receive_to_eof(sock) == poem
            await wait_until_async(lambda: server.clients_lingering == 1)
            sock.close()
            await wait_until_async(lambda: server.clients_lingering == 0)


async def test_always_linger_keeps_even_a_quiet_client_until_it_closes() -> None:
    """--linger always: the quiet client of the test above lingers, and its writes are read."""
    poem = LEDGER.read_bytes()
    async with serving(Source(poem), always_linger=True) as server:
        with await connect(address_of(server.listeners[0])) as sock:
            assert await receive_to_eof(sock) == poem
            await wait_until_async(lambda: server.clients_lingering == 1)
            await send_all(sock, b"thank you\n" * 1000)
            assert server.clients_lingering == 1
        await wait_until_async(lambda: server.clients_lingering == 0)


async def test_unix_clients_always_linger(tmp_path: Path) -> None:
    """AF_UNIX has no struct tcp_info to ask: its clients are kept until they close."""
    path = tmp_path / "poetry.sock"
    if len(str(path)) > 100:  # sun_path is 108 bytes
        pytest.skip(f"temporary path too long for an AF_UNIX address: {path}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.setblocking(False)
    poem = LEDGER.read_bytes()
    async with serving(Source(poem), [listener]) as server:
        with await connect(str(path), socket.AF_UNIX) as sock:
            assert await receive_to_eof(sock) == poem
            await wait_until_async(lambda: server.clients_lingering == 1)
        await wait_until_async(lambda: server.clients_lingering == 0)


# -- 6. AF_UNIX --------------------------------------------------------------------


@pytest.mark.parametrize("size", [3 * KiB, 2 * MiB], ids=["3KiB", "2MiB"])
async def test_unix_listener_serves_the_poem(
    tmp_path: Path, size: int, poetry_log: pytest.LogCaptureFixture
) -> None:
    """An AF_UNIX stream listener serves the whole poem and logs the peer as a unix client."""
    path = tmp_path / "poetry.sock"
    if len(str(path)) > 100:  # sun_path is 108 bytes
        pytest.skip(f"temporary path too long for an AF_UNIX address: {path}")
    poem = make_poem(tmp_path / "poem.txt", size)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.setblocking(False)
    async with serving(Source(poem), [listener]) as server:
        for _ in range(3):
            assert await fetch_poem(str(path), socket.AF_UNIX) == poem
        assert server.poems_served == 3
    assert f"serving test-poem on unix:{path}" in messages(poetry_log)
    assert f"sending {size} bytes of poetry to unix client" in messages(poetry_log)


async def test_unix_client_with_an_abstract_address_is_logged_by_name(
    tmp_path: Path, poetry_log: pytest.LogCaptureFixture
) -> None:
    """A unix client bound to an abstract address gets the poem and is logged as unix:@NAME."""
    path = tmp_path / "poetry.sock"
    if len(str(path)) > 100:
        pytest.skip(f"temporary path too long for an AF_UNIX address: {path}")
    poem = LEDGER.read_bytes()
    name = f"fastpoetry-test-{os.getpid()}-{id(path)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    listener.setblocking(False)
    async with serving(Source(poem), [listener]):
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            await sock.bind("\0" + name)
            with trio.fail_after(WAIT):
                await sock.connect(str(path))
            assert await receive_to_eof(sock) == poem
    assert f"sending {len(poem)} bytes of poetry to unix:@{name}" in messages(poetry_log)


# -- 7. IPv6 -----------------------------------------------------------------------


@needs_ipv6
async def test_ipv6_loopback_listener_serves_the_poem(poetry_log: pytest.LogCaptureFixture) -> None:
    """A listener bound to ::1 serves the whole poem to an IPv6 client."""
    try:
        listeners = bind("::1", 0)
    except ListenerError as exc:
        pytest.skip(f"cannot listen on ::1: {exc}")
    poem = LEDGER.read_bytes()
    async with serving(Source(poem), listeners) as server:
        assert listeners[0].family == socket.AF_INET6
        host, port = address_of(listeners[0])
        assert await fetch_poem((host, port), socket.AF_INET6) == poem
        assert server.poems_served == 1
    assert f"serving test-poem on [::1]:{port}" in messages(poetry_log)


@needs_ipv6
async def test_dual_stack_listener_logs_an_ipv4_peer_as_ipv4(poetry_log: pytest.LogCaptureFixture) -> None:
    """On a dual-stack :: listener an IPv4 client is logged as 127.0.0.1:PORT, with fields."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", 0))
    except OSError as exc:
        listener.close()
        pytest.skip(f"cannot make a dual-stack IPv6 socket: {exc}")
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    poem = LEDGER.read_bytes()
    async with serving(Source(poem, label="ledger"), [listener]):
        with await connect(("127.0.0.1", port)) as sock:
            client_port = sock.getsockname()[1]
            assert await receive_to_eof(sock) == poem
    peer = f"127.0.0.1:{client_port}"
    records = [r for r in poetry_log.records if r.getMessage() == f"sending {len(poem)} bytes of poetry to {peer}"]
    assert len(records) == 1, messages(poetry_log)
    record = records[0]
    assert record.levelno == logging.DEBUG
    assert record.POEM == "ledger"  # type: ignore[attr-defined]
    assert record.PEER == peer  # type: ignore[attr-defined]
    assert record.BYTES == len(poem)  # type: ignore[attr-defined]


# -- 8. clients that do not read ---------------------------------------------------


@pytest.mark.slow
async def test_stalled_client_is_dropped_after_send_timeout(
    big_poem: bytes, poetry_log: pytest.LogCaptureFixture
) -> None:
    """A client that never reads a big poem is dropped after send_timeout, with part of it."""
    async with serving(Source(big_poem), send_timeout=0.5) as server:
        address = address_of(server.listeners[0])
        with await connect(address, rcvbuf=4 * KiB) as sock:
            await wait_until_async(lambda: any("dropped a client" in m for m in messages(poetry_log)))
            await wait_until_async(lambda: server.poems_in_flight == 0)
            received, reset = await receive_until_closed(sock)
        assert 0 < len(received) < len(big_poem)
        assert big_poem.startswith(received)
        assert server.poems_served == 0
        assert server.bytes_served == 0
    [drop] = [r for r in poetry_log.records if "dropped a client" in r.getMessage()]
    sent: int = drop.BYTES  # type: ignore[attr-defined]
    assert drop.levelno == logging.INFO
    assert drop.POEM == "test-poem"  # type: ignore[attr-defined]
    assert f"within 0.5 s ({sent} of {len(big_poem)} bytes sent)" in drop.getMessage()
    # A plain close: what the kernel took still arrives, then EOF.
    assert len(received) == sent if not reset else len(received) <= sent


@pytest.mark.slow
async def test_stalled_client_does_not_hold_up_others(big_poem: bytes) -> None:
    """While one client stalls mid-poem, others are served whole; its leaving is handled."""
    async with serving(Source(big_poem)) as server:
        address = address_of(server.listeners[0])
        stalled = await connect(address, rcvbuf=4 * KiB)
        try:
            await wait_until_async(lambda: server.poems_in_flight == 1)
            received: list[bytes] = []

            async def client() -> None:
                received.append(await fetch_poem(address))

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(client)
            assert received == [big_poem] * 3
            # Still stalled (send_timeout is the hang guard): served around it.
            assert server.poems_in_flight == 1
            assert server.poems_served == 3
        finally:
            stalled.close()  # unread data: the client resets, the send fails
        await wait_until_async(lambda: server.poems_in_flight == 0)
        assert server.poems_served == 3
        assert await fetch_poem(address) == big_poem


async def test_clients_are_closed_at_once_while_there_is_no_poem(
    poetry_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty poem means none yet (a proxy before its first fetch): close, warn once."""
    monkeypatch.setattr(acceptor, "CAPACITY_LOG_INTERVAL", 10 * WAIT)  # however slow the machine
    source = Source(b"", label="upstream")
    async with serving(source) as server:
        address = address_of(server.listeners[0])
        for _ in range(5):
            with await connect(address) as sock:
                data, _ = await receive_until_closed(sock)
            assert data == b""
        assert server.poems_served == 0
        source.poem = LEDGER.read_bytes()
        assert await fetch_poem(address) == source.poem
    warnings = [r.getMessage() for r in poetry_log.records if r.levelno == logging.WARNING]
    # The first batch is reported at once, the rest wait for the next report.
    # A batch is every client waiting when the thread turns them away: the
    # next client may connect as soon as the one before has seen its close,
    # before the thread asks for more, so the first batch may be several.
    [warning] = warnings
    match = re.fullmatch(rf"no poem to serve yet: closed (\d) connections? on {re.escape(address[0])}:{address[1]} without one", warning)
    assert match and 1 <= int(match[1]) <= 5, warning


# -- 9. reloading while sending ----------------------------------------------------


@pytest.mark.slow
async def test_reload_during_a_big_send_never_mixes_poems(tmp_path: Path) -> None:
    """Clients accepted before a reload get the whole old poem, later ones the whole new one."""
    path = tmp_path / "poem.txt"
    old = make_poem(path, BIG, seed="old")
    async with trio.open_nursery() as nursery:
        poet = PoetryService(str(path))
        await poet.start(nursery)
        async with serving(poet) as server:
            address = address_of(server.listeners[0])
            early = [await connect(address, rcvbuf=SMALL_RCVBUF) for _ in range(3)]
            try:
                heads = [await receive_exactly(sock, 4 * KiB) for sock in early]
                await wait_until_async(lambda: server.poems_in_flight == 3)

                new = make_poem(path, 3 * MiB + 17, seed="new")
                await poet.reload()
                assert poet.poem == new

                late = [await fetch_poem(address) for _ in range(3)]
                assert late == [new] * 3
                assert server.poems_in_flight == 3

                for sock, head in zip(early, heads):
                    assert head + await receive_to_eof(sock) == old
            finally:
                for sock in early:
                    sock.close()
            assert server.poems_served == 6
            assert server.bytes_served == 3 * len(old) + 3 * len(new)
        await poet.stop()


# -- 10. stopping --------------------------------------------------------------------


async def _refused(address: tuple[str, int]) -> bool:
    try:
        with await connect(address):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.slow
async def test_stop_lets_a_poem_in_flight_finish(big_poem: bytes) -> None:
    """stop() closes the listener at once but returns only after a slow reader has its poem."""
    [listener] = bind("127.0.0.1", 0)
    address = address_of(listener)
    server = StreamServer(Source(big_poem), [listener], send_timeout=WAIT)
    stop_returned = trio.Event()

    async def stop() -> None:
        await server.stop()
        stop_returned.set()

    async with trio.open_nursery() as server_nursery:
        await server.start(server_nursery)
        async with trio.open_nursery() as helpers:
            with await connect(address, rcvbuf=SMALL_RCVBUF) as reader:
                head = await receive_exactly(reader, 256 * KiB, chunk=4 * KiB, pause=0.001)
                await wait_until_async(lambda: server.poems_in_flight == 1)
                helpers.start_soon(stop)
                await wait_until_async(lambda: listener.fileno() == -1)
                assert await _refused(address)
                assert not stop_returned.is_set()
                # The reader goes on; the stop keeps waiting.
                middle = await receive_exactly(reader, 1 * MiB, chunk=4 * KiB, pause=0.001)
                rest = await receive_to_eof(reader)
                assert head + middle + rest == big_poem
                # The poem is out, but the server still waits for the client to close.
                assert not stop_returned.is_set()
            with trio.fail_after(WAIT):
                await stop_returned.wait()
        assert server_nursery.child_tasks == frozenset()
    assert server.poems_served == 1
    assert server.poems_in_flight == 0
    assert server.clients_lingering == 0
    assert not server.running
    assert await _refused(address)


async def test_stop_does_not_wait_for_a_client_that_has_its_poem_but_stays() -> None:
    """A client that holds the whole poem but keeps its end open does not delay stop()."""
    poem = LEDGER.read_bytes()
    [listener] = bind("127.0.0.1", 0)
    server = StreamServer(Source(poem), [listener], send_timeout=WAIT, always_linger=True)
    async with trio.open_nursery() as server_nursery:
        await server.start(server_nursery)
        with await connect(address_of(listener)) as sock:
            assert await receive_to_eof(sock) == poem
            await wait_until_async(lambda: server.clients_lingering == 1)
            with trio.fail_after(WAIT):
                await server.stop()
            assert server.clients_lingering == 0


async def test_stop_waits_until_a_lingering_client_has_received_everything(
    big_poem: bytes,
) -> None:
    """stop() waits for a client whose poem is sent but not yet received, then returns."""
    size = 256 * KiB  # the kernel takes it all at once, the client reads none
    poem = big_poem[:size]
    [listener] = bind("127.0.0.1", 0)
    server = StreamServer(Source(poem), [listener], send_timeout=WAIT, always_linger=True)
    stop_returned = trio.Event()

    async def stop() -> None:
        await server.stop()
        stop_returned.set()

    async with trio.open_nursery() as server_nursery:
        await server.start(server_nursery)
        with await connect(address_of(listener)) as sock:
            await wait_until_async(lambda: server.clients_lingering == 1)
            server_nursery.start_soon(stop)
            await wait_until_async(lambda: listener.fileno() == -1)
            await trio.sleep(0.2)  # several finishing passes
            assert not stop_returned.is_set()
            assert await receive_to_eof(sock) == poem
            with trio.fail_after(WAIT):
                await stop_returned.wait()  # the client has not closed yet
    assert server.clients_lingering == 0


async def test_client_that_never_closes_is_closed_after_send_timeout(
    poetry_log: pytest.LogCaptureFixture,
) -> None:
    """A client that has its poem but never closes is closed by the server after send_timeout."""
    poem = LEDGER.read_bytes()
    async with serving(Source(poem), send_timeout=0.5, always_linger=True) as server:
        with await connect(address_of(server.listeners[0])) as sock:
            assert await receive_to_eof(sock) == poem
            await wait_until_async(lambda: server.clients_lingering == 1)
            await wait_until_async(lambda: server.clients_lingering == 0)
            await assert_server_end_gone(sock)
    assert any("did not close within 0.5 s" in m for m in messages(poetry_log))


class _StepCounter(trio.abc.Instrument):
    """Counts how often a task whose name ends with ``suffix`` runs."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.suffix):
            self.steps += 1


async def test_stop_does_not_spin_while_a_client_lingers() -> None:
    """While stop() waits for an idle lingering client, the closer sleeps instead of spinning."""
    poem = LEDGER.read_bytes()
    [listener] = bind("127.0.0.1", 0)
    server = StreamServer(Source(poem), [listener], send_timeout=WAIT, always_linger=True)
    counter = _StepCounter("LingeringCloser.run")
    async with trio.open_nursery() as server_nursery:
        await server.start(server_nursery)
        with await connect(address_of(listener)) as sock:
            assert await receive_to_eof(sock) == poem
            await wait_until_async(lambda: server.clients_lingering == 1)
            server_nursery.start_soon(server.stop)
            await wait_until_async(lambda: listener.fileno() == -1)
            trio.lowlevel.add_instrument(counter)
            try:
                # Nothing happens on the socket: a waiting closer wakes at most
                # once per sweep (1 s), whatever the speed of the machine.
                await trio.sleep(0.5)
            finally:
                trio.lowlevel.remove_instrument(counter)
    assert counter.steps < 50, f"the closer ran {counter.steps} times while nothing happened"


@pytest.mark.slow
async def test_stop_under_a_deadline_closes_stalled_and_lingering_clients(big_poem: bytes) -> None:
    """stop() cut short by the caller's deadline returns and closes every open connection."""
    [listener] = bind("127.0.0.1", 0)
    address = address_of(listener)
    server = StreamServer(Source(big_poem), [listener], send_timeout=WAIT, always_linger=True)
    async with trio.open_nursery() as server_nursery:
        await server.start(server_nursery)
        with await connect(address) as lingering, await connect(address, rcvbuf=4 * KiB) as stalled:
            assert await receive_to_eof(lingering) == big_poem
            await wait_until_async(lambda: server.clients_lingering == 1 and server.poems_in_flight == 1)
            with trio.move_on_after(0.2) as deadline:
                await server.stop()
            assert deadline.cancelled_caught  # it was waiting, and was cut short
            assert server_nursery.child_tasks == frozenset()
            assert server.poems_in_flight == 0
            assert server.clients_lingering == 0
            assert listener.fileno() == -1
            received, _reset = await receive_until_closed(stalled)
            assert len(received) < len(big_poem)
            assert big_poem.startswith(received)
    assert server.poems_served == 1
    assert await _refused(address)


# -- 11. clients that reset at once -----------------------------------------------


def _connect_and_reset(address: tuple[str, int]) -> None:
    """Connect, then close with SO_LINGER 0: the server gets a reset."""
    sock = socket.create_connection(address, timeout=WAIT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_accepting_survives_clients_that_reset_at_once(poetry_log: pytest.LogCaptureFixture) -> None:
    """Connections reset before or while being accepted do not stop the next client being served."""
    poem = LEDGER.read_bytes()
    [listener] = bind("127.0.0.1", 0)
    address = address_of(listener)
    # Queued before the server starts: it accepts the reset ones first.
    for _ in range(3):
        _connect_and_reset(address)
    queued = socket.create_connection(address, timeout=WAIT)
    async with serving(Source(poem), [listener]) as server:
        with queued:
            assert await trio.to_thread.run_sync(_read_blocking, queued) == poem
        assert any("went away before it had its poem" in m for m in messages(poetry_log))
        for _ in range(5):
            await trio.to_thread.run_sync(_connect_and_reset, address)
            assert await fetch_poem(address) == poem
        assert server.poems_served >= 6


def _read_blocking(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- 12. out of descriptors -----------------------------------------------------------

_EXHAUSTION_SCRIPT = r"""
import logging, os, resource, sys
import trio
from fastpoetry.listeners import bind
from fastpoetry.stream import StreamServer

class Source:
    label = "burst"
    def __init__(self, poem):
        self.poem = poem

async def main():
    poem = open(sys.argv[1], "rb").read()
    spare = int(sys.argv[2])
    [listener] = bind("127.0.0.1", 0)
    # Every client holds a descriptor until it closes, even a quiet one
    # (--linger always): the burst of held clients exhausts them.
    server = StreamServer(Source(poem), [listener], send_timeout=60.0, always_linger=True)
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + spare, hard))
        print(listener.getsockname()[1], flush=True)
        await trio.lowlevel.wait_readable(sys.stdin.fileno())  # EOF: stop
        with trio.move_on_after(20):
            await server.stop()
    print("served", server.poems_served, flush=True)

logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
trio.run(main)
"""


@pytest.mark.slow
def test_running_out_of_descriptors_is_logged_rate_limited_and_survived(tmp_path: Path) -> None:
    """Out of descriptors, the server warns a few times, not per accept, and serves again after."""
    poem = LEDGER.read_bytes()
    spare, burst = 16, 64
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", _EXHAUSTION_SCRIPT, str(LEDGER), str(spare)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=clean_env(),
        )
    clients: list[socket.socket] = []
    try:
        assert process.stdout is not None and process.stdin is not None
        ready, _, _ = select.select([process.stdout], [], [], WAIT)
        assert ready, f"the server did not start:\n{log_path.read_text()}"
        port = int(process.stdout.readline())
        address = ("127.0.0.1", port)

        # More clients than the server has descriptors, all held open.
        for _ in range(burst):
            clients.append(socket.create_connection(address, timeout=WAIT))
        deadline = time.monotonic() + WAIT
        while "cannot accept connections" not in log_path.read_text():
            assert time.monotonic() < deadline, f"no capacity warning:\n{log_path.read_text()}"
            assert process.poll() is None, f"the server died:\n{log_path.read_text()}"
            time.sleep(0.02)
        # Let it fail to accept many more times (it retries every 0.1 s).
        time.sleep(1.5)
        assert process.poll() is None, f"the server died:\n{log_path.read_text()}"
        for sock in clients:
            sock.close()
        clients.clear()

        # A fresh client is served whole once descriptors are free again.
        assert fetch(address) == poem
        assert process.poll() is None

        process.stdin.close()
        assert process.wait(WAIT) == 0, log_path.read_text()
        output = process.stdout.read().decode()
    finally:
        for sock in clients:
            sock.close()
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)
        if process.stdout is not None:
            process.stdout.close()
    log = log_path.read_text()
    warnings = [line for line in log.splitlines() if "cannot accept connections" in line]
    assert 1 <= len(warnings) <= 3, log
    assert "too many open files" in warnings[0]
    assert "Traceback" not in log, log
    # Every connection of the burst was served in the end, and the fresh one.
    assert output.split() == ["served", str(burst + 1)], output

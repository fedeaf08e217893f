"""StreamServer behind a load balancer: the PROXY protocol over real loopback sockets.

The clients play the balancer: each sends a header (built here from the
specification's layout), whole, in pieces, late, broken or not at all, then
reads.  What they must see: the exact poem after a valid header, and not one
byte of it otherwise, but a reset.  Waits are hang guards only (``WAIT``);
a pause between two pieces makes the second arrive later, and the test
holds whichever way the server happens to read them.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import POEMS, WAIT, make_poem, needs_ipv6, receive, serving_stream, wait_until_async
from fastpoetry import acceptor
from fastpoetry.listeners import bind
from fastpoetry.proxy_protocol import V2_SIGNATURE, HeaderError, parse
from fastpoetry.stream import StreamServer

LEDGER = POEMS / "harbour-ledger.txt"

#: A header timeout for the tests that wait for it to pass.
SHORT = 0.3


class Source:
    def __init__(self, poem: bytes, label: str = "test-poem") -> None:
        self.poem = poem
        self.label = label


def v2_tcp4(client: tuple[str, int], server: tuple[str, int] = ("192.0.2.1", 10000)) -> bytes:
    body = socket.inet_aton(client[0]) + socket.inet_aton(server[0]) + struct.pack("!HH", client[1], server[1])
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def v2_tcp6(client: tuple[str, int], server: tuple[str, int] = ("2001:db8::1", 10000)) -> bytes:
    body = (
        socket.inet_pton(socket.AF_INET6, client[0])
        + socket.inet_pton(socket.AF_INET6, server[0])
        + struct.pack("!HH", client[1], server[1])
    )
    return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(body)) + body


def v2_unix(client: bytes) -> bytes:
    body = client.ljust(108, b"\0") + b"/run/haproxy/poetry.sock".ljust(108, b"\0")
    return V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", len(body)) + body


V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


def serving(
    poem: bytes, listeners: list[socket.socket] | None = None, **options: object
) -> AbstractAsyncContextManager[StreamServer]:
    """A started StreamServer expecting PROXY protocol headers (unless told otherwise)."""
    options.setdefault("proxy_protocol", True)
    return serving_stream(Source(poem), listeners, **options)


async def connect(server: StreamServer) -> trio.socket.SocketType:
    sock = trio.socket.socket(server.listeners[0].family, socket.SOCK_STREAM)
    with trio.fail_after(WAIT):
        await sock.connect(server.listeners[0].getsockname())
    return sock


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    with trio.fail_after(WAIT):
        while view:
            view = view[await sock.send(view) :]


async def fetch(server: StreamServer, *pieces: bytes, pause: float = 0.0) -> tuple[bytes, str]:
    """Send ``pieces`` (pausing between them), then read to the end."""
    with await connect(server) as sock:
        for number, piece in enumerate(pieces):
            if number and pause:
                await trio.sleep(pause)
            await send_all(sock, piece)
        return await receive(sock)


def sending_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("sending ")]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("fastpoetry")]


# -- valid headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "peer"),
    [
        pytest.param(b"PROXY TCP4 198.51.100.7 192.0.2.1 40123 10000\r\n", "198.51.100.7:40123", id="v1 TCP4"),
        pytest.param(b"PROXY TCP6 2001:db8::7 2001:db8::1 40123 10000\r\n", "[2001:db8::7]:40123", id="v1 TCP6"),
        pytest.param(v2_tcp4(("198.51.100.7", 40123)), "198.51.100.7:40123", id="v2 TCP4"),
        pytest.param(v2_tcp6(("2001:db8::7", 40123)), "[2001:db8::7]:40123", id="v2 TCP6"),
        pytest.param(v2_unix(b"/run/client.sock"), "unix:/run/client.sock", id="v2 UNIX"),
        pytest.param(v2_unix(b"\0client"), "unix:@client", id="v2 UNIX abstract"),
    ],
)
@pytest.mark.parametrize("split", [False, True], ids=["whole", "in pieces"])
async def test_the_poem_goes_to_the_client_the_header_names(
    header: bytes, peer: str, split: bool, poetry_log: pytest.LogCaptureFixture
) -> None:
    """A valid header, whole or in pieces, brings the exact poem; PEER= is the client it names."""
    poem = LEDGER.read_bytes()
    pieces = [header[:5], header[5:13], header[13:]] if split else [header]
    async with serving(poem) as server:
        with await connect(server) as sock:
            balancer = "%s:%d" % sock.getsockname()[:2]
            for number, piece in enumerate(pieces):
                if number:
                    await trio.sleep(0.05)  # the server may well read the first piece alone
                await send_all(sock, piece)
            assert await receive(sock) == (poem, "eof")
        assert server.poems_served == 1 and server.headers_refused == 0
    [record] = sending_records(poetry_log)
    assert record.getMessage() == f"sending {len(poem)} bytes of poetry to {peer} via {balancer}"
    assert record.PEER == peer  # type: ignore[attr-defined]
    assert record.BALANCER == balancer  # type: ignore[attr-defined]
    assert record.BYTES == len(poem)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("header", "why"),
    [
        pytest.param(V2_LOCAL, "health check", id="v2 LOCAL"),
        pytest.param(V2_SIGNATURE + b"\x21\x00\x00\x00", "header names no client", id="v2 UNSPEC"),
        pytest.param(b"PROXY UNKNOWN\r\n", "header names no client", id="v1 UNKNOWN"),
    ],
)
async def test_a_header_naming_no_client_is_served_as_the_balancer(
    header: bytes, why: str, poetry_log: pytest.LogCaptureFixture
) -> None:
    """LOCAL (a health check) and UNKNOWN get the poem, logged as the real peer."""
    poem = LEDGER.read_bytes()
    async with serving(poem) as server:
        with await connect(server) as sock:
            balancer = "%s:%d" % sock.getsockname()[:2]
            await send_all(sock, header)
            assert await receive(sock) == (poem, "eof")
    [record] = sending_records(poetry_log)
    assert record.getMessage() == f"sending {len(poem)} bytes of poetry to {balancer} (the balancer's {why})"
    assert record.PEER == balancer == record.BALANCER  # type: ignore[attr-defined]


@needs_ipv6
async def test_an_ipv6_balancer_is_named_as_such() -> None:
    poem = LEDGER.read_bytes()
    async with serving(poem, bind("::1", 0)) as server:
        assert await fetch(server, v2_tcp4(("198.51.100.7", 1))) == (poem, "eof")


async def test_a_big_poem_after_a_header_arrives_whole(tmp_path: Path) -> None:
    """The kernel does not take it at once: the rest is sent by a task, as without a header."""
    poem = make_poem(tmp_path / "big.txt", 8 * 1024 * 1024)
    async with serving(poem) as server:
        assert await fetch(server, v2_tcp4(("198.51.100.7", 1))) == (poem, "eof")
        assert await fetch(server, v2_tcp4(("198.51.100.7", 2))[:7], v2_tcp4(("198.51.100.7", 2))[7:], pause=0.05) == (
            poem,
            "eof",
        )
        assert server.poems_served == 2


# -- the linger rule ------------------------------------------------------------------


async def test_a_client_that_sent_only_its_header_is_closed_at_once() -> None:
    """The header is input the server has read: nothing else is at stake, so nothing lingers."""
    poem = LEDGER.read_bytes()
    async with serving(poem, send_timeout=10 * WAIT) as server:
        with await connect(server) as sock:
            await send_all(sock, v2_tcp4(("198.51.100.7", 1)))
            assert await receive(sock) == (poem, "eof")
            await wait_until_async(lambda: server.clients_lingering == 0)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                with trio.fail_after(WAIT):
                    while True:
                        await sock.send(b"still there?\n")
                        await trio.sleep(0.01)


async def test_words_after_the_header_make_the_client_linger_until_it_closes() -> None:
    """Anything after the header is input like any other: it must not turn the close into a reset."""
    poem = LEDGER.read_bytes()
    [listener] = bind("127.0.0.1", 0)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        with trio.fail_after(WAIT):
            await sock.connect(listener.getsockname())
        # All there before the server runs: header and words arrive together.
        await send_all(sock, v2_tcp4(("198.51.100.7", 1)) + b"hello?\n")
        async with serving(poem, [listener]) as server:
            assert await receive(sock) == (poem, "eof")
            await wait_until_async(lambda: server.clients_lingering == 1)
            sock.close()
            await wait_until_async(lambda: server.clients_lingering == 0)


# -- no valid header: no poem byte, a reset, a warning now and then -------------------


@pytest.mark.parametrize(
    ("pieces", "kind"),
    [
        pytest.param([b"GET / HTTP/1.0\r\n\r\n"], "malformed", id="http"),
        pytest.param([b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"], "malformed", id="v1 bad port"),
        pytest.param([V2_SIGNATURE[:6], b"nope"], "malformed", id="v2 broken signature in pieces"),
        pytest.param([b"PROXY UNKNOWN " + b"x" * 120 + b"\r\n"], "oversized", id="v1 too long"),
        pytest.param([V2_SIGNATURE + b"\x21\x11\xff\xff"], "oversized", id="v2 too long"),
        pytest.param([], "timed out", id="missing"),
        pytest.param([V2_SIGNATURE + b"\x21"], "timed out", id="slow"),
    ],
)
async def test_no_valid_header_no_poem_byte_but_a_reset(
    pieces: list[bytes], kind: str, poetry_log: pytest.LogCaptureFixture
) -> None:
    async with serving(LEDGER.read_bytes(), header_timeout=SHORT) as server:
        assert await fetch(server, *pieces, pause=0.05) == (b"", "reset")
        await wait_until_async(lambda: server.headers_refused == 1)
        assert server.poems_served == 0
    assert warnings(poetry_log) == [f"reset 1 connection that sent no valid PROXY protocol header (1 {kind})"]
    refusals = [r for r in poetry_log.records if r.getMessage().startswith("reset a connection from 127.0.0.1:")]
    assert len(refusals) == 1 and refusals[0].levelno == logging.DEBUG


async def test_a_client_that_closes_before_its_header_is_whole_is_counted() -> None:
    async with serving(LEDGER.read_bytes()) as server:
        with await connect(server) as sock:
            await send_all(sock, V2_SIGNATURE[:4])
            sock.shutdown(socket.SHUT_WR)
            assert await receive(sock) == (b"", "reset")
        await wait_until_async(lambda: server.headers_refused == 1)


async def test_refusals_are_summed_up_in_one_warning_per_interval(
    poetry_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first refusal is reported at once; the rest wait for the interval, or the stop."""
    monkeypatch.setattr(acceptor, "REFUSED_LOG_INTERVAL", 10 * WAIT)
    async with serving(LEDGER.read_bytes(), header_timeout=SHORT) as server:
        for pieces in ([b"junk"], [b"more junk"], [], [b"PROXY " + b"x" * 200]):
            assert await fetch(server, *pieces) == (b"", "reset")
        await wait_until_async(lambda: server.headers_refused == 4)
        assert warnings(poetry_log) == ["reset 1 connection that sent no valid PROXY protocol header (1 malformed)"]
        # Valid clients are served meanwhile, as ever.
        assert await fetch(server, V2_LOCAL) == (LEDGER.read_bytes(), "eof")
    assert warnings(poetry_log)[1:] == [
        "reset 3 connections that sent no valid PROXY protocol header (1 malformed, 1 oversized, 1 timed out)"
    ]


async def test_stopping_does_not_wait_for_a_header() -> None:
    """A client whose header has not come has begun no poem: a stop drops it at once."""
    async with serving(LEDGER.read_bytes(), header_timeout=100 * WAIT) as server:
        with await connect(server) as sock:
            await send_all(sock, V2_SIGNATURE[:3])
            await wait_until_async(lambda: server.poems_in_flight == 0)
            with trio.fail_after(WAIT):
                await server.stop()
            assert await receive(sock) == (b"", "reset")


# -- without the option ------------------------------------------------------------------


async def test_without_the_option_a_header_is_input_like_any_other(poetry_log: pytest.LogCaptureFixture) -> None:
    """The poem is sent at once, the header read and dropped as any client input, the peer logged as it is."""
    poem = LEDGER.read_bytes()
    async with serving(poem, proxy_protocol=False) as server:
        with await connect(server) as sock:
            peer = "%s:%d" % sock.getsockname()[:2]
            await send_all(sock, v2_tcp4(("198.51.100.7", 1)))
            assert await receive(sock) == (poem, "eof")
        assert await fetch(server) == (poem, "eof")  # no header at all: served as ever
    records = sending_records(poetry_log)
    assert records[0].getMessage() == f"sending {len(poem)} bytes of poetry to {peer}"
    assert not hasattr(records[0], "BALANCER")


# -- random and truncated headers against a live server ----------------------------------


@pytest.fixture(scope="module")
def live_server() -> Iterator[tuple[str, int]]:
    """A StreamServer expecting headers, in an event loop of its own thread, for blocking clients."""
    started = threading.Event()
    loop: dict[str, object] = {}

    async def serve() -> None:
        server = StreamServer(
            Source(LEDGER.read_bytes()), bind("127.0.0.1", 0), send_timeout=WAIT,
            proxy_protocol=True, header_timeout=SHORT,
        )
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            loop.update(address=server.listeners[0].getsockname(), stop=stop, token=trio.lowlevel.current_trio_token())
            started.set()
            await stop.wait()
            await server.stop()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert started.wait(WAIT), "the server did not start"
    try:
        yield loop["address"]  # type: ignore[misc]
    finally:
        trio.from_thread.run_sync(loop["stop"].set, trio_token=loop["token"])  # type: ignore[attr-defined]
        thread.join(WAIT)


def _send_and_read(address: tuple[str, int], data: bytes, half_close: bool) -> tuple[bytes, str]:
    with socket.create_connection(address, timeout=WAIT) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b"", "reset"  # refused before it had sent everything
        except OSError as exc:  # ENOTCONN: the same, seen by shutdown()
            if exc.errno != errno.ENOTCONN:
                raise
            return b"", "reset"
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            return bytes(received), "reset"
        return bytes(received), "eof"


_VALID = [
    b"PROXY TCP4 198.51.100.7 192.0.2.1 40123 10000\r\n",
    b"PROXY UNKNOWN\r\n",
    v2_tcp4(("198.51.100.7", 40123)),
    v2_tcp6(("2001:db8::7", 1)),
    v2_unix(b"/run/client.sock"),
    V2_LOCAL,
]


def _one_byte_changed(header: bytes) -> st.SearchStrategy[bytes]:
    return st.tuples(st.integers(0, len(header) - 1), st.integers(0, 255)).map(
        lambda change: header[: change[0]] + bytes([change[1]]) + header[change[0] + 1 :]
    )


def _is_valid(data: bytes) -> bool:
    try:
        return parse(data) is not None
    except HeaderError:
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    case=st.one_of(
        st.tuples(st.just("random"), st.binary(max_size=200)),
        st.tuples(st.just("truncated"), st.sampled_from(_VALID).flatmap(lambda h: st.integers(0, len(h) - 1).map(lambda n: h[:n]))),
        st.tuples(st.just("valid"), st.tuples(st.sampled_from(_VALID), st.binary(max_size=64)).map(b"".join)),
        st.tuples(st.just("corrupted"), st.sampled_from(_VALID).flatmap(_one_byte_changed)),
    ),
    half_close=st.booleans(),
)
@example(case=("random", b""), half_close=False)
@example(case=("truncated", V2_SIGNATURE[:12]), half_close=True)
def test_no_poem_byte_ever_reaches_a_connection_without_a_valid_header(
    live_server: tuple[str, int], case: tuple[str, bytes], half_close: bool
) -> None:
    kind, data = case
    received, ending = _send_and_read(live_server, data, half_close)
    if kind == "valid":
        assert (received, ending) == (LEDGER.read_bytes(), "eof")
    elif kind == "truncated" or not data.startswith((b"PROXY ", V2_SIGNATURE)):
        assert (received, ending) == (b"", "reset"), data
    else:  # random bytes that begin like a header: whole only if the parser says so
        expected = (LEDGER.read_bytes(), "eof") if _is_valid(data) else (b"", "reset")
        assert (received, ending) == expected, data

"""Poems over TLS: the certificate and key (tls.py), and StreamServer serving over real loopback TLS.

The clients are the ssl module's and trio's: they check the certificate
against the test's own CA (trustme), and read to the end of the stream
with ragged ends refused, so that a poem counts only if a close_notify
ended it.  Waits are hang guards only (``WAIT``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
import trustme

from helpers import (
    POEMS,
    WAIT,
    Pair,
    Server,
    make_pair,
    make_poem,
    needs_ipv6,
    serving_stream,
    terminate,
    wait_until_async,
)
from fastpoetry import acceptor, tls
from fastpoetry.listeners import bind
from fastpoetry.proxy_protocol import V2_SIGNATURE
from fastpoetry.stream import StreamServer

LEDGER = POEMS / "harbour-ledger.txt"

#: A handshake or header timeout for the tests that wait for it to pass.
SHORT = 0.3


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path / "tls")


def client_context(pair: Pair, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    # Else (Python's default with OpenSSL 3) a ragged end reads as a clean one.
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    pair.ca.configure_trust(context)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


class Source:
    def __init__(self, poem: bytes, label: str = "test-poem") -> None:
        self.poem = poem
        self.label = label


class Context:
    """What StreamServer asks a TLS server's credentials for."""

    def __init__(self, pair: Pair) -> None:
        self.context = tls.load(str(pair.cert), str(pair.key)).context


def serving(
    poem: bytes, pair: Pair, listeners: list[socket.socket] | None = None, **options: object
) -> AbstractAsyncContextManager[StreamServer]:
    options.setdefault("tls", Context(pair))
    return serving_stream(Source(poem), listeners, **options)


async def connect(server: StreamServer) -> trio.SocketStream:
    listener = server.listeners[0]
    sock = trio.socket.socket(listener.family, socket.SOCK_STREAM)
    with trio.fail_after(WAIT):
        await sock.connect(listener.getsockname())
    return trio.SocketStream(sock)


async def fetch_tls(
    server: StreamServer, context: ssl.SSLContext, before: bytes = b""
) -> tuple[bytes, trio.SSLStream]:
    """The poem over TLS, read to a close_notify (a ragged end raises); ``before`` goes first, in plain."""
    stream = await connect(server)
    with trio.fail_after(WAIT):
        if before:
            await stream.send_all(before)
        secure = trio.SSLStream(stream, context, server_hostname="localhost")
        data = bytearray()
        async with secure:
            while piece := await secure.receive_some(65536):
                data += piece
    return bytes(data), secure


async def receive_plain(stream: trio.SocketStream) -> tuple[bytes, str]:
    data = bytearray()
    with trio.fail_after(WAIT):
        while True:
            try:
                piece = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return bytes(data), "reset"
            if not piece:
                return bytes(data), "eof"
            data += piece


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("fastpoetry")]


# -- the certificate and key ---------------------------------------------------------


def test_a_pair_loads_into_a_context_for_tls_1_2_and_1_3_without_tickets(pair: Pair) -> None:
    loaded = tls.load(str(pair.cert), str(pair.key))
    assert loaded.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert loaded.context.num_tickets == 0
    assert loaded.fingerprint == pair.fingerprint
    # As openssl prints it: 32 pairs of hex digits.
    assert len(loaded.fingerprint.split(":")) == 32


def test_a_chain_in_the_certificate_file_is_served(tmp_path: Path) -> None:
    intermediate = trustme.CA().create_child_ca()
    pair = make_pair(tmp_path, "chained", intermediate)
    assert pair.cert.read_text().count("BEGIN CERTIFICATE") == 2
    assert tls.load(str(pair.cert), str(pair.key)).fingerprint == pair.fingerprint


def _broken_files(tmp_path: Path, pair: Pair) -> dict[str, tuple[Path, Path, str]]:
    other = make_pair(tmp_path / "other", "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a PEM file\n")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(pair.key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
        check=True,
        capture_output=True,
    ) if _has_openssl() else encrypted.write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    missing = tmp_path / "missing.pem"
    return {
        "missing certificate": (missing, pair.key, f"cannot load the TLS certificate from {missing}: no such file"),
        "missing key": (pair.cert, missing, f"cannot load the TLS key from {missing}: no such file"),
        "certificate is a folder": (tmp_path, pair.key, f"cannot load the TLS certificate from {tmp_path}: "),
        "no certificate": (junk, pair.key, f"no PEM certificate in {junk}"),
        "no key": (pair.cert, junk, f"no PEM private key in {junk}"),
        "the certificate as key": (pair.cert, pair.cert, f"no PEM private key in {pair.cert}"),
        "encrypted key": (pair.cert, encrypted, f"the private key in {encrypted} is encrypted"),
        "mismatched key": (pair.cert, other.key, f"the private key in {other.key} does not match the certificate in {pair.cert}"),
    }


def _has_openssl() -> bool:
    return any(os.access(os.path.join(folder, "openssl"), os.X_OK) for folder in os.environ.get("PATH", "").split(":"))


BROKEN = [
    "missing certificate",
    "missing key",
    "certificate is a folder",
    "no certificate",
    "no key",
    "the certificate as key",
    "encrypted key",
    "mismatched key",
]


@pytest.mark.parametrize("case", BROKEN)
def test_a_bad_certificate_or_key_is_one_line_naming_the_file_and_never_the_key(
    case: str, pair: Pair, tmp_path: Path
) -> None:
    cert, key, expected = _broken_files(tmp_path, pair)[case]
    with pytest.raises(tls.CredentialsError) as caught:
        tls.load(str(cert), str(key))
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    assert not any(line in message for line in pair.key_lines())


# -- serving over TLS ------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLS 1.3", "TLS 1.2"])
@pytest.mark.parametrize("family", ["IPv4", pytest.param("IPv6", marks=needs_ipv6), "AF_UNIX"])
async def test_tls_brings_the_exact_poem_ended_by_a_close_notify(
    version: ssl.TLSVersion, family: str, pair: Pair, tmp_path: Path, poetry_log: pytest.LogCaptureFixture
) -> None:
    """The client refuses a ragged end, so a poem read to the end was ended by a close_notify."""
    poem = LEDGER.read_bytes()
    if family == "AF_UNIX":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "poetry.sock"))
        listener.listen(16)
        listener.setblocking(False)
        listeners = [listener]
    else:
        listeners = bind("127.0.0.1" if family == "IPv4" else "::1", 0)
    async with serving(poem, pair, listeners) as server:
        received, _ = await fetch_tls(server, client_context(pair, version))
        assert received == poem
        assert server.poems_served == 1 and server.handshakes_failed == 0
    [record] = [r for r in poetry_log.records if r.getMessage().startswith("sending ")]
    assert record.BYTES == len(poem)  # type: ignore[attr-defined]


async def test_the_negotiated_version_is_the_one_asked_for(pair: Pair) -> None:
    poem = LEDGER.read_bytes()
    async with serving(poem, pair) as server:
        for version, name in ((ssl.TLSVersion.TLSv1_3, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")):
            stream = await connect(server)
            secure = trio.SSLStream(stream, client_context(pair, version), server_hostname="localhost")
            with trio.fail_after(WAIT):
                await secure.do_handshake()
                assert secure.version() == name
                data = bytearray()
                while piece := await secure.receive_some(65536):
                    data += piece
                await secure.aclose()
            assert bytes(data) == poem


async def test_a_big_poem_over_tls_arrives_whole(pair: Pair, tmp_path: Path) -> None:
    """Eight megabytes: many records, and many waits for the client to read."""
    poem = make_poem(tmp_path / "big.txt", 8 * 1024 * 1024)
    async with serving(poem, pair) as server:
        received, _ = await fetch_tls(server, client_context(pair))
        assert received == poem


@pytest.mark.parametrize("small_buffer", [False, True], ids=["taken at once", "sent on in a task"])
@pytest.mark.parametrize("size", [1, tls.CHUNK - 1, tls.CHUNK, tls.CHUNK + 1, 2 * tls.CHUNK, 2 * tls.CHUNK + 1])
async def test_poems_either_side_of_a_chunk_arrive_whole(pair: Pair, size: int, small_buffer: bool) -> None:
    """One chunk is sealed with its close_notify at once; more, a chunk at a time. With a send
    buffer too small for the records, what the kernel did not take is sent on as a plain poem's rest."""
    poem = bytes(range(256)) * (size // 256) + b"\n" * (size % 256)
    [listener] = bind("127.0.0.1", 0)
    if small_buffer:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # inherited by each client's socket
    async with serving(poem, pair, [listener]) as server:
        received, _ = await fetch_tls(server, client_context(pair))
        assert received == poem
        await wait_until_async(lambda: server.poems_served == 1)
        assert server.bytes_served == size and server.poems_in_flight == 0


async def test_a_plain_client_gets_no_poem_byte_and_is_dropped_at_the_handshake_timeout(
    pair: Pair, poetry_log: pytest.LogCaptureFixture
) -> None:
    poem = LEDGER.read_bytes()
    async with serving(poem, pair, handshake_timeout=SHORT) as server:
        stream = await connect(server)
        async with stream:
            data, end = await receive_plain(stream)
        assert data == b"" and end == "reset"
        assert server.poems_served == 0
    assert any("1 timed out" in line and "did not complete a TLS handshake" in line for line in warnings(poetry_log))


async def test_a_plain_request_gets_no_poem_byte(pair: Pair, poetry_log: pytest.LogCaptureFixture) -> None:
    """An HTTP request where a ClientHello should be: the handshake fails at once; at most an alert comes back."""
    poem = LEDGER.read_bytes()
    async with serving(poem, pair) as server:
        stream = await connect(server)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            data, _ = await receive_plain(stream)
        assert poem[:8] not in data and len(data) < 16
        assert server.poems_served == 0
    assert any("1 failed" in line for line in warnings(poetry_log))


async def test_a_stalled_handshake_is_dropped_in_time(pair: Pair, poetry_log: pytest.LogCaptureFixture) -> None:
    """Half a ClientHello, then nothing: dropped at the handshake timeout, with a reset, counted."""
    poem = LEDGER.read_bytes()
    hello = _client_hello(pair)
    async with serving(poem, pair, handshake_timeout=SHORT) as server:
        stream = await connect(server)
        async with stream:
            await stream.send_all(hello[: len(hello) // 2])
            data, end = await receive_plain(stream)
        assert (data, end) == (b"", "reset")
    assert any("1 timed out" in line for line in warnings(poetry_log))


def _client_hello(pair: Pair) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(pair).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


async def test_a_client_that_rejects_the_certificate_gets_no_poem_and_is_counted(
    pair: Pair, tmp_path: Path, poetry_log: pytest.LogCaptureFixture
) -> None:
    poem = LEDGER.read_bytes()
    stranger = make_pair(tmp_path / "stranger", "stranger")
    async with serving(poem, pair) as server:
        # The client's alert (unknown CA) is what fails the server's handshake.
        address = server.listeners[0].getsockname()
        with pytest.raises(ssl.SSLCertVerificationError):
            await trio.to_thread.run_sync(_served_fingerprint, address, stranger)
        await wait_until_async(lambda: server.handshakes_failed == 1)
        assert server.poems_served == 0
    [warning] = warnings(poetry_log)
    assert warning == "dropped 1 connection that did not complete a TLS handshake (1 failed)"
    [debug] = [r.getMessage() for r in poetry_log.records if r.getMessage().startswith("dropped a connection")]
    assert "TLS handshake failed: tlsv1 alert unknown ca" in debug


async def test_failed_handshakes_are_summed_up_in_one_warning_per_interval(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, poetry_log: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(acceptor, "REFUSED_LOG_INTERVAL", 10 * WAIT)
    poem = LEDGER.read_bytes()
    async with serving(poem, pair) as server:
        for _ in range(3):
            stream = await connect(server)
            async with stream:
                await stream.send_all(b"\x16\x03\x01\x00\x05hello")  # a record that is no ClientHello
                await receive_plain(stream)
        await wait_until_async(lambda: server.handshakes_failed == 3)
        # The first at once, the rest at the stop.
        assert len(warnings(poetry_log)) == 1
    assert warnings(poetry_log) == [
        "dropped 1 connection that did not complete a TLS handshake (1 failed)",
        "dropped 2 connections that did not complete a TLS handshake (2 failed)",
    ]
    debug = [r.getMessage() for r in poetry_log.records if r.getMessage().startswith("dropped a connection from")]
    assert len(debug) == 3 and all("TLS handshake failed" in line for line in debug)


async def test_stopping_does_not_wait_for_a_handshake(pair: Pair) -> None:
    poem = LEDGER.read_bytes()
    async with serving(poem, pair, handshake_timeout=10 * WAIT) as server:
        stream = await connect(server)
        await trio.sleep(0.05)  # let it be taken, or not: either way it gets no poem
        with trio.fail_after(WAIT):
            await server.stop()
        async with stream:
            data, _ = await receive_plain(stream)
        assert data == b""


async def test_a_client_that_has_spoken_and_never_closes_is_closed_at_the_send_timeout(pair: Pair) -> None:
    """It has the whole poem and the close_notify, then writes: only the send timeout ends it."""
    poem = LEDGER.read_bytes()
    async with serving(poem, pair, send_timeout=SHORT) as server:
        stream = await connect(server)
        secure = trio.SSLStream(stream, client_context(pair), server_hostname="localhost")
        data = bytearray()
        with trio.fail_after(WAIT):
            while piece := await secure.receive_some(65536):
                data += piece
            assert bytes(data) == poem
            # Written after the end, the bytes are the server's to drop; a close
            # now could reset, so it waits for the timeout (we never close).
            await stream.send_all(b"thank you\n")
            assert await stream.receive_some(65536) == b""
        await wait_until_async(lambda: server.clients_lingering == 0)
        await trio.aclose_forcefully(stream)
        assert server.poems_served == 1


async def test_a_quiet_client_that_acknowledges_late_is_closed_at_a_sweep_not_the_send_timeout(pair: Pair) -> None:
    """Not acknowledged when its poem was done, so it lingers; asked again at each sweep, closed once it has all.

    The poem fits the server's send buffer and not the client's small
    window, so the kernel takes it all at once while the client has not
    acknowledged it: the poem is counted, and the connection lingers.
    """
    poem = b"x" * (128 * 1024)
    [listener] = bind("127.0.0.1", 0)
    # Inherited by each client's socket; at least 2 x 212992 even where
    # net.core.wmem_max is Linux's default.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024 * 1024)
    async with serving(poem, pair, [listener], send_timeout=10 * WAIT) as server:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
        with trio.fail_after(WAIT):
            await sock.connect(listener.getsockname())
            stream = trio.SocketStream(sock)
            secure = trio.SSLStream(stream, client_context(pair), server_hostname="localhost")
            await secure.do_handshake()
        await wait_until_async(lambda: server.poems_served == 1)
        assert server.clients_lingering == 1, "the premise: sent, not yet acknowledged"
        data = bytearray()
        with trio.fail_after(WAIT):
            while piece := await secure.receive_some(65536):
                data += piece
        assert bytes(data) == poem
        # Never closed here, nor a close_notify sent back: the server closes.
        await wait_until_async(lambda: server.clients_lingering == 0)
        await trio.aclose_forcefully(stream)


# -- behind a balancer ------------------------------------------------------------------


def _v2_tcp4(client: tuple[str, int]) -> bytes:
    """A v2 PROXY header for a TCP4 ``client`` (the specification's layout)."""
    body = socket.inet_aton(client[0]) + socket.inet_aton("192.0.2.1") + struct.pack("!HH", client[1], 10443)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("how", ["with the ClientHello", "alone first", "in pieces", "v1"])
async def test_the_proxy_protocol_header_comes_first_then_tls(
    how: str, pair: Pair, poetry_log: pytest.LogCaptureFixture
) -> None:
    """HAProxy's order: the header in plain text, then the handshake; PEER= is the client it names."""
    poem = LEDGER.read_bytes()
    header = b"PROXY TCP4 198.51.100.7 192.0.2.1 40123 10443\r\n" if how == "v1" else _v2_tcp4(("198.51.100.7", 40123))
    async with serving(poem, pair, proxy_protocol=True) as server:
        stream = await connect(server)
        with trio.fail_after(WAIT):
            if how == "in pieces":
                await stream.send_all(header[:7])
                await trio.sleep(0.05)
                await stream.send_all(header[7:])
            elif how in ("alone first", "v1"):
                await stream.send_all(header)
                await trio.sleep(0.05)
            else:
                # One segment: the header and the ClientHello after it must
                # be told apart, and not a byte of the hello lost.
                await stream.send_all(header + _client_hello_for(stream, pair))
        data = bytearray()
        with trio.fail_after(WAIT):
            if how == "with the ClientHello":
                data += await _finish_prepared_handshake(stream)
            else:
                secure = trio.SSLStream(stream, client_context(pair), server_hostname="localhost")
                async with secure:
                    while piece := await secure.receive_some(65536):
                        data += piece
        assert bytes(data) == poem
        assert server.headers_refused == 0 and server.poems_served == 1
    [record] = [r for r in poetry_log.records if r.getMessage().startswith("sending ")]
    assert record.PEER == "198.51.100.7:40123"  # type: ignore[attr-defined]


# A handshake driven by hand over memory BIOs, so that the header and the
# ClientHello can go out in one send.
_prepared: dict[int, ssl.SSLObject] = {}
_bios: dict[int, tuple[ssl.MemoryBIO, ssl.MemoryBIO]] = {}


def _client_hello_for(stream: trio.SocketStream, pair: Pair) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(pair).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    _prepared[id(stream)] = client
    _bios[id(stream)] = (incoming, outgoing)
    return outgoing.read()


async def _finish_prepared_handshake(stream: trio.SocketStream) -> bytes:
    client = _prepared.pop(id(stream))
    incoming, outgoing = _bios.pop(id(stream))
    data = bytearray()
    async with stream:
        while True:
            try:
                while piece := client.read(65536):
                    data += piece
                return bytes(data)  # a clean close_notify
            except ssl.SSLWantReadError:
                pass
            if pending := outgoing.read():
                await stream.send_all(pending)
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise AssertionError("the end of the stream came without a close_notify")
            incoming.write(chunk)


async def test_without_a_valid_header_no_handshake_happens(pair: Pair, poetry_log: pytest.LogCaptureFixture) -> None:
    """A ClientHello where the header should be: reset before any TLS byte."""
    poem = LEDGER.read_bytes()
    async with serving(poem, pair, proxy_protocol=True) as server:
        stream = await connect(server)
        async with stream:
            await stream.send_all(_client_hello(pair))
            assert await receive_plain(stream) == (b"", "reset")
        assert server.headers_refused == 1 and server.handshakes_failed == 0


# -- the process: start, reload, rotation ----------------------------------------------


def _served_fingerprint(address: tuple[str, int], pair: Pair) -> tuple[str, bytes]:
    """The SHA-256 of the certificate the server presents, and the poem, read to a close_notify."""
    context = client_context(pair)
    with socket.create_connection(address, timeout=WAIT) as sock:
        with context.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False) as secure:
            der = secure.getpeercert(binary_form=True)
            assert der is not None
            data = bytearray()
            while piece := secure.recv(65536):
                data += piece
    return hashlib.sha256(der).digest().hex(":").upper(), bytes(data)


def _replace(pair: Pair, new: Pair) -> None:
    """Put ``new``'s certificate and key where ``pair``'s are, each file replaced at once."""
    for source, target in ((new.cert, pair.cert), (new.key, pair.key)):
        temporary = target.with_suffix(".new")
        temporary.write_bytes(source.read_bytes())
        os.replace(temporary, target)


def _reload(control: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastpoetry", "reload", "--control", str(control)],
        capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL,
    )


def test_rotation_by_reload_changes_the_certificate_new_clients_see_and_a_bad_pair_keeps_the_old(
    serve_foreground: Callable[..., Server], pair: Pair, tmp_path: Path
) -> None:
    control = tmp_path / "control"
    server = serve_foreground(
        "--poem", str(LEDGER), "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
        "--control", str(control), "--log-level", "debug",
    )
    address = server.address()
    first, poem = _served_fingerprint(address, pair)
    assert first == pair.fingerprint and poem == LEDGER.read_bytes()
    assert f"SHA-256 {first}" in server.log()

    # A new certificate from the same CA: SIGHUP, and new clients see it.
    renewed = make_pair(tmp_path / "renewed", "renewed", pair.ca)
    _replace(pair, renewed)
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(f"SHA-256 {renewed.fingerprint}")
    assert _served_fingerprint(address, pair) == (renewed.fingerprint, poem)

    # A key that does not match: the reload fails, says why, and the pair before stays.
    stranger = make_pair(tmp_path / "stranger", "stranger", pair.ca)
    pair.key.write_bytes(stranger.key.read_bytes())
    result = _reload(control)
    assert result.returncode == 1, result
    assert "does not match the certificate" in result.stderr and str(pair.key) in result.stderr
    assert _served_fingerprint(address, pair) == (renewed.fingerprint, poem)

    # Mended: the reload succeeds.
    pair.key.write_bytes(renewed.key.read_bytes())
    assert _reload(control).returncode == 0
    assert _served_fingerprint(address, pair) == (renewed.fingerprint, poem)

    log = server.log()
    assert not any(line in log + result.stderr for line in pair.key_lines() + stranger.key_lines())
    assert terminate(server) == 0


def test_a_reload_replaces_poems_and_pairs_together_or_not_at_all(
    serve_foreground: Callable[..., Server], pair: Pair, tmp_path: Path
) -> None:
    """A new pair is not served while a poem cannot be read, nor a new poem while a pair cannot."""
    poem_file = tmp_path / "poem.txt"
    poem_file.write_bytes(LEDGER.read_bytes())
    control = tmp_path / "control"
    server = serve_foreground(
        "--poem", str(poem_file), "--tls-cert", str(pair.cert), "--tls-key", str(pair.key), "--control", str(control)
    )
    address = server.address()
    before = pair.fingerprint
    renewed = make_pair(tmp_path / "renewed", "renewed", pair.ca)
    _replace(pair, renewed)
    poem_file.write_bytes(b"")  # not a poem
    assert _reload(control).returncode == 1
    assert _served_fingerprint(address, pair) == (before, LEDGER.read_bytes())
    poem_file.write_bytes(b"A new poem.\n")
    assert _reload(control).returncode == 0
    assert _served_fingerprint(address, pair) == (renewed.fingerprint, b"A new poem.\n")
    assert terminate(server) == 0


@pytest.mark.parametrize("case", ["missing key", "mismatched key", "no certificate"])
def test_a_bad_pair_at_start_is_one_line_naming_the_file_exit_1(
    case: str, pair: Pair, tmp_path: Path, start_server: Callable[..., Server]
) -> None:
    cert, key, expected = _broken_files(tmp_path, pair)[case]
    server = start_server("serve", "--iface", "127.0.0.1", "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key))
    assert server.wait() == 1
    errors = [line for line in server.log().splitlines() if " ERROR: " in line]
    assert len(errors) == 1 and expected in errors[0], server.log()
    assert "Traceback" not in server.log()
    assert not any(line in server.log() for line in pair.key_lines())


def test_workers_serve_over_tls_and_check_the_pair_once_before_forking(
    serve_foreground: Callable[..., Server], start_server: Callable[..., Server], pair: Pair, tmp_path: Path
) -> None:
    server = serve_foreground("--workers", "2", "--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
    address = server.address()
    for _ in range(4):
        assert _served_fingerprint(address, pair)[0] == pair.fingerprint
    assert terminate(server) == 0
    broken = start_server(
        "serve", "--workers", "2", "--iface", "127.0.0.1", "--port", "0",
        "--tls-cert", str(pair.cert), "--tls-key", str(tmp_path / "missing.key"),
    )
    assert broken.wait() == 1
    assert [line for line in broken.log().splitlines() if " ERROR: " in line][0].count("missing.key") == 1


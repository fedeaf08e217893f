"""The benchmark's load generator counts what it is there to count.

``bench/loadgen.c`` is what says "no failed or short fetches" for every
server in the benchmark, so it is checked here on its own, against small
servers that misbehave on purpose: a poem one byte short, one byte long,
a reset halfway, a port nobody listens on, and a server that never ends
the poem.  Each connection must be counted once, under the right reason,
and the exit status must say whether anything failed.  With ``-P`` it
speaks first, as a load balancer does: a PROXY protocol v2 header, which
servers here read and check byte by byte before they send the poem.  With
``-T`` it speaks TLS to small servers built on Python's ``ssl`` (the same
OpenSSL underneath): a whole poem ends with a close_notify, and a stream
that ends without one, a failed handshake, or a server that is not TLS at
all are each a failure under their reason; and no connection resumes an
earlier one's session, even from a server that offers it.

It is built with gcc exactly as ``bench/run`` builds it (warnings are
errors), so a warning in it fails here too.  No figure is judged.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import REPO, WAIT, needs_ipv6, wait_until

POEM = b"A short poem for the load generator\nand its second line.\n"

#: Connections per run, and how many at once.
POEMS = 24
CONCURRENCY = 4

Behaviour = Callable[[socket.socket], None]

#: PROXY protocol v2: the signature, then version 2 with the PROXY command.
PROXY_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_PROXY = 0x21
#: By family: the family-and-transport byte (TCP) and the addresses' length.
PROXY_FAMILIES = {socket.AF_INET: (0x11, 12), socket.AF_INET6: (0x21, 36)}


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bench/loadgen.c`` built as ``bench/run`` builds it."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is missing: tools/test installs it, and bench/run needs it")
    binary = tmp_path_factory.mktemp("loadgen") / "loadgen"
    built = subprocess.run(
        ["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(REPO / "bench" / "loadgen.c"),
         "-lssl", "-lcrypto"],
        check=False, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert built.returncode == 0, f"loadgen.c does not build (libssl-dev: tools/test installs it):\n{built.stderr}"
    return binary


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An ECDSA P-256 certificate and key, self-signed, made as the benchmark makes its own."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing: tools/test installs it, and bench/run needs it")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return cert, key


def serve_whole(conn: socket.socket) -> None:
    conn.sendall(POEM)


def serve_short(conn: socket.socket) -> None:
    conn.sendall(POEM[:-1])


def serve_long(conn: socket.socket) -> None:
    conn.sendall(POEM + b"!")


def serve_half_then_reset(conn: socket.socket) -> None:
    conn.sendall(POEM[: len(POEM) // 2])
    # SO_LINGER on with a zero timeout: close() sends a reset.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def serve_without_end(conn: socket.socket) -> None:
    conn.sendall(POEM)
    # The poem is whole, but no end of stream comes before the client gives up.
    threading.Event().wait(WAIT)


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``conn``, and not one more; fewer if the stream ends first."""
    data = b""
    while len(data) < size and (chunk := conn.recv(size - len(data))):
        data += chunk
    return data


def proxy_header_problem(conn: socket.socket) -> str:
    """Read exactly one PROXY v2 header from ``conn``: what is wrong with it, or "" if nothing.

    Right means what a balancer in front of this server would send for
    this connection: TCP over the connection's family, and the addresses
    and ports as the server sees them: the client's as the source, the
    server's own as the destination.
    """
    head = recv_exactly(conn, 16)
    if len(head) < 16:
        return f"the stream ended after {len(head)} bytes of header: {head!r}"
    if head[:12] != PROXY_SIGNATURE:
        return f"not the PROXY v2 signature: {head[:12]!r}"
    if head[12] != PROXY_V2_PROXY:
        return f"version and command {head[12]:#04x}, not {PROXY_V2_PROXY:#04x}"
    family, length = PROXY_FAMILIES[conn.family]
    if head[13] != family or int.from_bytes(head[14:16], "big") != length:
        return f"family {head[13]:#04x} and length {int.from_bytes(head[14:16], 'big')}, not {family:#04x} and {length}"
    addresses = recv_exactly(conn, length)
    peer, local = conn.getpeername(), conn.getsockname()
    expected = (
        socket.inet_pton(conn.family, peer[0]) + socket.inet_pton(conn.family, local[0])
        + struct.pack("!HH", peer[1], local[1])
    )  # fmt: skip
    if addresses != expected:
        return f"addresses {addresses.hex()}, not {expected.hex()} ({peer} to {local})"
    return ""


def serve_after_the_header(checked: list[str]) -> Behaviour:
    """Read exactly the PROXY v2 header and check it; only if it is right, send the poem.

    ``checked`` gets one entry per connection: "" for a right header, or
    what was wrong (the client then gets no byte).
    """

    def behaviour(conn: socket.socket) -> None:
        problem = proxy_header_problem(conn)
        checked.append(problem)
        if not problem:
            conn.sendall(POEM)

    return behaviour


def serve_before_reading(received: list[bytes]) -> Behaviour:
    """Send the poem at once, end it, and only then read what the client sent, to its end.

    Reading after the end of the poem is what keeps the close from being a
    reset: a socket closed with input unread is reset (RFC 1122,
    4.2.2.13), header or not, which is why fastpoetry lingers the same way.
    ``received`` gets what each client sent.
    """

    def behaviour(conn: socket.socket) -> None:
        conn.sendall(POEM)
        conn.shutdown(socket.SHUT_WR)
        chunks: list[bytes] = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
        received.append(b"".join(chunks))

    return behaviour


@pytest.fixture
def server() -> Iterator[Callable[..., int]]:
    """Start a threaded TCP server on 127.0.0.1 (or ``host``) that treats every client with a behaviour; its port."""
    listeners: list[socket.socket] = []

    def start(behaviour: Behaviour, host: str = "127.0.0.1") -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, 0), family=family, backlog=128)
        listeners.append(listener)

        def handle(conn: socket.socket) -> None:
            with conn:
                try:
                    behaviour(conn)
                except OSError:
                    pass  # the client gave up first

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # closed at the end of the test
                    return
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return listener.getsockname()[1]

    yield start
    for listener in listeners:
        # accept() blocked in another thread returns only on a shutdown.
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()


def run(
    loadgen: Path, port: int, *extra: str, address: str = "127.0.0.1", size: int = len(POEM)
) -> tuple[int, dict[str, str], str]:
    """Run the load generator; its exit status, its KEY=VALUE line, and its standard error."""
    done = subprocess.run(
        [str(loadgen), "-a", address, "-p", str(port), "-b", str(size),
         "-c", str(CONCURRENCY), "-n", str(POEMS), *extra],
        capture_output=True, text=True, timeout=3 * WAIT, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    pairs = dict(field.split("=", 1) for field in done.stdout.split())
    return done.returncode, pairs, done.stderr


REASONS = ("short", "long", "reset", "refused", "ports", "timeout", "error", "handshake", "ragged")


def test_whole_poems_are_counted_and_nothing_fails(loadgen: Path, server: Callable[..., int]) -> None:
    status, result, stderr = run(loadgen, server(serve_whole))
    assert status == 0, stderr
    assert result["poems"] == str(POEMS) and result["failures"] == "0", result
    assert all(result[reason] == "0" for reason in REASONS), result
    assert int(result["bytes"]) == POEMS * len(POEM), result


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [(serve_short, "short"), (serve_long, "long"), (serve_half_then_reset, "reset")],
    ids=["short", "long", "reset"],
)
def test_every_bad_fetch_is_a_failure_under_its_reason(
    loadgen: Path, server: Callable[..., int], behaviour: Behaviour, reason: str
) -> None:
    status, result, stderr = run(loadgen, server(behaviour))
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["failures"] == str(POEMS), result
    assert result[reason] == str(POEMS), result
    assert reason in stderr, stderr  # the first failures are described


@pytest.mark.parametrize("extra", [(), ("-P",), ("-T",)], ids=["plain", "proxy-header", "tls"])
def test_a_port_nobody_listens_on_is_refused(loadgen: Path, extra: tuple[str, ...]) -> None:
    # With -P the refusal shows in the header's send(), with -T in the
    # ClientHello's: still "refused".
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    status, result, stderr = run(loadgen, port, *extra)
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["refused"] == str(POEMS), result


def test_a_poem_that_never_ends_is_a_timeout(loadgen: Path, server: Callable[..., int]) -> None:
    status, result, stderr = run(loadgen, server(serve_without_end), "-t", "0.5")
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["timeout"] == str(POEMS), result


# --------------------------------------------------------------------------
# -P: a PROXY protocol v2 header before reading, as from a load balancer.


@pytest.mark.parametrize(
    ("host", "extra"),
    [("127.0.0.1", ()), ("127.0.0.1", ("-s", "3")), pytest.param("::1", (), marks=needs_ipv6)],
    ids=["ipv4", "ipv4-three-sources", "ipv6"],
)
def test_each_connection_sends_a_true_proxy_v2_header_before_it_reads(
    loadgen: Path, server: Callable[..., int], host: str, extra: tuple[str, ...]
) -> None:
    checked: list[str] = []
    status, result, stderr = run(loadgen, server(serve_after_the_header(checked), host), "-P", *extra, address=host)
    assert [problem for problem in checked if problem] == [], stderr
    assert len(checked) == POEMS, checked  # every connection sent one
    assert status == 0, stderr
    assert result["poems"] == str(POEMS) and result["failures"] == "0", result
    assert int(result["bytes"]) == POEMS * len(POEM), result


def test_first_byte_mode_sends_the_header_too(loadgen: Path, server: Callable[..., int]) -> None:
    checked: list[str] = []
    port = server(serve_after_the_header(checked))
    done = subprocess.run(
        [str(loadgen), "-1", "-P", "-a", "127.0.0.1", "-p", str(port), "-b", str(len(POEM))],
        capture_output=True, text=True, timeout=3 * WAIT, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    result = dict(field.split("=", 1) for field in done.stdout.split())
    assert checked == [""], checked
    assert done.returncode == 0 and result["ok"] == "1", f"{result}\n{done.stderr}"
    assert result["bytes"] == str(len(POEM)), result


def test_a_server_that_answers_before_reading_still_serves_whole_poems(
    loadgen: Path, server: Callable[..., int]
) -> None:
    """The header is input like any other: a server that does not wait for it is not hurt by it."""
    received: list[bytes] = []
    status, result, stderr = run(loadgen, server(serve_before_reading(received)), "-P")
    assert status == 0, f"{result}\n{stderr}"
    assert result["poems"] == str(POEMS) and result["failures"] == "0", result
    # Each handler reads the client's bytes after the poem, to the client's
    # close: the last ones may still be reading when loadgen has exited.
    wait_until(lambda: len(received) == POEMS, f"the server has read what all {POEMS} clients sent")
    # What each client sent was its header and nothing else: 16 bytes, then two IPv4 addresses and ports.
    assert all(len(got) == 16 + 12 and got.startswith(PROXY_SIGNATURE) for got in received), received


def _syn_sent_to(port: int) -> bool:
    """Whether a TCP socket of this network namespace is in SYN_SENT towards ``port`` (/proc/net/tcp)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    # Fields: sl, local address, remote address (HEX_IP:HEX_PORT), state (02: SYN_SENT), ...
    return any(f[2].endswith(f":{port:04X}") and f[3] == "02" for f in (line.split() for line in lines))


def test_a_connection_still_connecting_sends_its_header_once_connected(loadgen: Path) -> None:
    """connect() returns before the handshake, the header waits for it, and still goes before any read.

    On loopback the handshake is over when connect() returns; a full
    accept queue makes it wait: the listener drops the SYN, and the
    client's kernel sends it again about a second later.
    """
    # A backlog of 1 holds two connections: the two fillers take them.
    with socket.create_server(("127.0.0.1", 0), backlog=1) as listener:
        listener.settimeout(WAIT)
        port = listener.getsockname()[1]
        fillers = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(2)]
        process = subprocess.Popen(
            [str(loadgen), "-P", "-a", "127.0.0.1", "-p", str(port), "-b", str(len(POEM)), "-c", "1", "-n", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_until(lambda: _syn_sent_to(port), "the load generator's connection waiting in SYN_SENT")
            for filler in fillers:  # room in the queue for the SYN sent again
                listener.accept()[0].close()
                filler.close()
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(WAIT)
                problem = proxy_header_problem(conn)
                if not problem:
                    conn.sendall(POEM)
            stdout, stderr = process.communicate(timeout=3 * WAIT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert problem == "", problem
    result = dict(field.split("=", 1) for field in stdout.split())
    assert process.returncode == 0, f"{result}\n{stderr}"
    assert result["poems"] == "1" and result["failures"] == "0", result


# --------------------------------------------------------------------------
# -T: TLS, a full handshake for every connection, the poem to the close_notify.

TlsBehaviour = Callable[[ssl.SSLSocket], None]


def tls_whole(tls: ssl.SSLSocket) -> None:
    tls.sendall(POEM)
    tls.unwrap()  # the close_notify (then it waits for the client's, which closes instead)


def tls_short(tls: ssl.SSLSocket) -> None:
    tls.sendall(POEM[:-1])
    tls.unwrap()


def tls_long(tls: ssl.SSLSocket) -> None:
    tls.sendall(POEM + b"!")
    tls.unwrap()


def tls_ragged(tls: ssl.SSLSocket) -> None:
    # The whole poem, then the socket closed under TLS: no close_notify, so
    # the client cannot tell this end from a cut.
    tls.sendall(POEM)


@pytest.fixture
def tls_server(server: Callable[..., int], certificate: tuple[Path, Path]) -> Callable[..., int]:
    """Start a threaded TLS server on 127.0.0.1 that treats every client with a behaviour; its port.

    It keeps sessions and issues tickets (Python's defaults: a session
    cache, two TLS 1.3 tickets a handshake), so that a client that tried
    to resume a session could.  ``handshakes`` gets, for each connection
    whose handshake finished, the version and whether its session was
    resumed.  ``minimum``: the lowest TLS version it takes.
    """

    def start(
        behaviour: TlsBehaviour, *, handshakes: list[tuple[str | None, bool]] | None = None,
        minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    ) -> int:  # fmt: skip
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certificate)
        context.minimum_version = minimum

        def over_tls(conn: socket.socket) -> None:
            with context.wrap_socket(conn, server_side=True) as tls:  # the handshake, here
                if handshakes is not None:
                    handshakes.append((tls.version(), tls.session_reused))
                behaviour(tls)

        return server(over_tls)

    return start


@pytest.mark.parametrize(("extra", "version"), [((), "TLSv1.3"), (("-V", "1.2"), "TLSv1.2")], ids=["tls1.3", "tls1.2"])
def test_over_tls_whole_poems_are_counted_and_no_session_is_resumed(
    loadgen: Path, tls_server: Callable[..., int], extra: tuple[str, ...], version: str
) -> None:
    handshakes: list[tuple[str | None, bool]] = []
    status, result, stderr = run(loadgen, tls_server(tls_whole, handshakes=handshakes), "-T", *extra)
    assert status == 0, f"{result}\n{stderr}"
    assert result["poems"] == str(POEMS) and result["failures"] == "0", result
    assert all(result[reason] == "0" for reason in REASONS), result
    assert int(result["bytes"]) == POEMS * len(POEM), result  # the poem's bytes, not TLS's
    # Each poem is a connection and a full handshake of the version asked for.
    assert handshakes == [(version, False)] * POEMS, handshakes


def test_over_tls_a_poem_of_many_records_is_read_whole(loadgen: Path, tls_server: Callable[..., int]) -> None:
    """A poem of 64 TLS records and more: read across events, nothing left in OpenSSL's buffers."""
    big = bytes(range(256)) * 4096 + b"end\n"  # 1 MiB and 4 bytes

    def whole_big(tls: ssl.SSLSocket) -> None:
        tls.sendall(big)
        tls.unwrap()

    status, result, stderr = run(loadgen, tls_server(whole_big), "-T", size=len(big))
    assert status == 0, f"{result}\n{stderr}"
    assert result["poems"] == str(POEMS) and int(result["bytes"]) == POEMS * len(big), result


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [(tls_short, "short"), (tls_long, "long"), (tls_ragged, "ragged")],
    ids=["short", "long", "no-close-notify"],
)
def test_over_tls_every_bad_fetch_is_a_failure_under_its_reason(
    loadgen: Path, tls_server: Callable[..., int], behaviour: TlsBehaviour, reason: str
) -> None:
    status, result, stderr = run(loadgen, tls_server(behaviour), "-T")
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["failures"] == str(POEMS), result
    assert result[reason] == str(POEMS), result
    assert f"({reason})" in stderr, stderr  # the first failures are described


def test_over_tls_a_failed_handshake_is_a_failure(loadgen: Path, tls_server: Callable[..., int]) -> None:
    """A server that takes TLS 1.3 only, a client that offers 1.2 only: an alert, and no poem."""
    port = tls_server(tls_whole, minimum=ssl.TLSVersion.TLSv1_3)
    status, result, stderr = run(loadgen, port, "-T", "-V", "1.2")
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["handshake"] == str(POEMS) == result["failures"], result
    assert "TLS handshake failed" in stderr, stderr


def test_over_tls_a_server_that_is_not_tls_is_a_failed_handshake(loadgen: Path, server: Callable[..., int]) -> None:
    """A plain poem where the ServerHello should be: the handshake fails on its first bytes."""

    def plain_poem_after_the_client_hello(conn: socket.socket) -> None:
        conn.recv(4096)  # the ClientHello, or its start
        conn.sendall(POEM)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):  # until the client closes: no reset for unread bytes
            pass

    status, result, stderr = run(loadgen, server(plain_poem_after_the_client_hello), "-T")
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["handshake"] == str(POEMS) == result["failures"], result


def test_over_tls_a_handshake_that_never_comes_is_a_timeout(loadgen: Path, server: Callable[..., int]) -> None:
    def silent(conn: socket.socket) -> None:
        threading.Event().wait(WAIT)

    status, result, stderr = run(loadgen, server(silent), "-T", "-t", "0.5")
    assert status == 1, f"{result}\n{stderr}"
    assert result["poems"] == "0" and result["timeout"] == str(POEMS), result


@pytest.mark.parametrize(
    "options", [("-T", "-1"), ("-T", "-P"), ("-V", "1.3"), ("-T", "-V", "1.1")],
    ids=["first-byte", "with-proxy-header", "version-without-tls", "no-such-version"],
)  # fmt: skip
def test_tls_options_that_do_not_go_together_are_a_usage_error(loadgen: Path, options: tuple[str, ...]) -> None:
    done = subprocess.run(
        [str(loadgen), "-p", "9", "-b", "1", "-n", "1", *options],
        capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "usage:" in done.stderr, done

"""The benchmark's load generator counts what it is there to count.

``bench/loadgen.c`` is what says "no failed or short fetches" for every
server in the benchmark, so it is checked here on its own, against small
servers that misbehave on purpose: a poem one byte short, one byte long,
a reset halfway, a port nobody listens on, and a server that never ends
the poem.  Each connection must be counted once, under the right reason,
and the exit status must say whether anything failed.  With ``-P`` it
speaks first, as a load balancer does: a PROXY protocol v2 header, which
servers here read and check byte by byte before they send the poem.

It is built with gcc exactly as ``bench/run`` builds it (warnings are
errors), so a warning in it fails here too.  No figure is judged.
"""

from __future__ import annotations

import shutil
import socket
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
    subprocess.run(
        ["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(REPO / "bench" / "loadgen.c")],
        check=True, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    return binary


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


def run(loadgen: Path, port: int, *extra: str, address: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
    """Run the load generator; its exit status, its KEY=VALUE line, and its standard error."""
    done = subprocess.run(
        [str(loadgen), "-a", address, "-p", str(port), "-b", str(len(POEM)),
         "-c", str(CONCURRENCY), "-n", str(POEMS), *extra],
        capture_output=True, text=True, timeout=3 * WAIT, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    pairs = dict(field.split("=", 1) for field in done.stdout.split())
    return done.returncode, pairs, done.stderr


REASONS = ("short", "long", "reset", "refused", "ports", "timeout", "error")


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


@pytest.mark.parametrize("extra", [(), ("-P",)], ids=["plain", "proxy-header"])
def test_a_port_nobody_listens_on_is_refused(loadgen: Path, extra: tuple[str, ...]) -> None:
    # With -P the refusal shows in the header's send(): still "refused".
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

"""``fastpoetry get``, run as a real process against real servers.

The well-behaved servers are ``fastpoetry serve`` processes; the hostile
and the choreographed ones are small servers written here, each handling
its connections in a thread of the test.  Nothing below depends on how
fast anything is: a server that must be slow waits for an event that the
test, or another server, sets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pty
import re
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import (
    DEFAULT_POEM,
    POEMS,
    WAIT,
    NoLocalhost,
    Pair,
    Server,
    clean_env,
    listening_socket,
    make_pair,
    make_poem,
    needs_ipv6,
)
from fastpoetry.client import PROGRESS_INTERVAL

GET = [sys.executable, "-m", "fastpoetry", "get"]

LANTERN = POEMS / "lantern.txt"
LEDGER = POEMS / "harbour-ledger.txt"
WINTER = POEMS / "long-winter.txt"

ServeForeground = Callable[..., Server]
Handler = Callable[[socket.socket], None]


def get(*args: str, **popen: object) -> subprocess.CompletedProcess[bytes]:
    """Run ``fastpoetry get ARGS`` to completion (WAIT is a hang guard)."""
    options: dict[str, object] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    options.update(popen)
    return subprocess.run(  # type: ignore[call-overload]
        [*GET, *args],
        check=False,
        stdin=subprocess.DEVNULL,
        env=clean_env(),
        timeout=WAIT,
        **options,
    )


def start_get(*args: str, **popen: object) -> subprocess.Popen[bytes]:
    """Start ``fastpoetry get ARGS``; the caller waits for it."""
    options: dict[str, object] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    options.update(popen)
    return subprocess.Popen(  # type: ignore[call-overload]
        [*GET, *args], stdin=subprocess.DEVNULL, env=clean_env(), **options
    )


def address(server: Server) -> str:
    host, port = server.address()
    return f"{host}:{port}"


def error_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    return result.stderr.decode().splitlines()


# -- servers written for the tests -------------------------------------------------


class FakeServer:
    """A listening socket whose connections ``handler`` serves, each in a thread."""

    def __init__(self, handler: Handler, family: int = socket.AF_INET) -> None:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.listener = listening_socket(family, (host, 0))
        port = self.listener.getsockname()[1]
        self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self.handler = handler
        #: Set once a connection has been accepted.
        self.accepted = threading.Event()
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # shut down by close()
                return
            self.accepted.set()
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(WAIT)
            try:
                self.handler(conn)
            except Exception as exc:  # raised again at teardown
                self.errors.append(exc)

    def close(self) -> None:
        # shutdown() wakes a thread blocked in accept(); close() would not.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for thread in self._threads:
            thread.join(WAIT)
        assert not self.errors, self.errors


#: The fake_server fixture: FakeServer(handler, family), closed at teardown.
StartFake = Callable[..., FakeServer]


@pytest.fixture
def fake_server() -> Iterator[StartFake]:
    """Start FakeServer(handler); all are closed, and must have raised nothing, at teardown."""
    servers: list[FakeServer] = []

    def start(handler: Handler, family: int = socket.AF_INET) -> FakeServer:
        servers.append(FakeServer(handler, family))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def wait_for_close(conn: socket.socket) -> None:
    """Wait until the client has closed its end (it sends nothing before that)."""
    try:
        while conn.recv(65536):
            pass
    except ConnectionResetError:  # a client closing with our bytes unread
        pass


def sends(poem: bytes, after: threading.Event | None = None) -> Handler:
    """A poetry server, which waits for ``after`` first if given."""

    def handle(conn: socket.socket) -> None:
        if after is not None:
            assert after.wait(WAIT), "the event this server waits for never came"
        conn.sendall(poem)

    return handle


def sends_part(part: bytes, then: Callable[[socket.socket], None]) -> Handler:
    """Sends ``part`` of a poem, then does ``then``."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(part)
        then(conn)

    return handle


#: More than the socket buffers of both ends hold, however large the kernel
#: makes them: once a server has sent it all, its client has been reading,
#: so a reset that follows comes part-way through the poem, never before
#: the client has even finished connecting.
MORE_THAN_BUFFERS = 32 * 1024 * 1024


def reset(conn: socket.socket) -> None:
    """Abandon the poem: with SO_LINGER {1, 0}, close() sends a reset."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def readable(fd: int, deadline: float) -> bool:
    """Wait until ``fd`` can be read, or time.monotonic() reaches ``deadline``."""
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    return bool(ready)


def read_exactly(fd: int, count: int) -> bytes:
    """Read ``count`` bytes from a pipe, failing after WAIT."""
    data = b""
    deadline = time.monotonic() + WAIT
    while len(data) < count:
        assert readable(fd, deadline), f"{len(data)} of {count} bytes in {WAIT} s: {data[-200:]!r}"
        chunk = os.read(fd, count - len(data))
        assert chunk, f"end of output after {len(data)} of {count} bytes"
        data += chunk
    return data


def loopback_sockets(keep: list[socket.socket]) -> tuple[socket.socket, socket.socket | None]:
    """Sockets bound to one port on 127.0.0.1 and on ::1 (None without IPv6), kept in ``keep``.

    Bound but not listening: nobody else takes the port meanwhile, and a
    connection to it is refused until the test listens.
    """
    for _ in range(100):
        keep.append(ipv4 := socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        ipv4.bind(("127.0.0.1", 0))
        try:
            keep.append(ipv6 := socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
            ipv6.bind(("::1", ipv4.getsockname()[1]))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return ipv4, None  # this host has no IPv6 loopback
            continue  # taken on ::1: try another port
        return ipv4, ipv6
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


def serve_once(sock: socket.socket, poem: bytes) -> threading.Thread:
    """Listen on the bound ``sock`` and send ``poem`` to its first client, from a thread."""
    sock.listen()
    sock.settimeout(WAIT)

    def serve() -> None:
        conn, _ = sock.accept()
        with conn:
            conn.sendall(poem)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


# -- poems on standard output ------------------------------------------------------


def test_one_poem_is_written_byte_for_byte(serve_foreground: ServeForeground) -> None:
    """With one address, standard output is the poem exactly; exit 0, stderr silent."""
    result = get(address(serve_foreground("--poem", str(LANTERN))))
    assert result.returncode == 0, result
    assert result.stdout == LANTERN.read_bytes()
    assert result.stderr == b""


def test_a_port_alone_means_the_loopback_addresses(serve_foreground: ServeForeground) -> None:
    """``get PORT`` fetches from PORT on this host, as the tutorial's client did."""
    _, port = serve_foreground("--poem", str(LEDGER)).address()
    result = get(str(port))
    assert result.returncode == 0, result
    assert result.stdout == LEDGER.read_bytes()


def test_a_port_alone_is_fetched_where_localhost_resolves_to_nothing(
    no_localhost: Callable[..., NoLocalhost], start_server: Callable[..., Server]
) -> None:
    """``get PORT`` and ``get localhost:PORT`` connect to 127.0.0.1 and ::1 with no lookup.

    Where nothing resolves the name (a root without /etc/hosts, as
    debootstrap's minbase makes), a lookup would fail every fetch.
    """
    namespaces = no_localhost()
    server = start_server("serve", command=namespaces.command(sys.executable, "-m", "fastpoetry"))
    server.wait_ready()
    for address in ("10000", "localhost:10000"):
        result = namespaces.run(*GET, address)
        assert result.returncode == 0, result
        assert result.stdout == DEFAULT_POEM.read_bytes()
        assert result.stderr == b""


def test_a_port_alone_where_nothing_listens_names_both_addresses(
    no_localhost: Callable[..., NoLocalhost],
) -> None:
    """The error line says what was tried: the port on 127.0.0.1 and on ::1."""
    result = no_localhost().run(*GET, "10000")
    assert result.returncode == 1, result
    assert error_lines(result) == [
        "fastpoetry get: 127.0.0.1:10000 and [::1]:10000: connection refused"
    ]


def test_a_port_alone_says_which_address_failed_how_when_they_differ(
    no_localhost: Callable[..., NoLocalhost],
) -> None:
    """With IPv6 disabled, each address's own reason is named in the one line."""
    result = no_localhost(ipv6=False).run(*GET, "10000")
    assert result.returncode == 1, result
    [line] = error_lines(result)
    prefix = "fastpoetry get: 127.0.0.1:10000 and [::1]:10000: connection refused on 127.0.0.1; "
    assert line.startswith(prefix) and line.endswith(" on ::1"), line


@needs_ipv6
def test_a_port_alone_reaches_a_server_on_ipv6_loopback_only(keep: list[socket.socket]) -> None:
    """Refused on 127.0.0.1, ``get PORT`` goes on to ::1."""
    ipv4, ipv6 = loopback_sockets(keep)
    assert ipv6 is not None
    server = serve_once(ipv6, b"a poem on ::1 alone\n")
    result = get(str(ipv4.getsockname()[1]))
    assert result.returncode == 0, result
    assert result.stdout == b"a poem on ::1 alone\n"
    server.join(WAIT)


@needs_ipv6
def test_a_port_alone_does_not_wait_for_an_ipv4_loopback_that_never_answers(
    keep: list[socket.socket],
) -> None:
    """127.0.0.1 silent (its queue full), ::1 serving: the poem comes from ::1 (happy eyeballs).

    Trying the addresses one after the other would wait on 127.0.0.1 until
    the timeout, and fail.
    """
    ipv4, ipv6 = loopback_sockets(keep)
    assert ipv6 is not None
    # A listener that never accepts, with its queue full: the handshake is
    # not answered, so connecting to it never ends (as in _never_accepts).
    ipv4.listen(0)
    keep.append(socket.create_connection(ipv4.getsockname(), timeout=WAIT))
    server = serve_once(ipv6, b"a poem while 127.0.0.1 is silent\n")
    result = get("--timeout", str(WAIT), str(ipv4.getsockname()[1]))
    assert result.returncode == 0, result
    assert result.stdout == b"a poem while 127.0.0.1 is silent\n"
    server.join(WAIT)


@needs_ipv6
def test_an_ipv6_address_is_given_in_brackets(fake_server: StartFake) -> None:
    """``[::1]:PORT`` connects over IPv6."""
    server = fake_server(sends(b"a poem over IPv6\n"), socket.AF_INET6)
    assert server.address.startswith("[::1]:")
    result = get(server.address)
    assert result.returncode == 0, result
    assert result.stdout == b"a poem over IPv6\n"


def test_big_poems_arrive_whole_and_in_order(
    serve_foreground: ServeForeground, tmp_path: Path
) -> None:
    """Poems of megabytes from several servers at once are written byte for byte."""
    first = make_poem(tmp_path / "first.txt", 5 * 1024 * 1024, seed="first")
    second = make_poem(tmp_path / "second.txt", 5 * 1024 * 1024 + 17, seed="second")
    servers = [
        serve_foreground("--poem", str(tmp_path / "first.txt")),
        serve_foreground("--poem", str(LANTERN)),
        serve_foreground("--poem", str(tmp_path / "second.txt")),
    ]
    result = get(*map(address, servers))
    assert result.returncode == 0, result.stderr
    assert result.stdout == first + LANTERN.read_bytes() + second
    assert result.stderr == b""


def test_poems_come_in_the_order_given_even_when_the_first_is_slowest(
    fake_server: StartFake, serve_foreground: ServeForeground
) -> None:
    """Output follows the command line, not the order in which poems arrive."""
    second_served = threading.Event()

    def second(conn: socket.socket) -> None:
        conn.sendall(b"second\n")
        conn.shutdown(socket.SHUT_WR)  # the end of the poem
        wait_for_close(conn)  # the client has all of it
        second_served.set()

    slowest = fake_server(sends(b"first\n", after=second_served))
    fast = fake_server(second)
    real = serve_foreground("--poem", str(LANTERN))
    result = get(slowest.address, fast.address, address(real))
    assert result.returncode == 0, result
    assert result.stdout == b"first\nsecond\n" + LANTERN.read_bytes()


def test_a_poem_is_written_as_soon_as_those_before_it_are_done(
    fake_server: StartFake, serve_foreground: ServeForeground
) -> None:
    """The first poem is on stdout while the second server still holds its poem back."""
    released = threading.Event()
    first = serve_foreground("--poem", str(LEDGER))
    second = fake_server(sends(b"second\n", after=released))
    client = start_get(address(first), second.address)
    try:
        assert client.stdout is not None
        # A client that waited for every poem before writing any would hang
        # here, until its own timeout failed the second server.
        assert read_exactly(client.stdout.fileno(), len(LEDGER.read_bytes())) == LEDGER.read_bytes()
        released.set()
        rest, errors = client.communicate(timeout=WAIT)
    finally:
        released.set()
        client.kill()
        client.wait(WAIT)
    assert client.returncode == 0, errors
    assert rest == b"second\n"


def test_every_server_is_contacted_at_once(fake_server: StartFake) -> None:
    """Two servers that each send only once the other has a client: both poems come."""
    both_connected = threading.Barrier(2, timeout=WAIT)

    def meets_the_other(poem: bytes) -> Handler:
        def handle(conn: socket.socket) -> None:
            # A client that fetched one poem after the other would never
            # connect to the second server while the first waits here.
            try:
                both_connected.wait()
            except threading.BrokenBarrierError:
                return
            conn.sendall(poem)

        return handle

    one = fake_server(meets_the_other(b"one\n"))
    two = fake_server(meets_the_other(b"two\n"))
    result = get(one.address, two.address)
    assert result.returncode == 0, result
    assert result.stdout == b"one\ntwo\n"


SEPARATORS = {
    "one poem without a newline: exactly its bytes": ([b"no newline"], b"no newline"),
    "a newline between, only where missing": (
        [b"first", b"second\n", b"third"],
        b"first\nsecond\nthird",
    ),
    "no blank lines added": ([b"one\n", b"two\n\n", b"three\n"], b"one\ntwo\n\nthree\n"),
    "a poem of newlines": ([b"\n", b"after\n"], b"\nafter\n"),
}


@pytest.mark.parametrize("poems, output", SEPARATORS.values(), ids=SEPARATORS.keys())
def test_a_newline_separates_poems_only_where_one_is_missing(
    fake_server: StartFake, poems: list[bytes], output: bytes
) -> None:
    """Poems are written as received; between two, a newline if the first lacks one."""
    servers = [fake_server(sends(poem)) for poem in poems]
    result = get(*(server.address for server in servers))
    assert result.returncode == 0, result
    assert result.stdout == output


def test_the_separator_skips_a_failed_server(fake_server: StartFake) -> None:
    """The newline goes between the poems that are written, whatever failed between them."""
    servers = [
        fake_server(sends(b"first")),
        fake_server(sends_part(b"PARTIAL", then=reset)),
        fake_server(sends(b"third")),
    ]
    result = get(*(server.address for server in servers))
    assert result.returncode == 1, result
    assert result.stdout == b"first\nthird"


# -- failures ------------------------------------------------------------------------


#: What a failure case gives the test: the argument, the server's name in
#: the error line, and how the reason starts.
Failure = tuple[str, str, str]


def _refused(fake_server: StartFake, keep: list[socket.socket]) -> Failure:
    # Bound but not listening: nobody takes the port meanwhile, and a
    # connection to it is refused.
    keep.append(sock := socket.socket())
    sock.bind(("127.0.0.1", 0))
    name = f"127.0.0.1:{sock.getsockname()[1]}"
    return name, name, "connection refused"


def _refused_on_loopback(fake_server: StartFake, keep: list[socket.socket]) -> Failure:
    # A port alone is tried on both loopback addresses, and both are named.
    # (Without IPv6 the reasons differ, and name their addresses.)
    ipv4, _ = loopback_sockets(keep)
    port = ipv4.getsockname()[1]
    return str(port), f"127.0.0.1:{port} and [::1]:{port}", "connection refused"


def _unresolvable(fake_server: StartFake, keep: list[socket.socket]) -> Failure:
    # .invalid never resolves (RFC 6761).
    return "nothing.invalid:1", "nothing.invalid:1", "cannot resolve the host name ("


def _never_sends(fake_server: StartFake, keep: list[socket.socket]) -> Failure:
    server = fake_server(wait_for_close)
    return server.address, server.address, "timed out after 1 s (0 bytes received)"


def _stalls_part_way(fake_server: StartFake, keep: list[socket.socket]) -> Failure:
    server = fake_server(sends_part(b"PARTIAL " * 125, then=wait_for_close))
    return server.address, server.address, "timed out after 1 s ("


def _resets_part_way(fake_server: StartFake, keep: list[socket.socket]) -> Failure:
    server = fake_server(sends_part(b"PARTIAL " * (MORE_THAN_BUFFERS // 8), then=reset))
    return server.address, server.address, "connection reset after "


def _closes_without_a_poem(fake_server: StartFake, keep: list[socket.socket]) -> Failure:
    server = fake_server(lambda conn: None)
    return server.address, server.address, "the connection was closed without a poem"


def _never_accepts(fake_server: StartFake, keep: list[socket.socket]) -> Failure:
    # A listener that never accepts, with its queue full: the handshake is
    # not answered, so connecting never ends.
    keep.append(listener := listening_socket(backlog=0))
    keep.append(socket.create_connection(listener.getsockname(), timeout=WAIT))
    host, port = listener.getsockname()
    return f"{host}:{port}", f"{host}:{port}", "timed out after 1 s while connecting"


def _never_accepts_on_loopback(fake_server: StartFake, keep: list[socket.socket]) -> Failure:
    # The same, on both addresses a port alone stands for: the attempts
    # racing each other are all given up at the timeout.
    ipv4, ipv6 = loopback_sockets(keep)
    for sock in (ipv4, ipv6):
        if sock is not None:
            sock.listen(0)
            keep.append(socket.create_connection(sock.getsockname()[:2], timeout=WAIT))
    port = ipv4.getsockname()[1]
    return str(port), f"127.0.0.1:{port} and [::1]:{port}", "timed out after 1 s while connecting"


FAILURES = {
    "refused": _refused,
    "refused, a port alone": _refused_on_loopback,
    "unresolvable": _unresolvable,
    "never sends": _never_sends,
    "stalls part-way": _stalls_part_way,
    "resets part-way": _resets_part_way,
    "closes without a poem": _closes_without_a_poem,
    "never accepts": _never_accepts,
    "never accepts, a port alone": _never_accepts_on_loopback,
}


@pytest.fixture
def keep() -> Iterator[list[socket.socket]]:
    """Sockets a test needs until its end, closed then."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


@pytest.mark.parametrize("make", FAILURES.values(), ids=FAILURES.keys())
def test_a_failed_server_is_one_line_and_exit_1(
    fake_server: StartFake,
    serve_foreground: ServeForeground,
    keep: list[socket.socket],
    make: Callable[[StartFake, list[socket.socket]], Failure],
) -> None:
    """A failure is one line naming the server and why; the other poems still come."""
    bad, name, reason = make(fake_server, keep)
    good = serve_foreground("--poem", str(LANTERN))
    # The cap above the resetting server's 32 MiB: it is the reset that counts here.
    result = get("--timeout", "1", "--max-poem-size", "64M", bad, address(good))
    assert result.returncode == 1, result
    # None of the failed server's bytes, and every byte of the good poem.
    assert result.stdout == LANTERN.read_bytes()
    [line] = error_lines(result)
    assert line.startswith(f"fastpoetry get: {name}: {reason}"), line


def only_failure(result: subprocess.CompletedProcess[bytes], server: FakeServer, reason: str) -> int:
    """Assert ``result`` is the one failure of ``server`` for ``reason``; return its count."""
    assert result.returncode == 1, result
    assert result.stdout == b""
    [line] = error_lines(result)
    match = re.fullmatch(rf"fastpoetry get: {re.escape(server.address)}: {reason}", line)
    assert match, line
    return int(match.group(1))


def test_the_reset_message_counts_what_arrived(fake_server: StartFake) -> None:
    """A reset part-way says how many bytes came, and that the poem is incomplete."""
    server = fake_server(sends_part(b"x" * MORE_THAN_BUFFERS, then=reset))
    result = get("--max-poem-size", "64M", server.address)
    received = only_failure(result, server, r"connection reset after (\d+) bytes? \(the poem is incomplete\)")
    assert 0 < received <= MORE_THAN_BUFFERS


def test_a_timeout_says_how_much_arrived(fake_server: StartFake) -> None:
    """A server too slow to finish: the line gives the timeout and the bytes received."""
    server = fake_server(sends_part(b"x" * 1000, then=wait_for_close))
    result = get("--timeout", "1.5", server.address)
    received = only_failure(result, server, r"timed out after 1\.5 s \((\d+) bytes? received\)")
    assert received <= 1000


def test_each_failure_has_its_line_in_the_order_given(
    fake_server: StartFake,
    serve_foreground: ServeForeground,
    keep: list[socket.socket],
) -> None:
    """Several failures: one line each, in command-line order; the good poems in theirs."""
    refused, _, _ = _refused(fake_server, keep)
    resets = fake_server(sends_part(b"PARTIAL", then=reset))
    servers = [serve_foreground("--poem", str(path)) for path in (LANTERN, LEDGER)]
    result = get(
        refused, address(servers[0]), "nothing.invalid:1", resets.address, address(servers[1])
    )
    assert result.returncode == 1, result
    assert result.stdout == LANTERN.read_bytes() + LEDGER.read_bytes()
    lines = error_lines(result)
    assert [line.split(": ")[1] for line in lines] == [refused, "nothing.invalid:1", resets.address]
    assert all(line.startswith("fastpoetry get: ") for line in lines), lines


# -- the command line ----------------------------------------------------------------


def test_help_documents_the_options_and_exit_status() -> None:
    """``get --help`` exits 0 and describes --timeout, the address forms and exit status."""
    result = get("--help")
    assert result.returncode == 0, result
    text = result.stdout.decode()
    assert re.search(r"^\s+--timeout SECONDS\b", text, re.MULTILINE), text
    assert "[IPV6-ADDRESS]:PORT" in text
    assert "Exit status" in text


BAD_ADDRESSES = {
    "no port": ("poetry.example", ["'poetry.example'", "HOST:PORT"]),
    "empty port": ("localhost:", ["'localhost:'", "not a port number"]),
    "empty host": (":10000", ["':10000'", "no host"]),
    "port 0": ("localhost:0", ["'localhost:0'", "'0'", "1 to 65535"]),
    "port 65536": ("65536", ["'65536'", "1 to 65535"]),
    "port abc": ("localhost:abc", ["'localhost:abc'", "'abc'"]),
    "IPv6 without brackets": ("::1:10000", ["'::1:10000'", "brackets"]),
    "brackets, no port": ("[::1]", ["'[::1]'"]),
    "brackets, no colon": ("[::1]10000", ["'[::1]10000'"]),
    "not IPv6 in brackets": ("[localhost]:10000", ["'localhost'", "not an IPv6 address"]),
    "space in host": ("a host:10000", ["'a host'", "not a host name"]),
    "empty": ("", ["''"]),
}


@pytest.mark.parametrize("bad, words", BAD_ADDRESSES.values(), ids=BAD_ADDRESSES.keys())
def test_a_bad_address_is_a_usage_error_before_any_connection(bad: str, words: list[str]) -> None:
    """A malformed address: exit 2, one line naming it, and no server contacted."""
    with listening_socket() as listener:
        host, port = listener.getsockname()
        result = get(f"{host}:{port}", bad)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.returncode == 2, result
    assert result.stdout == b""
    [line] = error_lines(result)
    assert line.startswith("fastpoetry get: error: argument ADDRESS: "), line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


USAGE_ERRORS = {
    "no address": ([], ["ADDRESS"]),
    "timeout 0": (["--timeout", "0", "10000"], ["--timeout", "'0'"]),
    "timeout abc": (["--timeout", "abc", "10000"], ["--timeout", "'abc'"]),
    # argparse leaves unknown options to the top parser, which reports them.
    "unknown option": (["--verbose", "10000"], ["--verbose", "unrecognized"]),
    "ca and insecure": (["--ca", "ca.pem", "--insecure", "10000"], ["--ca and --insecure"]),
}


@pytest.mark.parametrize("args, words", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_error_is_one_line_and_exit_2(args: list[str], words: list[str]) -> None:
    """Other usage errors: exit 2 and one line."""
    result = get(*args)
    assert result.returncode == 2, result
    [line] = error_lines(result)
    assert re.match(r"fastpoetry( get)?: error: ", line), line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


# -- standard output closed, interrupts ------------------------------------------------


def test_closed_standard_output_ends_it_quietly(serve_foreground: ServeForeground) -> None:
    """A reader gone (``| head``): exit 141, as a shell reports SIGPIPE, and no traceback."""
    server = serve_foreground("--poem", str(LANTERN))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the first write fails with EPIPE
    try:
        result = get(address(server), address(server), stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result
    assert result.stderr == b""


def test_a_failed_write_is_one_line_and_exit_1(serve_foreground: ServeForeground) -> None:
    """Standard output that cannot take the poem (a full disk): one line, exit 1."""
    server = serve_foreground("--poem", str(LANTERN))
    with open("/dev/full", "wb") as full:
        result = get(address(server), stdout=full)
    assert result.returncode == 1, result
    assert error_lines(result) == [
        "fastpoetry get: cannot write to standard output: no space left on device"
    ]


def test_ctrl_c_exits_130_quietly(fake_server: StartFake) -> None:
    """SIGINT while waiting for a poem: exit 130, nothing on stderr, no traceback."""
    server = fake_server(wait_for_close)
    client = start_get(server.address)
    try:
        assert server.accepted.wait(WAIT), "the client never connected"
        client.send_signal(signal.SIGINT)
        output, errors = client.communicate(timeout=WAIT)
    finally:
        client.kill()
        client.wait(WAIT)
    assert client.returncode == 130, errors
    assert (output, errors) == (b"", b"")


# -- progress on a terminal ------------------------------------------------------------


class Terminal:
    """A pseudo-terminal for the client's standard error."""

    def __init__(self, columns: int) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.text = ""

    def read_until(self, pattern: str) -> re.Match[str]:
        """Read what the client shows until ``pattern`` (a regular expression) appears."""
        deadline = time.monotonic() + WAIT
        while not (match := re.search(pattern, self.text)):
            assert readable(self.master, deadline), f"no {pattern!r} in {WAIT} s: {self.text!r}"
            self.text += os.read(self.master, 65536).decode(errors="replace")
        return match

    def read_to_end(self) -> str:
        """Read until the client has closed the terminal (every copy of it)."""
        deadline = time.monotonic() + WAIT
        while True:
            assert readable(self.master, deadline), f"still open after {WAIT} s: {self.text!r}"
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: nobody has the other end open any more
                return self.text
            if not chunk:
                return self.text
            self.text += chunk.decode(errors="replace")

    def close(self) -> None:
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[Callable[[int], Terminal]]:
    terminals: list[Terminal] = []

    def open_terminal(columns: int = 120) -> Terminal:
        terminals.append(Terminal(columns))
        return terminals[-1]

    yield open_terminal
    for each in terminals:
        each.close()


def _start_on_terminal(term: Terminal, *args: str) -> subprocess.Popen[bytes]:
    try:
        return start_get(*args, stderr=term.slave)
    finally:
        os.close(term.slave)  # the client's is the only copy left


def test_progress_on_a_terminal_shows_each_server_and_its_bytes(
    fake_server: StartFake, terminal: Callable[[int], Terminal]
) -> None:
    """On a terminal, stderr shows the bytes from each server, then is cleared."""
    released = threading.Event()

    def holds_back(part: bytes) -> Handler:
        return sends_part(part, then=sends(b" and the rest\n", after=released))

    first = fake_server(holds_back(b"x" * 1000))
    second = fake_server(holds_back(b"y" * 2345))
    term = terminal(120)
    client = _start_on_terminal(term, first.address, second.address)
    try:
        term.read_until(rf"{re.escape(first.address)} 1000 bytes")
        term.read_until(rf"{re.escape(second.address)} 2345 bytes")
        term.read_until(r"\[0/2 done\]")
        released.set()
        shown = term.read_to_end()
        output, _ = client.communicate(timeout=WAIT)
    finally:
        released.set()
        client.kill()
        client.wait(WAIT)
    assert client.returncode == 0, shown
    assert output == b"x" * 1000 + b" and the rest\n" + b"y" * 2345 + b" and the rest\n"
    # Each redraw starts at the line's start; the last one blanks it out.
    assert re.fullmatch(r"(\r[^\r\n]*)+\r +\r", shown), shown
    assert "Traceback" not in shown


def _release_once_shown(
    term: Terminal, released: threading.Event, shown_first: str, *addresses: str
) -> tuple[int, str]:
    """Run get on ``term``; once it shows ``shown_first``, set ``released``.

    Returns get's exit status and everything it showed on the terminal.
    """
    client = _start_on_terminal(term, *addresses)
    try:
        term.read_until(shown_first)
        released.set()
        shown = term.read_to_end()
        client.communicate(timeout=WAIT)
    finally:
        released.set()
        client.kill()
        client.wait(WAIT)
    return client.returncode, shown


def test_progress_fits_the_terminal(
    fake_server: StartFake, terminal: Callable[[int], Terminal]
) -> None:
    """The progress line never reaches the last column, so \\r always returns to its start."""
    released = threading.Event()
    servers = [
        fake_server(sends_part(b"z" * 100, then=sends(b"\n", after=released)))
        for _ in range(3)
    ]
    returncode, shown = _release_once_shown(
        terminal(30), released, r"\[0/3 done\]", *(server.address for server in servers)
    )
    assert returncode == 0, shown
    assert max(map(len, shown.split("\r"))) <= 29, shown


def test_progress_is_cleared_before_an_error_line(
    fake_server: StartFake, terminal: Callable[[int], Terminal]
) -> None:
    """An error line is written on a blank line, not after the progress."""
    released = threading.Event()

    def resets_when_released(conn: socket.socket) -> None:
        assert released.wait(WAIT)
        reset(conn)

    server = fake_server(sends_part(b"x" * 100, then=resets_when_released))
    returncode, shown = _release_once_shown(
        terminal(120), released, rf"{re.escape(server.address)} 100 bytes", server.address
    )
    assert returncode == 1, shown
    # The progress line, blanked, then the error on the line it occupied.
    assert re.search(
        rf"\r +\rfastpoetry get: {re.escape(server.address)}: connection reset after 100 bytes",
        shown,
    ), shown


def test_ctrl_c_clears_the_progress(
    fake_server: StartFake, terminal: Callable[[int], Terminal]
) -> None:
    """Interrupted with progress shown: the line is cleared, exit 130, no traceback."""
    server = fake_server(wait_for_close)
    term = terminal(120)
    client = _start_on_terminal(term, server.address)
    try:
        term.read_until(rf"{re.escape(server.address)} 0 bytes")
        client.send_signal(signal.SIGINT)
        shown = term.read_to_end()
        client.wait(WAIT)
    finally:
        client.kill()
        client.wait(WAIT)
    assert client.returncode == 130, shown
    assert re.fullmatch(r"(\r[^\r\n]*)+\r +\r", shown), shown


def test_no_progress_when_stderr_is_not_a_terminal(fake_server: StartFake) -> None:
    """Standard error that is a pipe or a file gets failures only, never progress."""
    released = threading.Event()
    server = fake_server(sends_part(b"x" * 1000, then=sends(b"\n", after=released)))
    client = start_get(server.address)
    try:
        assert server.accepted.wait(WAIT)
        # Long enough for several redraws, if there were any; the test does
        # not depend on this taking any particular time.
        time.sleep(5 * PROGRESS_INTERVAL)
        released.set()
        output, errors = client.communicate(timeout=WAIT)
    finally:
        released.set()
        client.kill()
        client.wait(WAIT)
    assert client.returncode == 0, errors
    assert output == b"x" * 1000 + b"\n"
    assert errors == b""


def test_a_server_sending_more_than_max_poem_size_is_given_up(fake_server: StartFake) -> None:
    """A stream of bytes without end is not read into memory past --max-poem-size."""
    def floods(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client gives up: reset or broken pipe
            while True:
                conn.sendall(b"x" * 65536)

    server = fake_server(floods)
    result = get("--max-poem-size", "64K", server.address)
    assert result.returncode == 1, result
    assert result.stdout == b""
    [line] = error_lines(result)
    assert line == (
        f"fastpoetry get: {server.address}: too big for a poem: "
        "more than --max-poem-size (65536 bytes); stopped reading"
    )


def test_a_poem_of_exactly_max_poem_size_is_printed(fake_server: StartFake) -> None:
    server = fake_server(sends(b"y" * 1023 + b"\n"))
    result = get("--max-poem-size", "1K", server.address)
    assert result.returncode == 0, result
    assert result.stdout == b"y" * 1023 + b"\n"


# -- over TLS ----------------------------------------------------------------------------


@pytest.fixture
def tls_server(serve_foreground: ServeForeground, tmp_path: Path) -> tuple[Server, Pair]:
    pair = make_pair(tmp_path / "tls")
    server = serve_foreground("--poem", str(LEDGER), "--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
    return server, pair


def _ca_file(pair: Pair, folder: Path) -> str:
    path = folder / "ca.pem"
    pair.ca.cert_pem.write_to_path(str(path))
    return str(path)


def test_tls_with_the_right_ca_prints_the_exact_poem(tls_server: tuple[Server, Pair], tmp_path: Path) -> None:
    server, pair = tls_server
    port = str(server.address()[1])
    # By address, and by the name localhost (both loopback addresses, one name to check).
    for where in (address(server), port):
        result = get("--tls", "--ca", _ca_file(pair, tmp_path), where)
        assert (result.returncode, result.stdout, result.stderr) == (0, LEDGER.read_bytes(), b"")


def test_tls_with_another_ca_or_the_system_cas_fails_in_one_line(
    tls_server: tuple[Server, Pair], tmp_path: Path
) -> None:
    server, _ = tls_server
    stranger = make_pair(tmp_path / "stranger", "stranger")
    for options in (["--ca", _ca_file(stranger, tmp_path)], ["--tls"]):
        result = get(*options, address(server))
        assert result.returncode == 1 and result.stdout == b""
        [line] = error_lines(result)
        assert line.startswith(f"fastpoetry get: {address(server)}: TLS handshake failed: certificate verify failed"), line


def test_tls_checks_the_host_name(serve_foreground: ServeForeground, tmp_path: Path) -> None:
    """A certificate of the right CA for another name is refused."""
    pair = make_pair(tmp_path / "tls", "elsewhere", None, "poetry.example.org")
    server = serve_foreground("--tls-cert", str(pair.cert), "--tls-key", str(pair.key))
    result = get("--ca", _ca_file(pair, tmp_path), address(server))
    assert result.returncode == 1 and result.stdout == b""
    [line] = error_lines(result)
    assert "certificate verify failed" in line and "127.0.0.1" in line, line


def test_insecure_checks_nothing(tls_server: tuple[Server, Pair]) -> None:
    server, _ = tls_server
    result = get("--insecure", address(server))
    assert (result.returncode, result.stdout) == (0, LEDGER.read_bytes())


def test_tls_a_poem_without_a_close_notify_is_cut_off(fake_server: StartFake, tmp_path: Path) -> None:
    """A server that ends the TCP stream without a close_notify: the bytes are not printed."""
    pair = make_pair(tmp_path / "tls")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)

    def no_close_notify(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as secure:
            secure.sendall(LEDGER.read_bytes())
            # The TCP end without TLS's: close the descriptor under OpenSSL.
            os.close(secure.detach())

    server = fake_server(no_close_notify)
    result = get("--ca", _ca_file(pair, tmp_path), server.address)
    assert result.returncode == 1 and result.stdout == b""
    [line] = error_lines(result)
    assert "closed without a TLS close_notify" in line and "(the poem is incomplete)" in line, line


def test_a_plain_get_from_a_tls_server_gets_no_poem(serve_foreground: ServeForeground, tmp_path: Path) -> None:
    pair = make_pair(tmp_path / "tls")
    server = serve_foreground("--tls-cert", str(pair.cert), "--tls-key", str(pair.key), "--tls-handshake-timeout", "0.2")
    result = get(address(server))
    assert result.returncode == 1 and result.stdout == b""


def test_a_ca_file_that_cannot_be_read_is_one_line_exit_1(tmp_path: Path) -> None:
    result = get("--ca", str(tmp_path / "missing.pem"), "10000")
    assert result.returncode == 1 and result.stdout == b""
    [line] = error_lines(result)
    assert line == f"fastpoetry get: cannot load the TLS CA certificates from {tmp_path / 'missing.pem'}: no such file or directory"

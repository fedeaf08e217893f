"""Listening sockets: binding, adopting inherited descriptors, naming addresses."""

from __future__ import annotations

import os
import select
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import WAIT, needs_ipv6
from fastpoetry.listeners import ListenerError, acquire, adopt, bind, describe, format_peer, turn_away


@pytest.fixture
def closing() -> Iterator[Callable[[socket.socket], socket.socket]]:
    """Register sockets to be closed at teardown."""
    sockets: list[socket.socket] = []

    def register(sock: socket.socket) -> socket.socket:
        sockets.append(sock)
        return sock

    yield register
    for sock in sockets:
        sock.close()


def accept_one(listener: socket.socket) -> tuple[socket.socket, object]:
    """Accept a connection on a (possibly non-blocking) listener, waiting up to WAIT."""
    readable, _, _ = select.select([listener], [], [], WAIT)
    assert readable, "no connection to accept"
    return listener.accept()


def assert_serves(listener: socket.socket) -> None:
    """A client can connect to ``listener`` and exchange bytes with the accepted socket."""
    with socket.socket(listener.family, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT)
        client.connect(listener.getsockname())
        conn, _ = accept_one(listener)
        with conn:
            conn.setblocking(True)
            conn.sendall(b"verse")
            assert client.recv(16) == b"verse"


def unix_listener(path: Path, backlog: int = 8) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(backlog)
    return sock


def free_dual_stack_port() -> int:
    """A TCP port that is free on both 0.0.0.0 and :: right now."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::", 0))
        return probe.getsockname()[1]


# bind


def test_bind_ipv4_gives_a_non_blocking_listening_socket(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """bind('127.0.0.1', 0) returns one non-blocking listener that accepts a connection."""
    listeners = [closing(sock) for sock in bind("127.0.0.1", 0)]
    assert len(listeners) == 1
    (sock,) = listeners
    assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
    host, port = sock.getsockname()
    assert host == "127.0.0.1" and port != 0
    assert sock.getblocking() is False
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert_serves(sock)


def test_bind_defers_accepts_only_when_asked(closing: Callable[[socket.socket], socket.socket]) -> None:
    """For clients that speak first (a balancer's header): the kernel hands a connection over once it has."""
    [plain] = [closing(sock) for sock in bind("127.0.0.1", 0)]
    [deferred] = [closing(sock) for sock in bind("127.0.0.1", 0, defer_accept=True)]
    assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
    assert deferred.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
    with socket.create_connection(deferred.getsockname(), timeout=WAIT) as client:
        client.sendall(b"PROXY UNKNOWN\r\n")
        conn, _ = accept_one(deferred)
        with conn:
            assert conn.recv(64) == b"PROXY UNKNOWN\r\n"


def test_acquire_defers_accepts_on_the_sockets_it_binds_for_the_names_given(
    closing: Callable[[socket.socket], socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        monkeypatch.delenv(variable, raising=False)
    sockets = acquire("127.0.0.1", 0, {"behind": 0}, True, defer_accept=["behind"])
    for _, sock in sockets:
        closing(sock)
    deferred = {name: bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)) for name, sock in sockets}
    assert deferred == {None: False, "behind": True}


@needs_ipv6
@pytest.mark.parametrize("name", ["localhost", "LocalHost", "localhost."])
def test_bind_localhost_listens_on_both_loopback_addresses(
    closing: Callable[[socket.socket], socket.socket], name: str
) -> None:
    """bind('localhost', 0) listens on 127.0.0.1 and ::1, whatever /etc/hosts says of the name.

    The IPv6 socket is IPv6-only, as every IPv6 listener bind() makes.
    """
    listeners = [closing(sock) for sock in bind(name, 0)]
    assert [(sock.family, sock.getsockname()[0]) for sock in listeners] == [
        (socket.AF_INET, "127.0.0.1"),
        (socket.AF_INET6, "::1"),
    ]
    for sock in listeners:
        if sock.family == socket.AF_INET6:
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert sock.getblocking() is False
        assert_serves(sock)


def test_bind_localhost_looks_nothing_up(
    closing: Callable[[socket.socket], socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every name lookup failing, as where nothing resolves localhost, bind() still listens.

    (tests/test_cli.py runs the server where the name truly resolves to nothing.)
    """

    def nothing_resolves(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", nothing_resolves)
    listeners = [closing(sock) for sock in bind("localhost", 0)]
    assert (socket.AF_INET, "127.0.0.1") in {(sock.family, sock.getsockname()[0]) for sock in listeners}
    for sock in listeners:
        assert_serves(sock)


@needs_ipv6
def test_bind_ipv6_makes_the_socket_ipv6_only(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """An IPv6 listener is IPv6-only and serves over ::1."""
    (sock,) = [closing(sock) for sock in bind("::1", 0)]
    assert sock.family == socket.AF_INET6
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert sock.getblocking() is False
    assert_serves(sock)


@needs_ipv6
def test_bind_wildcard_listens_on_both_families_at_one_port(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """bind('', port) gets 0.0.0.0 and :: at the same port: the IPv6 one does not take IPv4."""
    port = free_dual_stack_port()
    listeners = [closing(sock) for sock in bind("", port)]
    assert {(sock.family, sock.getsockname()[:2]) for sock in listeners} == {
        (socket.AF_INET, ("0.0.0.0", port)),
        (socket.AF_INET6, ("::", port)),
    }


def test_bind_on_a_port_in_use_names_the_address(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """Binding a port someone listens on raises ListenerError with the address and the reason."""
    taken = closing(socket.create_server(("127.0.0.1", 0)))
    port = taken.getsockname()[1]
    with pytest.raises(ListenerError) as info:
        bind("127.0.0.1", port)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "address already in use" in str(info.value)


@needs_ipv6
def test_bind_closes_what_it_bound_when_a_later_address_fails(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """When one address of the name cannot be bound, the sockets already bound are closed."""
    port = free_dual_stack_port()
    blocker = closing(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
    blocker.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    blocker.bind(("::", port))
    blocker.listen()
    with pytest.raises(ListenerError) as info:
        bind("", port)
    assert f"[::]:{port}" in str(info.value) and "address already in use" in str(info.value)
    # While the error (and with it bind's frame) is alive, 0.0.0.0:port must
    # be free: a socket bind() had made there was closed, not left to the GC.
    closing(socket.create_server(("0.0.0.0", port)))
    del info


def test_bind_with_an_unresolvable_name_raises() -> None:
    """A name that does not resolve raises ListenerError naming it."""
    with pytest.raises(ListenerError, match="no-such-host.invalid"):
        bind("no-such-host.invalid", 0)


# adopt


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(socket.AF_INET, id="tcp"),
        pytest.param(socket.AF_INET6, id="tcp6", marks=needs_ipv6),
        pytest.param(socket.AF_UNIX, id="unix"),
    ],
)
def test_adopt_takes_a_listening_stream_socket(
    tmp_path: Path, closing: Callable[[socket.socket], socket.socket], family: int
) -> None:
    """adopt() of a duplicated listening descriptor gives a non-blocking socket that serves."""
    if family == socket.AF_UNIX:
        original = closing(unix_listener(tmp_path / "poetry.sock"))
    else:
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        original = closing(socket.create_server((host, 0), family=family))
    fd = os.dup(original.fileno())
    sock = closing(adopt(fd))
    assert sock.fileno() == fd
    assert sock.family == family and sock.type == socket.SOCK_STREAM
    assert sock.getsockname() == original.getsockname()
    assert sock.getblocking() is False
    assert_serves(sock)


def test_adopt_keeps_the_backlog_it_was_given(
    tmp_path: Path, closing: Callable[[socket.socket], socket.socket]
) -> None:
    """adopt() does not call listen() again: a backlog of 1 still refuses a third client."""
    path = tmp_path / "poetry.sock"
    original = closing(unix_listener(path, backlog=1))
    closing(adopt(os.dup(original.fileno())))
    connected = 0
    refused = False
    for _ in range(16):
        client = closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        client.setblocking(False)
        try:
            client.connect(str(path))
        except BlockingIOError:
            refused = True
            break
        connected += 1
    assert refused, f"{connected} clients queued: the backlog was raised by listen()"
    assert connected <= 2


def test_turn_away_closes_every_waiting_connection_and_keeps_listening(
    closing: Callable[[socket.socket], socket.socket]
) -> None:
    """turn_away() empties the accept queue, counts it, and leaves the socket listening."""
    [listener] = bind("127.0.0.1", 0)
    closing(listener)
    address = listener.getsockname()
    clients = [closing(socket.create_connection(address, timeout=WAIT)) for _ in range(5)]
    assert turn_away(listener) == 5
    for client in clients:
        assert client.recv(1) == b""
    assert turn_away(listener) == 0
    late = closing(socket.create_connection(address, timeout=WAIT))
    conn, _ = listener.accept()
    conn.close()
    assert late.recv(1) == b""


def udp_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def unix_seqpacket_listener(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(tmp_path / "seqpacket.sock"))
    sock.listen()
    return sock


def connected_tcp_socket(tmp_path: Path) -> socket.socket:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=WAIT)
        conn, _ = listener.accept()
        conn.close()
    return client


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (udp_socket, "not a stream socket"),
        (unix_seqpacket_listener, "not a stream socket"),
        (connected_tcp_socket, "not listening"),
    ],
    ids=["udp", "unix-seqpacket", "connected-tcp"],
)
def test_adopt_refuses_a_socket_it_cannot_serve_and_leaves_it_open(
    tmp_path: Path,
    make: Callable[[Path], socket.socket],
    reason: str,
) -> None:
    """adopt() of an unservable socket raises ListenerError and leaves the descriptor open."""
    with make(tmp_path) as original:
        fd = os.dup(original.fileno())
        try:
            with pytest.raises(ListenerError) as info:
                adopt(fd)
            assert f"descriptor {fd}" in str(info.value) and reason in str(info.value)
            assert os.fstat(fd).st_ino == os.fstat(original.fileno()).st_ino
        finally:
            os.close(fd)


def test_adopt_refuses_a_regular_file_and_leaves_it_open(tmp_path: Path) -> None:
    """adopt() of a file descriptor raises ListenerError and the file stays open."""
    path = tmp_path / "not-a-socket"
    path.write_bytes(b"verse\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ListenerError, match=f"descriptor {fd} is not a socket"):
            adopt(fd)
        assert os.fstat(fd).st_ino == path.stat().st_ino
        assert os.pread(fd, 16, 0) == b"verse\n"
    finally:
        os.close(fd)


def test_adopt_refuses_a_closed_descriptor() -> None:
    """adopt() of a descriptor that is not open raises ListenerError."""
    fd = os.dup(0)
    os.close(fd)
    with pytest.raises(ListenerError, match=f"descriptor {fd} is not a socket"):
        adopt(fd)


# describe


def test_describe_formats_an_ipv4_listener(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """An IPv4 listener is described as host:port."""
    sock = closing(socket.create_server(("127.0.0.1", 0)))
    assert describe(sock) == f"127.0.0.1:{sock.getsockname()[1]}"


@needs_ipv6
def test_describe_formats_an_ipv6_listener_in_brackets(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """An IPv6 listener is described as [host]:port."""
    sock = closing(socket.create_server(("::1", 0), family=socket.AF_INET6))
    assert describe(sock) == f"[::1]:{sock.getsockname()[1]}"


def test_describe_formats_a_unix_socket_path(
    tmp_path: Path, closing: Callable[[socket.socket], socket.socket]
) -> None:
    """An AF_UNIX listener bound to a path is described as unix:PATH."""
    path = tmp_path / "poetry.sock"
    sock = closing(unix_listener(path))
    assert describe(sock) == f"unix:{path}"


def test_describe_formats_an_abstract_unix_socket(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """An abstract AF_UNIX listener is described as unix:@NAME."""
    name = f"fastpoetry-test-{uuid.uuid4().hex}"
    sock = closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    sock.bind(b"\0" + name.encode())
    sock.listen()
    assert describe(sock) == f"unix:@{name}"


# format_peer


def test_format_peer_shows_ipv4_as_host_and_port() -> None:
    """An IPv4 peer is shown as host:port."""
    assert format_peer(socket.AF_INET, ("192.0.2.7", 40123)) == "192.0.2.7:40123"


def test_format_peer_unmaps_ipv4_mapped_ipv6() -> None:
    """An IPv4-mapped IPv6 peer (::ffff:a.b.c.d) is shown as the IPv4 address it is."""
    assert format_peer(socket.AF_INET6, ("::ffff:1.2.3.4", 5678, 0, 0)) == "1.2.3.4:5678"


def test_format_peer_brackets_real_ipv6() -> None:
    """A real IPv6 peer is shown as [host]:port, even one under ::ffff without dots."""
    assert format_peer(socket.AF_INET6, ("2001:db8::1", 443, 0, 0)) == "[2001:db8::1]:443"
    assert format_peer(socket.AF_INET6, ("::ffff:102:304", 9, 0, 0)) == "[::ffff:102:304]:9"


def test_format_peer_names_an_unnamed_unix_client(
    tmp_path: Path, closing: Callable[[socket.socket], socket.socket]
) -> None:
    """A connection from an unbound AF_UNIX client is shown as 'unix client'."""
    path = tmp_path / "poetry.sock"
    listener = closing(unix_listener(path))
    client = closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    client.connect(str(path))
    conn, address = listener.accept()
    closing(conn)
    assert format_peer(socket.AF_UNIX, address) == "unix client"


@needs_ipv6
def test_format_peer_of_an_ipv4_client_on_a_dual_stack_socket(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """An IPv4 client accepted on a dual-stack :: listener is shown as 127.0.0.1:port."""
    listener = closing(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
    try:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", 0))
    except OSError as exc:
        pytest.skip(f"cannot bind a dual-stack IPv6 socket on this host: {exc}")
    listener.listen()
    client = closing(socket.create_connection(("127.0.0.1", listener.getsockname()[1]), WAIT))
    conn, address = accept_one(listener)
    closing(conn)
    assert address[0] == f"::ffff:{client.getsockname()[0]}"
    assert format_peer(listener.family, address) == f"127.0.0.1:{client.getsockname()[1]}"


@needs_ipv6
def test_format_peer_of_an_ipv6_client(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    """A client connected over ::1 is shown as [::1]:port."""
    listener = closing(socket.create_server(("::1", 0), family=socket.AF_INET6))
    client = closing(socket.create_connection(listener.getsockname()[:2], WAIT))
    conn, address = accept_one(listener)
    closing(conn)
    assert format_peer(listener.family, address) == f"[::1]:{client.getsockname()[1]}"

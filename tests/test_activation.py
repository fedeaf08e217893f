"""Socket activation: serving on sockets passed in, as systemd passes them.

Two ways in: systemd's own ``systemd-socket-activate`` tool, and a child the
test starts itself with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    needs_ipv6,
    ACTIVATE,
    DEFAULT_POEM,
    POEMS,
    WAIT,
    NotifySocket,
    clean_env,
    fetch,
    has_waiting_connection,
    listening_socket,
    start_activated,
)

LEDGER = POEMS / "harbour-ledger.txt"
LANTERN = POEMS / "lantern.txt"
WINTER = POEMS / "long-winter.txt"

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed (package systemd)"
)




def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _connect_when_listening(port: int) -> socket.socket:
    """Connect to a port that a tool is about to listen on."""
    import time

    deadline = time.monotonic() + WAIT
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _read_all(sock: socket.socket) -> bytes:
    with sock:
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- through systemd-socket-activate -------------------------------------------


@needs_socket_activate
def test_systemd_socket_activate_starts_and_serves(
    start_server, notify_socket: NotifySocket
) -> None:
    """The first connection starts the server, and that very client gets the poem."""
    port = _free_port()
    server = start_server(
        "serve", "--poem", str(LEDGER),
        command=[
            SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={notify_socket.path}",
            sys.executable, "-m", "fastpoetry",
        ],
    )
    first = _connect_when_listening(port)
    assert _read_all(first) == LEDGER.read_bytes()
    notify_socket.wait_for("READY")
    assert fetch(("127.0.0.1", port)) == LEDGER.read_bytes()
    server.wait_for_log("took 1 socket from systemd")
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0


@needs_socket_activate
def test_systemd_socket_activate_named_sockets_serve_their_poems(start_server) -> None:
    """--fdname names map each socket to the poem given under that name."""
    ledger_port, lantern_port = _free_port(), _free_port()
    server = start_server(
        "serve", "--poem", f"ledger={LEDGER}", "--poem", f"lantern={LANTERN}",
        command=[
            SOCKET_ACTIVATE, "-l", f"127.0.0.1:{ledger_port}", "-l", f"127.0.0.1:{lantern_port}",
            "--fdname=ledger:lantern", sys.executable, "-m", "fastpoetry",
        ],
    )
    assert _read_all(_connect_when_listening(lantern_port)) == LANTERN.read_bytes()
    assert fetch(("127.0.0.1", ledger_port)) == LEDGER.read_bytes()
    assert fetch(("127.0.0.1", lantern_port)) == LANTERN.read_bytes()
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0


# -- through LISTEN_FDS set by the test ----------------------------------------


def test_named_socket_gets_its_poem_others_the_unnamed_one(start_server) -> None:
    """A socket named NAME serves --poem NAME=FILE; any other, the unnamed poem."""
    with listening_socket() as named, listening_socket() as stranger:
        server = start_activated(
            start_server, [named, stranger],
            "serve", "--poem", f"winter={WINTER}", "--poem", str(LANTERN),
            names=["winter", "fastpoetry.socket"],
        )
        assert fetch(named.getsockname()) == WINTER.read_bytes()
        assert fetch(stranger.getsockname()) == LANTERN.read_bytes()
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 0


def test_only_poem_serves_every_socket(start_server) -> None:
    """With just one poem, named or not, every passed socket serves it."""
    with listening_socket() as one, listening_socket() as two:
        server = start_activated(
            start_server, [one, two], "serve", "--poem", f"ledger={LEDGER}",
            names=["ledger", "other"],
        )
        assert fetch(one.getsockname()) == LEDGER.read_bytes()
        assert fetch(two.getsockname()) == LEDGER.read_bytes()
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 0


def test_activated_server_does_not_bind_its_own_port(start_server) -> None:
    """Under activation --iface/--port are ignored: only passed sockets serve."""
    port = _free_port()
    with listening_socket() as sock:
        server = start_activated(
            start_server, [sock], "serve", "--iface", "127.0.0.1", "--port", str(port)
        )
        assert fetch(sock.getsockname()) == DEFAULT_POEM.read_bytes()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 0


def test_unix_socket_serves_the_poem(start_server, tmp_path: Path) -> None:
    """An AF_UNIX ListenStream= socket serves like a TCP one."""
    path = str(tmp_path / "poetry.sock")
    with listening_socket(socket.AF_UNIX, path) as sock:
        server = start_activated(
            start_server, [sock], "serve", "--log-level", "debug", "--poem", str(LANTERN)
        )
        assert fetch(path, family=socket.AF_UNIX, send=b"hello\n") == LANTERN.read_bytes()
        server.wait_for_log(f"serving lantern.txt on unix:{path}")
        server.wait_for_log(r"sending \d+ bytes of poetry to unix client")
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 0


@needs_ipv6
def test_ipv6_and_dual_stack_peers(start_server) -> None:
    """IPv6 clients are served; IPv4 clients of a dual-stack socket log as IPv4."""
    dual = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.bind(("::", 0))
    dual.listen(16)
    port = dual.getsockname()[1]
    with dual:
        server = start_activated(
            start_server, [dual], "serve", "--log-level", "debug", "--poem", str(LEDGER)
        )
        assert fetch(("::1", port), family=socket.AF_INET6) == LEDGER.read_bytes()
        server.wait_for_log(r"sending \d+ bytes of poetry to \[::1\]:\d+")
        assert fetch(("127.0.0.1", port)) == LEDGER.read_bytes()
        server.wait_for_log(r"sending \d+ bytes of poetry to 127\.0\.0\.1:\d+")
        assert "::ffff:" not in server.log()
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 0


def test_passed_socket_outlives_the_server(start_server) -> None:
    """Stopping never shuts the shared socket down: the next server serves the queue.

    This is what lets systemd restart the service without refusing anyone.
    """
    with listening_socket(backlog=32) as sock:
        first = start_activated(start_server, [sock], "serve", "--poem", str(LEDGER))
        assert fetch(sock.getsockname()) == LEDGER.read_bytes()
        first.send_signal(signal.SIGTERM)
        assert first.wait() == 0
        # Nobody serves now, yet the kernel still queues connections.
        waiting = socket.create_connection(sock.getsockname(), timeout=WAIT)
        second = start_activated(start_server, [sock], "serve", "--poem", str(LANTERN))
        assert _read_all(waiting) == LANTERN.read_bytes()
        second.send_signal(signal.SIGTERM)
        assert second.wait() == 0


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (package iproute2) is not installed")
def test_passed_socket_keeps_its_backlog(start_server) -> None:
    """listen() is never called again, so the unit's Backlog= stays in force."""
    with listening_socket(backlog=7) as sock:
        port = sock.getsockname()[1]
        server = start_activated(start_server, [sock], "serve")
        server.wait_ready()
        table = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        # State, Recv-Q, Send-Q (the backlog of a listening socket), ...
        assert table[2] == "7"
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 0


# -- what is refused -------------------------------------------------------------


def test_socket_with_no_poem_is_a_startup_error(start_server) -> None:
    """A named socket that matches no poem, with no unnamed poem, stops the start."""
    with listening_socket() as sock:
        server = start_activated(
            start_server, [sock], "serve", "--poem", f"a={LEDGER}", "--poem", f"b={LANTERN}",
            names=["c"],
        )
        assert server.wait() == 1
    assert "no poem for the socket named 'c'" in server.log()
    assert "--poem c=FILE" in server.log()
    assert "Traceback" not in server.log()


def _queued_clients(sock: socket.socket, number: int) -> list[socket.socket]:
    """``number`` clients connected to ``sock`` and waiting in its accept queue."""
    return [socket.create_connection(sock.getsockname(), timeout=WAIT) for _ in range(number)]


def test_bad_poem_turns_waiting_clients_away_so_systemd_does_not_start_it_again(start_server) -> None:
    """Exit 1 with clients queued: they are closed unserved, and the socket is left empty.

    Left queued, they would make systemd start the service again at once,
    five times in a row, then fail the socket unit (seen under systemd 252).
    """
    with listening_socket() as sock:
        clients = _queued_clients(sock, 3)
        server = start_activated(start_server, [sock], "serve", "--poem", "/nonexistent/poem.txt")
        assert server.wait() == 1
        for client in clients:
            assert client.recv(1) == b""  # closed without a poem, at once
            client.close()
        assert not has_waiting_connection(sock)
        # The socket itself still listens for the next start.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    log = server.log()
    assert re.search(r"WARNING: closed 3 connections waiting on 127\.0\.0\.1:\d+ without a poem: cannot start", log), log
    assert "ERROR: cannot load a poem from /nonexistent/poem.txt" in log
    assert "Traceback" not in log


# Loaded before fastpoetry by the interpreter (see site): reading a poem
# raises an exception fastpoetry does not expect, as a bug would.
_CRASHING_READ = """
import fastpoetry.poetry
def read_poem(path, max_size=None):
    raise RuntimeError("a bug in reading poems")
fastpoetry.poetry.read_poem = read_poem
"""


def test_crash_at_start_leaves_waiting_clients_for_the_restart(start_server, tmp_path: Path) -> None:
    """Exit 70 (a bug): systemd restarts the service, which serves the clients still queued."""
    (tmp_path / "sitecustomize.py").write_text(_CRASHING_READ)
    with listening_socket() as sock:
        clients = _queued_clients(sock, 2)
        server = start_activated(
            start_server, [sock], "serve", "--poem", str(LEDGER),
            env=clean_env(PYTHONPATH=str(tmp_path)),
        )
        assert server.wait() == 70
        assert "a bug in reading poems" in server.log()
        # A restarted server (no crash this time) serves the clients that waited.
        restarted = start_activated(start_server, [sock], "serve", "--poem", str(LEDGER))
        restarted.wait_ready()
        for client in clients:
            data = b""
            while chunk := client.recv(65536):
                data += chunk
            assert data == LEDGER.read_bytes()
            client.close()
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait() == 0
    assert "closed" not in server.log()


def test_datagram_socket_is_refused(start_server) -> None:
    """A ListenDatagram= socket is not something a poem can be streamed on."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        server = start_activated(start_server, [sock], "serve")
        assert server.wait() == 1
    assert "is not a stream socket" in server.log()
    assert "Traceback" not in server.log()


def test_garbage_listen_fds_is_a_one_line_error() -> None:
    """LISTEN_FDS that is not a number: exit 1, the variable named, no traceback."""
    env = clean_env(LISTEN_FDS="three", TEST_PASS_FDS="")
    result = subprocess.run(
        [sys.executable, "-c", ACTIVATE, "serve"], env=env, capture_output=True, text=True,
        timeout=WAIT,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "LISTEN_FDS='three'" in errors[0]
    assert "Traceback" not in result.stderr


def test_listen_fds_for_another_process_falls_back_to_binding(start_server) -> None:
    """LISTEN_PID of another process: the variables are not ours, bind --port."""
    env = clean_env(LISTEN_FDS="1", LISTEN_PID="1")
    server = start_server("serve", "--iface", "127.0.0.1", "--port", "0", env=env)
    server.wait_ready()
    match = server.wait_for_log(r"serving .* on 127\.0\.0\.1:(\d+)")
    assert fetch(("127.0.0.1", int(match.group(1)))) == DEFAULT_POEM.read_bytes()
    assert "from systemd" not in server.log()
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0


def test_proxy_serves_on_the_socket_systemd_passes(start_server) -> None:
    """``fastpoetry proxy`` is socket-activated like ``serve``: it serves the passed socket."""
    upstream = start_server("serve", "--iface", "127.0.0.1", "--port", "0", "--poem", str(LANTERN))
    upstream.wait_ready()
    _, upstream_port = upstream.address()
    with listening_socket() as sock:
        proxy = start_activated(
            start_server, [sock], "proxy", "--upstream", f"127.0.0.1:{upstream_port}", names=["proxy"]
        )
        proxy.wait_ready()
        assert fetch(sock.getsockname()) == LANTERN.read_bytes()
        assert "took 1 socket from systemd" in proxy.log()
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait() == 0
    assert "Traceback" not in proxy.log()

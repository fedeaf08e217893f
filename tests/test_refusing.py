"""A server that cannot start turns arriving clients away for a while, then exits.

In process for :func:`refusing.hold` itself; with real processes on
sockets passed as systemd passes them for the three ways a start fails:
a bad poem, a bad poem with ``--workers``, and a bad command line.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading

from helpers import POEMS, WAIT, has_waiting_connection, listening_socket, start_activated

from fastpoetry import refusing

#: A poem file that cannot be loaded: the start fails with exit status 1.
MISSING = "/nonexistent/poem.txt"

#: A poem that can.
POEM = POEMS / "lantern.txt"


def _connect(sock: socket.socket) -> socket.socket:
    return socket.create_connection(sock.getsockname(), timeout=WAIT)


def _closed_without_a_byte(client: socket.socket) -> bool:
    with client:
        return client.recv(1) == b""


def test_hold_turns_away_arrivals_and_closes_the_sockets() -> None:
    """Every client that arrives during the hold is closed unserved; the socket is closed after."""
    sock = listening_socket()
    client = _connect(sock)  # queued before the hold: turned away by it
    held = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        assert refusing.hold([held], seconds=0.5) == 1
        assert _closed_without_a_byte(client)
        assert held.fileno() == -1
        # Our own copy (systemd's, under systemd) still listens.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        sock.close()


def test_hold_ends_at_a_stop_signal_and_puts_the_handlers_back() -> None:
    """SIGTERM ends the hold; the handlers and the signal mask are as before."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    sock = listening_socket()
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        # Far longer than any test: only the signal can end it.
        refusing.hold([sock], seconds=3600)
    finally:
        timer.cancel()
    assert sock.fileno() == -1
    assert {signum: signal.getsignal(signum) for signum in before} == before
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


def test_hold_takes_a_stop_signal_that_was_held_back_before() -> None:
    """A SIGTERM that came while signals were blocked (a server starting) ends the hold at once."""
    sock = listening_socket()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    try:
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # pending, not delivered
        refusing.hold([sock], seconds=3600)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    assert sock.fileno() == -1


def test_hold_of_nothing_returns_at_once() -> None:
    assert refusing.hold([], seconds=3600) == 0


def _hold_story(start_server, args: list[str]) -> int:  # type: ignore[no-untyped-def]
    """Start ``args`` on a passed socket with a client queued; check the hold, end it with SIGTERM."""
    with listening_socket() as sock:
        first = _connect(sock)
        server = start_activated(start_server, [sock], *args)
        assert _closed_without_a_byte(first)
        server.wait_for_log(r"turning away the clients that arrive for 5 s before exiting")
        # Still there: each new client is closed unserved, none stays queued
        # (where it would make systemd start the server again).
        later = [_connect(sock) for _ in range(3)]
        assert all(_closed_without_a_byte(client) for client in later)
        assert not has_waiting_connection(sock)
        assert server.process.poll() is None
        server.send_signal(signal.SIGTERM)
        status = server.wait()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    log = server.log()
    # The first turn-away may have taken some of the later clients too.
    assert turned_away(log, "stopped by SIGTERM") == 4, log
    assert "Traceback" not in log
    return status


def turned_away(log: str, how: str) -> int:
    """How many clients the log says were turned away: at first, then in the hold (ended ``how``)."""
    at_first = re.findall(r"closed (\d+) connections? waiting .*without a poem: cannot start", log)
    held = re.search(rf"turned away (\d+) more connections? while failing to start; {how}", log)
    assert held, log
    return sum(map(int, at_first)) + int(held.group(1))


def test_a_bad_poem_with_clients_waiting_turns_arrivals_away_until_stopped(start_server) -> None:
    """Exit 1 after a hold in which every arriving client is closed; SIGTERM ends it at once."""
    assert _hold_story(start_server, ["serve", "--poem", MISSING]) == 1


def test_a_bad_poem_with_workers_turns_arrivals_away_until_stopped(start_server) -> None:
    """The same in the main process of --workers, before any worker is forked."""
    assert _hold_story(start_server, ["serve", "--workers", "2", "--poem", MISSING]) == 1


def test_a_control_socket_that_cannot_be_made_turns_arrivals_away_until_stopped(start_server) -> None:
    """--control in a folder that does not exist: exit 1 after the same hold, the clients not left queued."""
    control = ["--control", "/nonexistent/folder/control"]
    assert _hold_story(start_server, ["serve", "--poem", str(POEM), *control]) == 1


def test_a_control_socket_that_cannot_be_made_with_workers_turns_arrivals_away(start_server) -> None:
    """The same in the main process of --workers."""
    control = ["--control", "/nonexistent/folder/control"]
    assert _hold_story(start_server, ["serve", "--workers", "2", "--poem", str(POEM), *control]) == 1


def test_a_usage_error_under_socket_activation_turns_the_clients_away(start_server) -> None:
    """A bad command line, started by a client: exit 2, and that client is not left queued."""
    with listening_socket() as sock:
        first = _connect(sock)
        server = start_activated(start_server, [sock], "serve", "--no-such-option")
        assert _closed_without_a_byte(first)
        later = _connect(sock)
        assert _closed_without_a_byte(later)
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 2
        assert not has_waiting_connection(sock)
    log = server.log()
    assert "error: unrecognized arguments: --no-such-option" in log, log
    assert turned_away(log, "stopped by SIGTERM") == 2, log


def test_a_failed_start_without_clients_waiting_exits_at_once(start_server) -> None:
    """No client waiting (an administrator's systemctl start): no hold, the error at once."""
    with listening_socket() as sock:
        server = start_activated(start_server, [sock], "serve", "--poem", MISSING)
        assert server.wait() == 1
    assert "turning away" not in server.log()


def test_a_failed_start_exits_by_itself_after_the_hold(start_server) -> None:
    """Not stopped, the hold ends by itself and the server exits 1."""
    with listening_socket() as sock:
        first = _connect(sock)
        server = start_activated(start_server, [sock], "serve", "--poem", MISSING)
        assert _closed_without_a_byte(first)
        assert server.wait() == 1
        assert not has_waiting_connection(sock)
    assert turned_away(server.log(), "exiting") == 1

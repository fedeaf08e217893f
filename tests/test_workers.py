"""``fastpoetry serve --workers N``: a main process and N workers on shared sockets.

Every test starts real processes and talks to them over real sockets and
real signals.  Which worker serves a client is up to the kernel; a test that
needs a given worker to serve stops the others (SIGSTOP) for that fetch, and
the debug log line of the fetch, which carries the PID of the process that
wrote it, says who served it.  The fake NOTIFY_SOCKET records the PID of
every sender, as systemd does to enforce NotifyAccess=main.
Waits are hang guards (helpers.WAIT); no test asserts how long anything took.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import (
    POEMS,
    WAIT,
    NotifySocket,
    Server,
    clean_env,
    count_in_log,
    fetch,
    fetch_from,
    listening_ports,
    listening_socket,
    make_poem,
    read_to_end,
    start_activated,
    terminate,
    wait_for_count,
    wait_until,
)

LANTERN = POEMS / "lantern.txt"
LEDGER = POEMS / "harbour-ledger.txt"

LOCAL = ["--iface", "127.0.0.1", "--port", "0"]

StartServer = Callable[..., Server]

#: The main process's "ready:" line (workers do not log one at info level).
READY = r"INFO: ready: "

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


# -- helpers -------------------------------------------------------------------


#: The key under which SenderNotifySocket records who sent a message.
SENDER = "_PID"

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class SenderNotifySocket(NotifySocket):
    """A NOTIFY_SOCKET that also records the PID of each message's sender.

    systemd takes it from the kernel (SO_PASSCRED) to refuse messages from
    processes other than the main one; so does this socket.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def _receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                fields[SENDER] = str(_UCRED.unpack(value[: _UCRED.size])[0])
        self.messages.append(fields)
        return fields


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[SenderNotifySocket]:
    sock = SenderNotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def serve_workers(start_server: StartServer, *args: str, env: dict[str, str] | None = None, **popen: object) -> Server:
    """Start ``serve --workers 2`` on 127.0.0.1, a free port; wait until the main process is ready."""
    server = start_server("serve", *LOCAL, "--workers", "2", *args, env=env, **popen)
    server.wait_ready()
    return server


def worker_pids(server: Server) -> list[int]:
    """The workers' PIDs, in the order of their numbers, as the main process logged them."""
    match = server.wait_for_log(r"INFO: started (\d+) workers \(PIDs ([\d, ]+)\)\n")
    pids = [int(pid) for pid in match.group(2).split(", ")]
    assert len(pids) == int(match.group(1))
    return pids


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def log_pids(server: Server) -> set[int]:
    """Every PID that wrote a line of the log."""
    return {int(pid) for pid in re.findall(r"^\S+ \S+ fastpoetry\[(\d+)\] ", server.log(), re.MULTILINE)}


def all_threads_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (state T in /proc/PID/task/*/stat)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        state = (task / "stat").read_text().rpartition(")")[2].split()[0]
        if state != "T":
            return False
    return True


@contextmanager
def only_serving(workers: list[int], pid: int) -> Iterator[None]:
    """Stop every worker but ``pid`` (SIGSTOP) for a while: only ``pid`` can accept."""
    others = [other for other in workers if other != pid]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    # kill() returns before the stop takes effect: a thread stops on its way
    # back from the kernel, so one already on its way into accept() would
    # take the next connection and then stop with it.
    for other in others:
        wait_until(lambda: all_threads_stopped(other), f"worker {other} stopped")
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def served_by(server: Server, client_port: int) -> int:
    """The PID of the process that logged sending a poem to the client at ``client_port``."""
    line = rf"fastpoetry\[(\d+)\] DEBUG: sending \d+ bytes of poetry to 127\.0\.0\.1:{client_port}\n"
    return int(server.wait_for_log(line).group(1))


def fetch_from_each(server: Server, workers: list[int], address: tuple[str, int]) -> dict[int, bytes]:
    """``{pid: poem}``: a poem fetched from each worker in turn (needs --log-level debug)."""
    poems = {}
    for pid in workers:
        with only_serving(workers, pid):
            poem, port = fetch_from(address)
        assert served_by(server, port) == pid
        poems[pid] = poem
    return poems


def has_exited(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has exited (a pidfd turns readable then)."""
    return bool(select.select([pidfd], [], [], 0)[0])


@contextmanager
def pidfds(pids: list[int]) -> Iterator[list[int]]:
    """pidfd_open(2) descriptors for ``pids``: they cannot be confused with a later process."""
    fds = [os.pidfd_open(pid) for pid in pids]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def errors_of(server: Server) -> list[str]:
    return [line for line in server.log().splitlines() if " ERROR: " in line or " CRITICAL: " in line]


def _replace_with(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` atomically (write, then rename)."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(data)
    os.replace(staging, path)


# -- serving -------------------------------------------------------------------


def test_two_workers_share_the_socket_and_each_serves(start_server: StartServer) -> None:
    """The main process has exactly two children; they, not it, listen, and each serves."""
    server = serve_workers(start_server, "--poem", str(LANTERN), "--log-level", "debug")
    workers = worker_pids(server)
    assert children_of(server.pid) == sorted(workers)
    address = server.address()
    # The main process closed its copy of the listening socket after forking.
    assert listening_ports(server.pid) == set()
    for pid in workers:
        assert listening_ports(pid) == {address[1]}
    poems = fetch_from_each(server, workers, address)
    assert poems == {pid: LANTERN.read_bytes() for pid in workers}
    assert terminate(server) == 0
    log = server.log()
    assert "Traceback" not in log and not errors_of(server), log
    assert f"fastpoetry[{server.pid}] INFO: shut down after serving 2 poems ({2 * len(LANTERN.read_bytes())} bytes) with 2 workers\n" in log


def test_every_worker_reads_the_proxy_protocol_header(start_server: StartServer) -> None:
    """--proxy-protocol reaches each worker: each serves behind a balancer and logs the header's client."""
    server = serve_workers(start_server, "--poem", str(LANTERN), "--log-level", "debug", "--proxy-protocol")
    workers = worker_pids(server)
    address = server.address()
    for number, pid in enumerate(workers, start=1):
        with only_serving(workers, pid), socket.create_connection(address, timeout=WAIT) as sock:
            sock.sendall(f"PROXY TCP4 198.51.100.{number} 192.0.2.1 4000{number} 10000\r\n".encode())
            assert b"".join(iter(lambda: sock.recv(65536), b"")) == LANTERN.read_bytes()
        server.wait_for_log(
            rf"fastpoetry\[{pid}\] DEBUG: sending \d+ bytes of poetry to 198\.51\.100\.{number}:4000{number} via 127\.0\.0\.1:\d+"
        )
    assert terminate(server) == 0


def test_workers_1_is_the_single_process_server(start_server: StartServer) -> None:
    """--workers 1 is the server as it always was: one process, no children."""
    server = start_server("serve", *LOCAL, "--workers", "1", "--poem", str(LANTERN))
    server.wait_ready()
    assert fetch(server.address()) == LANTERN.read_bytes()
    assert children_of(server.pid) == []
    assert listening_ports(server.pid) == {server.address()[1]}
    assert terminate(server) == 0
    assert log_pids(server) == {server.pid}
    assert "worker" not in server.log()


def test_more_workers_than_cores_is_a_warning(start_server: StartServer) -> None:
    """Pinned to one core, --workers 2 warns that the workers take turns, and serves."""
    core = min(os.sched_getaffinity(0))
    server = serve_workers(
        start_server, "--poem", str(LANTERN), preexec_fn=lambda: os.sched_setaffinity(0, {core})
    )
    warning = "WARNING: --workers 2 is more than the 1 core this process may run on: the workers take turns\n"
    assert f"fastpoetry[{server.pid}] {warning}" in server.log()
    assert fetch(server.address()) == LANTERN.read_bytes()
    assert terminate(server) == 0


def test_ready_is_sent_once_by_the_main_process_after_every_worker_serves(
    start_server: StartServer, notify: SenderNotifySocket
) -> None:
    """READY=1 comes once, from the main PID, after both workers serve; no worker ever notifies."""
    server = serve_workers(start_server, "--poem", str(LANTERN), env=clean_env(NOTIFY_SOCKET=notify.path))
    ready = notify.wait_for("READY", "1")
    assert ready[SENDER] == str(server.pid)
    size = LANTERN.stat().st_size
    assert ready["STATUS"] == f"Serving lantern.txt ({size} bytes) on 1 socket with 2 workers; 0 poems served"
    workers = worker_pids(server)
    log = server.log()
    before_ready = log[: log.index(READY)]
    serving = re.findall(r"fastpoetry\[(\d+)\] INFO: serving lantern\.txt on 127\.0\.0\.1:\d+\n", before_ready)
    assert sorted(int(pid) for pid in serving) == sorted(workers), log
    for _ in range(3):
        assert fetch(server.address()) == LANTERN.read_bytes()
    assert terminate(server) == 0
    messages = notify.drain(0.05)
    assert [message for message in messages if "READY" in message] == [ready]
    assert {message[SENDER] for message in messages} == {str(server.pid)}
    stopping = [message for message in messages if "STOPPING" in message]
    assert len(stopping) == 1
    assert stopping[0]["STATUS"].startswith("Shutting down 2 workers, waiting up to 5 s for ")


def test_status_adds_up_what_the_workers_served(
    start_server: StartServer, notify: SenderNotifySocket
) -> None:
    """STATUS= (brought up to date every 5 s) counts the poems of both workers."""
    server = serve_workers(
        start_server, "--poem", str(LANTERN), "--log-level", "debug",
        env=clean_env(NOTIFY_SOCKET=notify.path),
    )
    notify.wait_for("READY", "1")
    workers = worker_pids(server)
    address = server.address()
    fetch_from_each(server, workers, address)
    fetch_from_each(server, workers, address)
    status = notify.wait_for("STATUS")["STATUS"]
    while not status.endswith("; 4 poems served"):
        status = notify.wait_for("STATUS")["STATUS"]
    assert status == f"Serving lantern.txt ({LANTERN.stat().st_size} bytes) on 1 socket with 2 workers; 4 poems served"
    assert terminate(server) == 0
    assert {message[SENDER] for message in notify.drain(0.05)} == {str(server.pid)}


# -- reloading -------------------------------------------------------------------


def test_sighup_reloads_every_worker(
    start_server: StartServer, notify: SenderNotifySocket, tmp_path: Path
) -> None:
    """SIGHUP to the main process: each worker re-reads the file; RELOADING=1, then READY=1."""
    path = tmp_path / "poem.txt"
    old = make_poem(path, 5000, seed="old")
    server = serve_workers(
        start_server, "--poem", str(path), "--log-level", "debug",
        env=clean_env(NOTIFY_SOCKET=notify.path),
    )
    notify.wait_for("READY", "1")
    workers = worker_pids(server)
    address = server.address()
    assert set(fetch_from_each(server, workers, address).values()) == {old}

    new = make_poem(tmp_path / "next.txt", 7000, seed="new")
    os.replace(tmp_path / "next.txt", path)
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 2)
    assert fetch_from_each(server, workers, address) == {pid: new for pid in workers}

    log = server.log()
    assert f"fastpoetry[{server.pid}] INFO: received SIGHUP: reloading 1 poem in 2 workers\n" in log
    for pid in workers:
        assert f"fastpoetry[{pid}] INFO: received a reload request from the main process: reloading 1 poem\n" in log
        assert f"fastpoetry[{pid}] INFO: loaded a poem from: {path} (7000 bytes)\n" in log
    messages = notify.drain(0.05)
    first_ready = next(index for index, message in enumerate(messages) if "READY" in message)
    story = [m for m in messages[first_ready + 1 :] if "RELOADING" in m or "READY" in m]
    assert [("RELOADING" in m, m.get("READY")) for m in story] == [(True, None), (False, "1")]
    assert "(7000 bytes) on 1 socket with 2 workers; " in story[1]["STATUS"]
    assert "reload failed" not in story[1]["STATUS"]
    assert {message[SENDER] for message in messages} == {str(server.pid)}
    assert terminate(server) == 0
    assert not errors_of(server), server.log()


def test_failed_reload_keeps_the_old_poem_in_every_worker(
    start_server: StartServer, notify: SenderNotifySocket, tmp_path: Path
) -> None:
    """A poem that cannot be reloaded: every worker keeps the old one; STATUS says why until fixed."""
    path = tmp_path / "poem.txt"
    old = make_poem(path, 3000, seed="old")
    server = serve_workers(
        start_server, "--poem", str(path), "--log-level", "debug",
        env=clean_env(NOTIFY_SOCKET=notify.path),
    )
    notify.wait_for("READY", "1")
    workers = worker_pids(server)
    address = server.address()

    _replace_with(path, b"")
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 2)
    failure = f"cannot load a poem from {path}: the file is empty"
    status = notify.wait_for("READY", "1")["STATUS"]
    assert status.endswith(f"with 2 workers; 0 poems served; last reload failed: {failure}"), status
    errors = errors_of(server)
    assert sorted(int(re.search(r"fastpoetry\[(\d+)\]", line).group(1)) for line in errors) == sorted(workers)
    assert all(f"ERROR: reload failed, still serving the poems loaded before: {failure}" in line for line in errors)
    assert fetch_from_each(server, workers, address) == {pid: old for pid in workers}

    new = make_poem(tmp_path / "fixed.txt", 4000, seed="new")
    os.replace(tmp_path / "fixed.txt", path)
    server.send_signal(signal.SIGHUP)
    wait_for_count(server, READY, 3)
    status = notify.wait_for("READY", "1")["STATUS"]
    assert "reload failed" not in status and "(4000 bytes)" in status, status
    assert fetch_from_each(server, workers, address) == {pid: new for pid in workers}
    assert terminate(server) == 0


# -- start-up ------------------------------------------------------------------------


def _queued_clients(sock: socket.socket, number: int) -> list[socket.socket]:
    return [socket.create_connection(sock.getsockname(), timeout=WAIT) for _ in range(number)]


def test_bad_poem_at_start_exits_1_before_any_worker_exists(
    start_server: StartServer, notify: SenderNotifySocket
) -> None:
    """Exit 1 with one error, from the main process alone; clients waiting are turned away, as without workers."""
    with listening_socket() as sock:
        clients = _queued_clients(sock, 2)
        server = start_activated(
            start_server, [sock], "serve", "--workers", "2", "--poem", "/nonexistent/poem.txt",
            env=clean_env(NOTIFY_SOCKET=notify.path),
        )
        assert server.wait() == 1
        for client in clients:
            assert client.recv(1) == b""
            client.close()
    log = server.log()
    assert "Traceback" not in log, log
    assert errors_of(server) == [
        line for line in log.splitlines()
        if line.endswith("ERROR: cannot load a poem from /nonexistent/poem.txt: no such file or directory")
    ], log
    assert len(errors_of(server)) == 1
    assert "closed 2 connections waiting on" in log
    # Nothing but the main process ever wrote a line: no worker was forked.
    assert log_pids(server) == {server.pid}
    assert "worker" not in log
    messages = notify.drain(0.05)
    assert [m["STATUS"] for m in messages] == [
        "Failed to start: cannot load a poem from /nonexistent/poem.txt: no such file or directory"
    ]
    assert {m[SENDER] for m in messages} == {str(server.pid)}


# Loaded before fastpoetry by the interpreter (see site): the second fork
# fails, as it does when the unit's TasksMax= is reached.
_SECOND_FORK_FAILS = """
import errno, os
_fork, _forks = os.fork, []
def fork():
    _forks.append(None)
    if len(_forks) == 2:
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    return _fork()
os.fork = fork
"""


def test_a_worker_that_cannot_be_forked_stops_the_start(
    start_server: StartServer, notify: SenderNotifySocket, tmp_path: Path
) -> None:
    """The second fork fails: the first worker is stopped and waited for, exit 1, STATUS says why."""
    (tmp_path / "sitecustomize.py").write_text(_SECOND_FORK_FAILS)
    server = start_server(
        "serve", *LOCAL, "--workers", "2", "--poem", str(LANTERN),
        env=clean_env(NOTIFY_SOCKET=notify.path, PYTHONPATH=str(tmp_path)),
    )
    assert server.wait() == 1
    log = server.log()
    reason = "cannot start worker 2 of 2: resource temporarily unavailable"
    assert [line.split(": ", 1)[1] for line in errors_of(server)] == [reason], log
    assert "Traceback" not in log
    forked = log_pids(server) - {server.pid}
    assert len(forked) == 1, log
    first = forked.pop()
    assert f"fastpoetry[{first}] INFO: received a stop request from the main process: shutting down\n" in log
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # reaped by the main process before it exited
    messages = notify.drain(0.05)
    assert [m["STATUS"] for m in messages] == [f"Failed to start: {reason}"]


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed (package systemd)")
def test_socket_activation_with_workers(start_server: StartServer, notify: SenderNotifySocket) -> None:
    """systemd-socket-activate: the first client starts the server, whose workers serve the passed socket."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_server(
        "serve", "--workers", "2", "--poem", str(LEDGER), "--log-level", "debug",
        command=[
            SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={notify.path}",
            sys.executable, "-m", "fastpoetry",
        ],
    )
    replies: list[bytes] = []

    def first_client_served() -> bool:
        try:  # refused until the tool listens; the connection then starts the server
            replies.append(fetch(("127.0.0.1", port)))
        except ConnectionRefusedError:
            return False
        return True

    wait_until(first_client_served, "a first client served")
    assert replies == [LEDGER.read_bytes()]
    ready = notify.wait_for("READY", "1")
    assert ready[SENDER] == str(server.pid)
    assert "with 2 workers" in ready["STATUS"]
    assert "INFO: took 1 socket from systemd\n" in server.log()
    workers = worker_pids(server)
    assert fetch_from_each(server, workers, ("127.0.0.1", port)) == {pid: LEDGER.read_bytes() for pid in workers}
    assert terminate(server) == 0
    assert not errors_of(server), server.log()


# -- shutting down and dying ----------------------------------------------------------


def test_sigterm_stops_every_worker_and_exits_0(start_server: StartServer) -> None:
    """SIGTERM to the main process: each worker shuts down, then the main process exits 0."""
    server = serve_workers(start_server, "--poem", str(LANTERN))
    workers = worker_pids(server)
    with pidfds(workers) as fds:
        for _ in range(3):
            assert fetch(server.address()) == LANTERN.read_bytes()
        assert terminate(server) == 0
        assert [has_exited(fd) for fd in fds] == [True, True]
    log = server.log()
    assert f"fastpoetry[{server.pid}] INFO: received SIGTERM: shutting down\n" in log
    for pid in workers:
        assert f"fastpoetry[{pid}] INFO: received a stop request from the main process: shutting down\n" in log
        assert re.search(rf"fastpoetry\[{pid}\] INFO: shut down after serving \d+ poems? ", log), log
    size = LANTERN.stat().st_size
    assert f"fastpoetry[{server.pid}] INFO: shut down after serving 3 poems ({3 * size} bytes) with 2 workers\n" in log
    assert "Traceback" not in log and not errors_of(server), log


#: Larger than any socket buffer: it stays in flight while its client does not read.
BIG = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def big_poem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("big") / "big.txt"
    return path, make_poem(path, BIG, seed="big")


SlowClient = Callable[[tuple[str, int]], tuple[socket.socket, list[bytes]]]


@pytest.fixture
def slow_client() -> Iterator[SlowClient]:
    """Connect with a tiny receive buffer and read a little: a big poem is then in flight.

    Returns the socket and what was read, for the test to read the rest into.
    """
    clients: list[socket.socket] = []

    def connect(address: tuple[str, int]) -> tuple[socket.socket, list[bytes]]:
        sock = socket.socket()
        clients.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT)
        sock.connect(address)
        return sock, [sock.recv(4096)]

    yield connect
    for sock in clients:
        sock.close()


IN_FLIGHT = r"fastpoetry\[\d+\] INFO: shutting down: accepting no more clients, waiting up to 300 s for 1 poem in flight"


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM like systemctl stop", "SIGINT like Ctrl-C"]
)
def test_a_stop_sent_to_every_process_at_once_still_waits_for_poems_in_flight(
    start_server: StartServer,
    big_poem: tuple[Path, bytes],
    slow_client: SlowClient,
    signum: signal.Signals,
) -> None:
    """systemctl stop signals every process of the unit, Ctrl-C the whole process group:
    a worker then hears the stop twice (itself, and from the main process), which
    must not count as the second stop that ends the wait: the poem in flight arrives whole.
    """
    path, poem = big_poem
    server = serve_workers(
        start_server, "--poem", str(path), "--shutdown-timeout", "300", "--send-timeout", "300",
        start_new_session=True,  # a process group of its own, as a shell gives a command
    )
    client, received = slow_client(server.address())
    os.killpg(server.pid, signum)
    server.wait_for_log(IN_FLIGHT)
    read_to_end(client, received)
    assert b"".join(received) == poem
    assert server.wait() == 0
    log = server.log()
    assert "not waiting any longer" not in log, log
    assert "shutdown timeout" not in log
    assert re.search(rf"fastpoetry\[\d+\] INFO: shut down after serving 1 poem \({len(poem)} bytes\)\n", log), log
    assert "Traceback" not in log and not errors_of(server), log


@pytest.mark.slow
def test_a_second_sigterm_to_the_main_process_ends_the_workers_wait(
    start_server: StartServer,
    big_poem: tuple[Path, bytes],
    slow_client: SlowClient,
) -> None:
    """SIGTERM twice to the main process: the workers stop waiting for poems in flight."""
    path, poem = big_poem
    server = serve_workers(
        start_server, "--poem", str(path), "--shutdown-timeout", "300", "--send-timeout", "300"
    )
    client, received = slow_client(server.address())
    server.send_signal(signal.SIGTERM)
    server.wait_for_log(IN_FLIGHT)
    assert server.process.poll() is None
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    log = server.log()
    assert f"fastpoetry[{server.pid}] INFO: received SIGTERM again: telling the workers not to wait any longer\n" in log
    assert re.search(
        r"fastpoetry\[\d+\] INFO: received a stop request from the main process again: not waiting any longer\n", log
    ), log
    # The poem was cut off, and the client can tell: no clean end of stream.
    try:
        read_to_end(client, received)
    except ConnectionResetError:
        pass
    got = b"".join(received)
    assert len(got) < len(poem) and poem.startswith(got)
    assert "Traceback" not in log and not errors_of(server), log


@pytest.mark.slow
def test_a_worker_that_shuts_down_by_itself_first_does_not_hurry_the_other(
    start_server: StartServer,
    big_poem: tuple[Path, bytes],
    slow_client: SlowClient,
) -> None:
    """systemctl stop signals every process; a worker with nothing to wait for may be gone
    before the main process gets to its own SIGTERM.  That SIGTERM is its first, not a
    second one: the other worker's poem in flight still arrives whole, and the exit is 0.
    """
    path, poem = big_poem
    server = serve_workers(
        start_server, "--poem", str(path), "--shutdown-timeout", "300", "--send-timeout", "300",
        "--log-level", "debug",
    )
    busy, idle = worker_pids(server)
    with only_serving([busy, idle], busy):
        client, received = slow_client(server.address())
    assert served_by(server, client.getsockname()[1]) == busy
    os.kill(idle, signal.SIGTERM)
    server.wait_for_log(rf"INFO: worker 2 \(PID {idle}\) has shut down by itself: stopping the other workers\n")
    server.wait_for_log(IN_FLIGHT)
    server.send_signal(signal.SIGTERM)
    server.wait_for_log(r"INFO: received SIGTERM while shutting down already\n")
    read_to_end(client, received)
    assert b"".join(received) == poem
    assert server.wait() == 0
    log = server.log()
    assert "not waiting any longer" not in log, log
    assert "Traceback" not in log and not errors_of(server), log


def test_a_worker_killed_with_sigkill_stops_the_other_and_exits_70(
    start_server: StartServer, notify: SenderNotifySocket
) -> None:
    """kill -9 of a worker: the main process logs it, stops the other worker and exits 70 (restart)."""
    server = serve_workers(start_server, "--poem", str(LANTERN), env=clean_env(NOTIFY_SOCKET=notify.path))
    notify.wait_for("READY", "1")
    first, second = worker_pids(server)
    with pidfds([second]) as (survivor,):
        os.kill(first, signal.SIGKILL)
        assert server.wait() == 70
        assert has_exited(survivor)
    log = server.log()
    died = f"worker 1 (PID {first}) was killed by SIGKILL"
    assert errors_of(server) == [
        line for line in log.splitlines() if line.endswith(f"fastpoetry[{server.pid}] ERROR: {died}: stopping the other workers")
    ], log
    assert len(errors_of(server)) == 1
    assert f"fastpoetry[{second}] INFO: received a stop request from the main process: shutting down\n" in log
    assert f"fastpoetry[{second}] INFO: shut down after serving" in log
    assert "with 2 workers" not in log.split(died, 1)[1]  # no total: one worker's count died with it
    assert "Traceback" not in log
    stopping = notify.wait_for("STOPPING", "1")
    assert stopping["STATUS"] == f"Worker 1 (PID {first}) was killed by SIGKILL; stopping 1 worker"
    assert stopping[SENDER] == str(server.pid)


def test_workers_stop_when_the_main_process_is_killed(start_server: StartServer) -> None:
    """kill -9 of the main process: each worker sees its link close, and shuts down."""
    server = serve_workers(start_server, "--poem", str(LANTERN))
    workers = worker_pids(server)
    with pidfds(workers) as fds:
        os.kill(server.pid, signal.SIGKILL)
        assert server.wait() == -signal.SIGKILL
        wait_until(lambda: all(has_exited(fd) for fd in fds), "both workers exit")
    log = server.log()
    for pid in workers:
        assert f"fastpoetry[{pid}] WARNING: the main process (PID {server.pid}) is gone\n" in log
        assert f"fastpoetry[{pid}] INFO: received end of file from the main process: shutting down\n" in log
        assert f"fastpoetry[{pid}] INFO: shut down after serving" in log
    assert "Traceback" not in log


# -- the watchdog ------------------------------------------------------------------------


def test_watchdog_is_pinged_by_the_main_process_only_while_every_worker_reports(
    start_server: StartServer, notify: SenderNotifySocket
) -> None:
    """WATCHDOG=1 comes from the main process, and stops while a worker's event loop is stopped."""
    server = serve_workers(
        start_server, "--poem", str(LANTERN),
        env=clean_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="2000000"),
    )
    assert notify.wait_for("WATCHDOG", "1")[SENDER] == str(server.pid)
    assert "INFO: pinging the systemd watchdog every 1 s while every worker reports in\n" in server.log()
    first, _ = worker_pids(server)
    silent = rf"fastpoetry\[{server.pid}\] WARNING: worker 1 \(PID {first}\) has not reported for [\d.]+ s: not pinging the systemd watchdog\n"
    again = rf"fastpoetry\[{server.pid}\] INFO: worker 1 \(PID {first}\) reports again: pinging the systemd watchdog\n"
    silent_before, again_before = count_in_log(server, silent), count_in_log(server, again)

    os.kill(first, signal.SIGSTOP)
    try:
        wait_for_count(server, silent, silent_before + 1)
    finally:
        os.kill(first, signal.SIGCONT)
    wait_for_count(server, again, again_before + 1)
    notify.drain(0.01)
    seen = len(notify.messages)
    assert notify.wait_for("WATCHDOG", "1")[SENDER] == str(server.pid)
    assert len(notify.messages) > seen
    assert terminate(server) == 0
    assert {message[SENDER] for message in notify.drain(0.05)} == {str(server.pid)}


# -- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "abc", "-1", "65", "1.5", "\u0663"])
def test_a_bad_number_of_workers_is_a_usage_error(value: str) -> None:
    """--workers takes 1 to 64: anything else is one line on standard error and exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "fastpoetry", "serve", *LOCAL, f"--workers={value}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=clean_env(), timeout=WAIT,
    )
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "--workers" in lines[0] and repr(value) in lines[0] and "1 to 64" in lines[0], lines[0]


def test_serve_help_says_what_workers_do() -> None:
    """serve --help explains --workers, and that more workers than cores do not help."""
    result = subprocess.run(
        [sys.executable, "-m", "fastpoetry", "serve", "--help"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=clean_env(), timeout=WAIT,
    )
    assert result.returncode == 0, result
    text = " ".join(result.stdout.split())
    assert "--workers N serve from N processes that share the sockets" in text, text
    assert "N should not exceed the cores" in text
    assert "exits with status 70" in text


def test_the_proxy_has_no_workers() -> None:
    """Each worker of a proxy would fetch the upstream itself: proxy has no --workers."""
    result = subprocess.run(
        [sys.executable, "-m", "fastpoetry", "proxy", "--upstream", "127.0.0.1:9", "--workers", "2"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=clean_env(), timeout=WAIT,
    )
    assert result.returncode == 2, result
    assert "unrecognized arguments: --workers 2" in result.stderr

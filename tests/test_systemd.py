"""fastpoetry.systemd, and what a running server tells systemd.

Notifications go to a NOTIFY_SOCKET the test owns; journal records go to a
journal socket the test owns, bind-mounted over /run/systemd in a private
mount namespace (that needs root, as CI has).
"""

from __future__ import annotations

import logging
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (
    ACTIVATE,
    DEFAULT_POEM,
    POEMS,
    WAIT,
    NotifySocket,
    clean_env,
    fetch,
    listening_socket,
    start_activated,
)
from fastpoetry import systemd

LEDGER = POEMS / "harbour-ledger.txt"


@pytest.fixture
def notify_env(monkeypatch: pytest.MonkeyPatch, notify_socket: NotifySocket) -> NotifySocket:
    """NOTIFY_SOCKET points at the test's socket for in-process calls."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setattr(systemd, "_notify_failed", False)
    return notify_socket


# -- notifications, in process ---------------------------------------------


def test_notify_ready_sends_ready_and_status(notify_env: NotifySocket) -> None:
    """READY=1 goes out together with the status line."""
    systemd.notify_ready("Serving a poem")
    assert notify_env.wait_for("READY") == {"READY": "1", "STATUS": "Serving a poem"}


def test_notify_reloading_sends_a_monotonic_timestamp(notify_env: NotifySocket) -> None:
    """RELOADING=1 carries MONOTONIC_USEC taken from CLOCK_MONOTONIC."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    systemd.notify_reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = notify_env.wait_for("RELOADING")
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_notify_stopping_status_and_watchdog(notify_env: NotifySocket) -> None:
    """STOPPING=1, STATUS= and WATCHDOG=1 each arrive as sent."""
    systemd.notify_status("Half way")
    systemd.notify_watchdog()
    systemd.notify_stopping("Bye")
    assert notify_env.wait_for("STATUS", "Half way") == {"STATUS": "Half way"}
    assert notify_env.wait_for("WATCHDOG") == {"WATCHDOG": "1"}
    assert notify_env.wait_for("STOPPING") == {"STOPPING": "1", "STATUS": "Bye"}


def test_notify_reaches_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name (the abstract namespace) works as systemd uses it."""
    name = f"fastpoetry-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        systemd.notify_watchdog()
        assert sock.recv(1024) == b"WATCHDOG=1"


def test_notify_without_notify_socket_does_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Outside systemd, notifying is silently a no-op: sd_notify is not even called."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    # libsystemd's sd_notify sends nothing without NOTIFY_SOCKET either, so
    # no socket could tell; what shows that fastpoetry stops first is that
    # it never calls it, and never takes the descriptor it keeps in reserve
    # for it (no test before may have taken it: start from none).
    calls: list[str] = []
    monkeypatch.setattr("systemd.daemon.notify", lambda message, *args, **kwargs: calls.append(message))
    monkeypatch.setattr(systemd, "_reserve", None)
    monkeypatch.setattr(systemd, "_notify_failed", False)
    caplog.set_level(logging.DEBUG, logger="fastpoetry")
    systemd.notify_ready("nobody listens")
    systemd.notify_reloading()
    systemd.notify_status("nobody")
    systemd.notify_watchdog()
    systemd.notify_stopping("bye")
    reserve = systemd._reserve
    if reserve is not None:  # opened all the same: do not leak it into later tests
        os.close(reserve)
    assert calls == []
    assert reserve is None, "a descriptor was set aside for notifications that cannot be sent"
    assert caplog.records == []


def test_notify_to_a_missing_socket_warns_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NOTIFY_SOCKET that does not exist costs one warning, not an exception."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nowhere"))
    monkeypatch.setattr(systemd, "_notify_failed", False)
    caplog.set_level(logging.WARNING, logger="fastpoetry")
    systemd.notify_ready("one")
    systemd.notify_status("two")
    warnings = [r.getMessage() for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1
    assert str(tmp_path / "nowhere") in warnings[0]


# -- the watchdog setting ----------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("3000000", None, 1.5),
        ("3000000", "self", 1.5),
        ("3000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """Half of WATCHDOG_USEC, and only if WATCHDOG_PID is unset or ours."""
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getppid())}.get(value, value)
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval() == expected


# -- socket activation, in a child process ---------------------------------

_PROBE = r"""
import fcntl, json, os
from fastpoetry import systemd
try:
    result = {"fds": systemd.listen_sockets()}
except systemd.ActivationError as exc:
    result = {"error": str(exc)}
result["left"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
result["cloexec"] = [bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in result.get("fds", {})]
print(json.dumps(result))
"""


def _probe(sockets: list[socket.socket], **variables: str) -> dict[str, object]:
    """Run listen_sockets() in a child that was passed ``sockets`` at fd 3, 4..."""
    import json

    wrapper = (
        "import fcntl, os, sys\n"
        "fds = [int(x) for x in os.environ.pop('TEST_PASS_FDS').split(',') if x]\n"
        "high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]\n"
        "[os.dup2(fd, 3 + i) for i, fd in enumerate(high)]\n"
        "os.environ.setdefault('LISTEN_PID', str(os.getpid()))\n"
        "if os.environ['LISTEN_PID'] == 'parent': os.environ['LISTEN_PID'] = str(os.getppid())\n"
        f"exec({_PROBE!r})\n"
    )
    env = clean_env(TEST_PASS_FDS=",".join(str(s.fileno()) for s in sockets), **variables)
    output = subprocess.run(
        [sys.executable, "-c", wrapper],
        env=env,
        pass_fds=[s.fileno() for s in sockets],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    ).stdout
    return json.loads(output)


def test_listen_sockets_returns_names_and_cleans_up() -> None:
    """Named descriptors come back as {fd: name}, close-on-exec, variables gone."""
    with listening_socket() as one, listening_socket() as two:
        result = _probe([one, two], LISTEN_FDS="2", LISTEN_FDNAMES="ledger:lantern")
    assert result["fds"] == {"3": "ledger", "4": "lantern"}
    assert result["cloexec"] == [True, True]
    assert result["left"] == []


def test_listen_sockets_without_names_calls_them_unknown() -> None:
    """Without LISTEN_FDNAMES every socket is named as systemd names it."""
    with listening_socket() as one:
        result = _probe([one], LISTEN_FDS="1")
    assert result["fds"] == {"3": "unknown"}  # systemd-socket-activate without --fdname


def test_listen_sockets_for_another_process_are_ignored() -> None:
    """LISTEN_PID of another process means the sockets are not ours."""
    with listening_socket() as one:
        result = _probe([one], LISTEN_FDS="1", LISTEN_PID="parent")
    assert result["fds"] == {}


@pytest.mark.parametrize("value", ["many", "-3", ""])
def test_listen_sockets_with_garbage_is_a_clear_error(value: str) -> None:
    """A LISTEN_FDS that is not a count is reported, naming the variable."""
    with listening_socket() as one:
        result = _probe([one], LISTEN_FDS=value)
    if value == "":
        # sd_listen_fds(3) treats an empty LISTEN_FDS like none at all.
        assert result.get("fds", {}) == {} or "LISTEN_FDS" in result["error"]
        return
    assert "LISTEN_FDS=" in result["error"] and repr(value) in result["error"]


# -- what a running server sends -------------------------------------------


def test_server_notifies_ready_status_reloading_stopping(
    start_server, notify_socket: NotifySocket, tmp_path: Path
) -> None:
    """The whole life of an activated server, as systemd sees it."""
    poem = tmp_path / "poem.txt"
    shutil.copy(LEDGER, poem)
    with listening_socket() as sock:
        server = start_activated(
            start_server, [sock], "serve", "--poem", str(poem),
            env=clean_env(NOTIFY_SOCKET=notify_socket.path),
        )
        ready = notify_socket.wait_for("READY")
        assert ready["STATUS"].startswith(f"Serving poem.txt ({LEDGER.stat().st_size} bytes) on 1 socket")
        assert fetch(sock.getsockname()) == LEDGER.read_bytes()

        server.send_signal(signal.SIGHUP)
        assert notify_socket.wait_for("RELOADING")["RELOADING"] == "1"
        assert notify_socket.wait_for("READY")["READY"] == "1"

        server.send_signal(signal.SIGTERM)
        stopping = notify_socket.wait_for("STOPPING")
        assert stopping["STATUS"].startswith("Shutting down")
        assert server.wait() == 0
    keys = [next(iter(m)) for m in notify_socket.drain()]
    order = [k for k in keys if k in ("READY", "RELOADING", "STOPPING")]
    assert order == ["READY", "RELOADING", "READY", "STOPPING"]


def test_server_status_counts_poems_served(
    serve_foreground, notify_socket: NotifySocket
) -> None:
    """The STATUS line comes up to date with the number of poems served."""
    server = serve_foreground("--poem", str(LEDGER), env=clean_env(NOTIFY_SOCKET=notify_socket.path))
    for _ in range(3):
        fetch(server.address())
    status = notify_socket.wait_for("STATUS", "Serving harbour-ledger.txt "
                                    f"({LEDGER.stat().st_size} bytes) on 1 socket; 3 poems served")
    assert "READY" not in status


def test_server_pings_the_watchdog_it_is_given(start_server, notify_socket: NotifySocket) -> None:
    """With WATCHDOG_USEC for its own pid, WATCHDOG=1 keeps coming."""
    with listening_socket() as sock:
        server = start_activated(
            start_server, [sock], "serve",
            env=clean_env(NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="200000"),
        )
        for _ in range(5):
            notify_socket.wait_for("WATCHDOG")
        server.wait_for_log("pinging the systemd watchdog every 0.1 s")
        assert server.send_signal(signal.SIGTERM) is None and server.wait() == 0


def test_server_ignores_a_watchdog_meant_for_another_process(
    start_server, notify_socket: NotifySocket
) -> None:
    """WATCHDOG_PID of another process: no pings, as sd_watchdog_enabled(3) says."""
    with listening_socket() as sock:
        server = start_activated(
            start_server, [sock], "serve",
            env=clean_env(
                NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="200000", WATCHDOG_PID="1"
            ),
        )
        notify_socket.wait_for("READY")
        fetch(sock.getsockname())  # the loop has gone round a few times
        server.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING")
        assert server.wait() == 0
    assert not [m for m in notify_socket.drain() if "WATCHDOG" in m]


def test_server_survives_a_missing_notify_socket(serve_foreground, tmp_path: Path) -> None:
    """A NOTIFY_SOCKET that points nowhere: one warning, and poems are served."""
    server = serve_foreground(env=clean_env(NOTIFY_SOCKET=str(tmp_path / "gone")))
    assert fetch(server.address())
    server.wait_for_log("WARNING: cannot notify systemd at NOTIFY_SOCKET=.*gone: no such file")
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    assert server.log().count("cannot notify systemd") == 1
    assert "Traceback" not in server.log()


# -- the journal ---------------------------------------------------------------


def _parse_journal_datagram(data: bytes) -> dict[str, str]:
    """Decode journald's native protocol (systemd.journal-fields(7), sd_journal_sendv)."""
    fields: dict[str, str] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = rest
        else:  # KEY\n, 64-bit little-endian length, value, \n
            key = line
            (size,) = struct.unpack("<Q", rest[:8])
            value, data = rest[8 : 8 + size], rest[9 + size :]
        fields[key.decode()] = value.decode()
    return fields


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true",
    reason="needs root to bind-mount a journal socket in a private mount namespace",
)


@needs_root
@pytest.mark.parametrize("behind", [False, True], ids=["direct", "behind a balancer"])
def test_server_logs_to_the_journal_with_fields(tmp_path: Path, behind: bool) -> None:
    """Under systemd, records reach journald with priority and POEM/PEER/BYTES.

    Behind a balancer (--proxy-protocol), PEER= is the client its header
    names and BALANCER= the connection's own peer.
    """
    run = tmp_path / "run"
    (run / "journal").mkdir(parents=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(run / "journal" / "socket"))
    journal.settimeout(WAIT)
    with journal, listening_socket() as sock:
        stderr = open(tmp_path / "stderr", "wb")
        info = os.fstat(stderr.fileno())
        env = clean_env(JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        env["TEST_PASS_FDS"] = str(sock.fileno())
        env["LISTEN_FDS"] = "1"
        env["LISTEN_FDNAMES"] = "ledger"
        process = subprocess.Popen(
            [
                "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /run/systemd && exec "$@"', str(run),
                sys.executable, "-c", ACTIVATE,
                "serve", "--log-level", "debug", "--poem", f"ledger={LEDGER}",
                *(["--proxy-protocol"] if behind else []),
            ],
            env=env, pass_fds=[sock.fileno()], stdout=stderr, stderr=stderr,
        )
        try:
            records = []
            while not any(r["MESSAGE"].startswith("ready:") for r in records):
                records.append(_parse_journal_datagram(journal.recv(65536)))
            if behind:
                with socket.create_connection(sock.getsockname(), timeout=WAIT) as client:
                    balancer = "%s:%d" % client.getsockname()
                    client.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40123 10000\r\n")
                    poem = b"".join(iter(lambda: client.recv(65536), b""))
            else:
                poem = fetch(sock.getsockname())
            assert poem == LEDGER.read_bytes()
            while not any(r["MESSAGE"].startswith("sending") for r in records):
                records.append(_parse_journal_datagram(journal.recv(65536)))
        finally:
            process.send_signal(signal.SIGTERM)
            status = process.wait(WAIT)
            stderr.close()
    assert status == 0
    by_start = {r["MESSAGE"].split(":")[0]: r for r in records}
    loaded = by_start["loaded a poem from"]
    assert loaded["POEM"] == "ledger" and loaded["POEM_FILE"] == str(LEDGER)
    assert loaded["BYTES"] == str(LEDGER.stat().st_size)
    assert loaded["PRIORITY"] == "6" and loaded["SYSLOG_IDENTIFIER"] == "fastpoetry"
    sending = next(r for r in records if r["MESSAGE"].startswith("sending"))
    assert sending["PRIORITY"] == "7"
    if behind:
        assert sending["PEER"] == "198.51.100.7:40123" and sending["BALANCER"] == balancer
    else:
        assert sending["PEER"].startswith("127.0.0.1:") and "BALANCER" not in sending
    assert sending["BYTES"] == str(LEDGER.stat().st_size)
    assert (tmp_path / "stderr").read_bytes() == b""  # nothing went to plain stderr


def test_stderr_is_journal_only_for_the_very_stream(tmp_path: Path) -> None:
    """JOURNAL_STREAM counts only if stderr is still that device and inode."""
    probe = "from fastpoetry import systemd; print(systemd.stderr_is_journal())"
    with open(tmp_path / "stream", "wb") as stream:
        info = os.fstat(stream.fileno())
        same = clean_env(JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
        other = clean_env(JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino + 1}")
        for env, expected in ((same, "True"), (other, "False"), (clean_env(), "False")):
            out = subprocess.run(
                [sys.executable, "-c", probe], env=env, stderr=stream,
                stdout=subprocess.PIPE, text=True, timeout=WAIT, check=True,
            ).stdout.strip()
            assert out == expected


#: RLIMIT_NOFILE of the server in the watchdog test: a few dozen more
#: descriptors than it uses without clients, so that idle clients take them all.
SMALL_NOFILE = 64

#: WATCHDOG=1 messages that must arrive while the descriptors are all taken.
#: More than one, because one may have been sent just before.
PINGS = 3


def test_watchdog_is_pinged_while_idle_clients_hold_every_descriptor(
    start_server, notify_socket: NotifySocket  # type: ignore[no-untyped-def]
) -> None:
    """Out of descriptors because idle clients hold them all, the server keeps
    pinging the watchdog, so systemd does not kill a server that is only busy.

    sd_notify(3) opens a socket per message; without the descriptor fastpoetry
    keeps in reserve for it, the ping failed ("cannot notify systemd ...:
    too many open files") and the packaged unit's WatchdogSec= killed it.
    """
    server = start_server(
        # --linger always: a quiet client that has its poem keeps its
        # descriptor (under auto it would be closed at once, costing none).
        "serve", "--iface", "127.0.0.1", "--port", "0", "--send-timeout", "3600", "--linger", "always",
        # Pings every 0.5 s: half of WATCHDOG_USEC.
        env=clean_env(NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="1000000"),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (SMALL_NOFILE, SMALL_NOFILE)),
    )
    notify_socket.wait_for("READY", "1")
    notify_socket.wait_for("WATCHDOG", "1")
    address = server.address()

    # Twice as many idle clients as the server has descriptors: the kernel
    # queues the ones it cannot accept.
    idle = [socket.create_connection(address, timeout=WAIT) for _ in range(2 * SMALL_NOFILE)]
    try:
        server.wait_for_log(r"WARNING: cannot accept connections on .*: too many open files")
        pings = 0
        deadline = time.monotonic() + WAIT
        while pings < PINGS and "cannot notify systemd" not in server.log():
            assert time.monotonic() < deadline, f"no WATCHDOG=1 and no failure within {WAIT} s:\n{server.log()}"
            try:
                notify_socket.wait_for("WATCHDOG", "1", timeout=0.1)
            except AssertionError:  # nothing yet: look at the log again
                continue
            pings += 1
        # Still out of descriptors, so the pings came from the exhausted
        # server: some idle clients are still queued, without their poem.
        queued = select.poll()
        for sock in idle:
            queued.register(sock, select.POLLIN)
        assert len(queued.poll(0)) < len(idle), server.log()
        assert "cannot notify systemd" not in server.log(), server.log()
        assert pings == PINGS, server.log()
    finally:
        for sock in idle:
            sock.close()
    assert fetch(address) == DEFAULT_POEM.read_bytes()

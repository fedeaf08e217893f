"""Shared test helpers: real clients, real server processes, a real NOTIFY_SOCKET.

A plain module, not a conftest: test modules import what they use from it
(``from helpers import ...``), and ``conftest.py`` keeps only the fixtures
and hooks, built on these.  It is importable as ``helpers`` because
``tests/`` has no ``__init__.py``: pytest's default (prepend) import mode
puts that directory first on ``sys.path`` when it imports ``conftest.py``
or any test module here.

Every wait below has a generous limit (``WAIT``) that only turns a hang
into a failure; no test asserts how fast anything is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from fastpoetry.listeners import bind
from fastpoetry.stream import StreamServer

REPO = Path(__file__).resolve().parent.parent
POEMS = REPO / "poems"
DEFAULT_POEM = REPO / "src" / "fastpoetry" / "default-poem.txt"

#: Seconds after which a wait is a failure (a hang guard, not a speed limit).
WAIT = 30.0

# Variables a parent systemd may have set for the test runner itself; a
# server started by a test must only see the ones the test gives it.
_SYSTEMD_VARIABLES = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "RUNTIME_DIRECTORY",
)


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound on this host."""
    """Whether this host can bind ::1 (a container may have no IPv6 at all)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


#: Skip a test that needs ::1 on a host without IPv6.
needs_ipv6 = pytest.mark.skipif(
    not has_ipv6_loopback(), reason="this host has no IPv6 loopback (::1 cannot be bound)"
)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child server: ours, minus systemd's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARIABLES}
    env.update(extra)
    return env


def fetch(
    address: object,
    family: int = socket.AF_INET,
    send: bytes = b"",
    timeout: float = WAIT,
) -> bytes:
    """Connect, optionally send ``send``, read to EOF, return what came."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        if send:
            sock.sendall(send)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def make_poem(path: Path, size: int, seed: str = "verse") -> bytes:
    """Write a UTF-8 poem of exactly ``size`` bytes whose lines are numbered.

    Numbered lines make a truncated or mixed poem show up as a mismatch.
    """
    lines = []
    total = 0
    number = 0
    while total < size:
        line = f"{seed} {number:08d}: the ferryman counts the lamps again\n"
        lines.append(line)
        total += len(line)
        number += 1
    text = "".join(lines).encode()[:size]
    if not text.endswith(b"\n"):
        text = text[:-1] + b"\n"
    path.write_bytes(text)
    return text


class NotifySocket:
    """A NOTIFY_SOCKET owned by the test: an AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        #: Every message received so far, each as ``{KEY: VALUE}``.
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        """Close the socket (its path stays; it lives in a test's tmp_path)."""
        self.sock.close()

    def _receive(self, timeout: float) -> dict[str, str] | None:
        """One message as ``{KEY: VALUE}``, also kept in ``messages``; None after ``timeout`` s."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        fields = dict(
            line.split("=", 1) for line in data.decode().splitlines() if "=" in line
        )
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, value: str | None = None, timeout: float = WAIT) -> dict[str, str]:
        """Receive messages until one sets ``key`` (to ``value``, if given)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self._receive(left)
            if message is not None and key in message and value in (None, message[key]):
                return message
        raise AssertionError(f"no {key}={value or '...'} within {timeout} s; got {self.messages}")

    def drain(self, quiet: float = 0.2) -> list[dict[str, str]]:
        """Receive until nothing has come for ``quiet`` seconds."""
        while self._receive(quiet) is not None:
            pass
        return self.messages


class Server:
    """A ``fastpoetry serve`` process; its standard error goes to a file."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        **popen: object,
    ) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")
        argv = (command or [sys.executable, "-m", "fastpoetry"]) + list(args)
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env if env is not None else clean_env(),
            **popen,  # type: ignore[arg-type]
        )

    @property
    def pid(self) -> int:
        """The server's process ID."""
        return self.process.pid

    def log(self) -> str:
        """Everything it has written so far (standard output and error)."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (a regular expression)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            if self.process.poll() is not None:
                match = re.search(pattern, self.log())
                if match:
                    return match
                raise AssertionError(
                    f"server exited ({self.process.returncode}) before logging {pattern!r}:\n{self.log()}"
                )
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} in the log within {timeout} s:\n{self.log()}")

    def wait_ready(self) -> None:
        """Wait until it logs that it is ready."""
        self.wait_for_log(r"INFO: ready: ")

    def address(self) -> tuple[str, int]:
        """The first TCP address it said it serves on."""
        match = self.wait_for_log(r"serving .* on (\d+\.\d+\.\d+\.\d+):(\d+)")
        return match.group(1), int(match.group(2))

    def send_signal(self, signum: int) -> None:
        """Send it signal ``signum``."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> int:
        """Wait for it to exit and return its status."""
        return self.process.wait(timeout)

    def close(self) -> None:
        """Kill it if it still runs, and close its log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)
        self._log_file.close()


def terminate(server: Server) -> int:
    """SIGTERM the server and return its exit status."""
    server.send_signal(signal.SIGTERM)
    return server.wait()


# Run as the child of a socket-activated server: move the passed sockets to
# descriptors 3, 4, ... (sd_listen_fds(3) expects them there) and close the
# copies they came in on, as systemd passes each socket once; set LISTEN_PID
# to this process, which exec keeps, and become the server.
ACTIVATE = r"""
import fcntl, os, sys
fds = [int(fd) for fd in os.environ.pop("TEST_PASS_FDS").split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
for fd in fds:  # the originals, unless a copy now sits on them
    if fd >= 3 + len(fds):
        os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "fastpoetry", *sys.argv[1:]])
"""


def start_activated(
    start_server: Callable[..., Server],
    sockets: list[socket.socket],
    *args: str,
    names: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """Start ``fastpoetry ARGS`` the way systemd would, passing ``sockets``.

    LISTEN_FDS, LISTEN_PID and (with ``names``) LISTEN_FDNAMES are set as
    systemd sets them; the test keeps its own copy of every socket, as
    systemd does.
    """
    variables = dict(env if env is not None else clean_env())
    variables["LISTEN_FDS"] = str(len(sockets))
    variables["TEST_PASS_FDS"] = ",".join(str(sock.fileno()) for sock in sockets)
    if names is not None:
        variables["LISTEN_FDNAMES"] = ":".join(names)
    return start_server(
        *args,
        env=variables,
        command=[sys.executable, "-c", ACTIVATE],
        pass_fds=[sock.fileno() for sock in sockets],
    )


def has_waiting_connection(sock: socket.socket) -> bool:
    """Whether a connection waits in ``sock``'s accept queue (taking it if so)."""
    sock.setblocking(False)
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def listening_socket(family: int = socket.AF_INET, address: object = ("127.0.0.1", 0), backlog: int = 16) -> socket.socket:
    """A listening stream socket, as a socket unit would create it."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(backlog)
    return sock


# -- a system where the name localhost resolves to nothing -------------------------

# Run by unshare in the new namespaces: bring their loopback up (without
# IPv6 if asked), hide /etc/hosts and any resolver but it, say so, and
# wait to be killed.  nsswitch.conf is replaced too: DNS, nss-myhostname
# and nss-resolve would each answer for localhost on their own.
_HIDE_LOCALHOST = r"""
set -e
ip link set lo up
if [ "$NO_IPV6" = 1 ]; then
    sysctl -q -w net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.lo.disable_ipv6=1
fi
mount --bind "$EMPTY_HOSTS" /etc/hosts
mount --bind "$FILES_ONLY_NSSWITCH" /etc/nsswitch.conf
echo ready
exec sleep infinity
"""

# Run inside: a plain client of the protocol that looks nothing up.
_FETCH_LITERAL = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as sock:
    while chunk := sock.recv(65536):
        sys.stdout.buffer.write(chunk)
"""


class NoLocalhost:
    """Namespaces of their own in which the name ``localhost`` resolves to nothing.

    As in a Debian root made by debootstrap --variant=minbase, which has no
    /etc/hosts: here /etc/hosts is empty and nsswitch.conf looks host names
    up in it alone.  The network namespace is new as well, with nothing but
    its loopback (127.0.0.1 and ::1, or 127.0.0.1 alone with ``ipv6``
    false), so the default ports are free and nothing of the host answers
    on them.  Processes enter with :meth:`command`; the namespaces last as
    long as any process is in them.
    """

    def __init__(self, directory: Path, ipv6: bool = True) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts").write_text("")
        (directory / "nsswitch.conf").write_text("hosts: files\n")
        env = clean_env(
            EMPTY_HOSTS=str(directory / "hosts"),
            FILES_ONLY_NSSWITCH=str(directory / "nsswitch.conf"),
            NO_IPV6="" if ipv6 else "1",
        )
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--net", "sh", "-c", _HIDE_LOCALHOST],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self.holder.stdout is not None
        ready, _, _ = select.select([self.holder.stdout], [], [], WAIT)
        if not ready or self.holder.stdout.readline() != b"ready\n":
            self.holder.kill()
            _, errors = self.holder.communicate(timeout=WAIT)
            raise NamespacesUnavailable(
                f"cannot make a network and mount namespace without localhost: "
                f"{errors.decode(errors='replace').strip() or 'no reason given'}"
            )
        # The point of it all: make sure, or every test here proves nothing.
        probe = subprocess.run(
            self.command(sys.executable, "-c", "import socket; socket.getaddrinfo('localhost', 0)"),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT, check=False,
        )
        if probe.returncode == 0 or "gaierror" not in probe.stderr:
            self.close()
            raise AssertionError(f"localhost still resolves in the namespaces: {probe}")

    def command(self, *argv: str) -> list[str]:
        """``argv``, run inside the namespaces (nsenter execs it: same PID, same signals)."""
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--mount", "--", *argv]

    def run(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside to completion (WAIT is a hang guard)."""
        return subprocess.run(
            self.command(*argv),
            stdin=subprocess.DEVNULL, capture_output=True, env=clean_env(), timeout=WAIT, check=False,
        )

    def fetch(self, host: str, port: int) -> bytes:
        """What a plain client inside gets from the literal address ``host``:``port``."""
        result = self.run(sys.executable, "-c", _FETCH_LITERAL, host, str(port), str(WAIT))
        assert result.returncode == 0, result
        return result.stdout

    def close(self) -> None:
        """End the namespaces by killing the process that holds them."""
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.communicate(timeout=WAIT)


class NamespacesUnavailable(Exception):
    """This host (a container, say) does not let us make the namespaces."""


# -- waiting -----------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any], what: str, timeout: float = WAIT, interval: float = 0.02
) -> Any:
    """Poll ``predicate()`` until it is true and return that value; fail after ``timeout`` s."""
    # A hang guard, not a speed limit: ``what`` says in the failure what never happened.
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


async def wait_until_async(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """In a trio task, wait until ``condition()`` is true; fail after ``timeout`` s."""
    # Sleeping in trio, not in time.sleep, lets the tasks that make the
    # condition true run in between; polled often, as they are in-process.
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


# -- watching a server process from outside ------------------------------------------


def open_fds(pid: int) -> list[str]:
    """Process ``pid``'s open descriptors, in order, each as ``"N -> target"`` (readlink)."""
    fds = []
    # Sorted numerically, so that two listings printed in a failure line up.
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            fds.append(f"{name} -> {os.readlink(f'/proc/{pid}/fd/{name}')}")
        except FileNotFoundError:  # closed between listdir and readlink
            pass
    return fds


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` has listening sockets on (from /proc)."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except FileNotFoundError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # TCP_LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def count_in_log(server: Server, pattern: str) -> int:
    """How often ``pattern`` occurs in the server's log so far."""
    return len(re.findall(pattern, server.log()))


def wait_for_count(server: Server, pattern: str, count: int) -> None:
    """Wait until ``pattern`` occurs ``count`` times in the server's log."""
    # Stop waiting early if the server exits: the assert then shows its log.
    wait_until(
        lambda: count_in_log(server, pattern) >= count or server.process.poll() is not None,
        f"{count} x {pattern!r}",
    )
    assert count_in_log(server, pattern) >= count, server.log()


# -- clients -----------------------------------------------------------------------


def fetch_from(address: tuple[str, int]) -> tuple[bytes, int]:
    """Fetch a poem; also return the client's own port."""
    with socket.socket() as sock:
        sock.settimeout(WAIT)
        sock.connect(address)
        port = sock.getsockname()[1]
        chunks: list[bytes] = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), port


def read_to_end(sock: socket.socket, chunks: list[bytes]) -> None:
    """Receive until the end of the stream, appending to ``chunks``."""
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)


@contextmanager
def catch_records(logger: logging.Logger, level: int = logging.DEBUG) -> Iterator[list[logging.LogRecord]]:
    """The records ``logger`` logs at ``level`` and above while the block runs, whatever else configured logging."""
    saved = logger.level, logger.disabled
    caught: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            caught.append(record)

    handler = Catch(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.disabled = False
    try:
        yield caught
    finally:
        logger.removeHandler(handler)
        logger.level, logger.disabled = saved


@asynccontextmanager
async def serving_stream(
    source: object, listeners: list[socket.socket] | None = None, **options: Any
) -> AsyncIterator[StreamServer]:
    """A started StreamServer (on 127.0.0.1, a free port, unless given listeners), stopped on the way out.

    ``options`` are StreamServer's; ``send_timeout`` defaults to WAIT.
    """
    options.setdefault("send_timeout", WAIT)
    server = StreamServer(source, listeners if listeners is not None else bind("127.0.0.1", 0), **options)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        try:
            yield server
        finally:
            with trio.fail_after(WAIT):
                await server.stop()


# -- TLS --------------------------------------------------------------------------------


@dataclass
class Pair:
    """A certificate and key on disk, as the server is given them, and the CA that signed them."""

    cert: Path
    key: Path
    ca: trustme.CA

    @property
    def fingerprint(self) -> str:
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
        return hashlib.sha256(der).digest().hex(":").upper()

    def key_lines(self) -> list[str]:
        """The base64 lines of the key: none may ever appear in a log or a message."""
        return [line for line in self.key.read_text().splitlines() if line and not line.startswith("-----")]


def make_pair(folder: Path, name: str = "server", ca: trustme.CA | None = None, *hosts: str) -> Pair:
    """A certificate (for ``hosts``: localhost and its addresses by default) and key, signed by ``ca`` or a new CA."""
    ca = ca or trustme.CA()
    issued = ca.issue_cert(*(hosts or ("localhost", "127.0.0.1", "::1")))
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    for pem in issued.cert_chain_pems[1:]:
        pem.write_to_path(str(cert), append=True)
    issued.private_key_pem.write_to_path(str(key))
    return Pair(cert, key, ca)

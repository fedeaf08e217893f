"""Shared helpers: real clients, real server processes, a real NOTIFY_SOCKET.

Every wait below has a generous limit (``WAIT``) that only turns a hang
into a failure; no test asserts how fast anything is.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

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


def _has_ipv6_loopback() -> bool:
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
    not _has_ipv6_loopback(), reason="this host has no IPv6 loopback (::1 cannot be bound)"
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
        self.sock.close()

    def _receive(self, timeout: float) -> dict[str, str] | None:
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


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


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
        return self.process.pid

    def log(self) -> str:
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
        self.wait_for_log(r"INFO: ready: ")

    def address(self) -> tuple[str, int]:
        """The first TCP address it said it serves on."""
        match = self.wait_for_log(r"serving .* on (\d+\.\d+\.\d+\.\d+):(\d+)")
        return match.group(1), int(match.group(2))

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = WAIT) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)
        self._log_file.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[object]:
    """Start ``fastpoetry ARGS...``; every server is killed at teardown."""
    servers: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None, **popen: object) -> Server:
        server = Server(list(args), tmp_path / f"server-{len(servers)}.log", env=env, **popen)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def serve_foreground(start_server):  # type: ignore[no-untyped-def]
    """Start ``fastpoetry serve`` on 127.0.0.1, a free port; wait until ready."""

    def serve(*args: str, env: dict[str, str] | None = None) -> Server:
        server = start_server("serve", "--iface", "127.0.0.1", "--port", "0", *args, env=env)
        server.wait_ready()
        return server

    return serve


def terminate(server: Server) -> int:
    """SIGTERM the server and return its exit status."""
    server.send_signal(signal.SIGTERM)
    return server.wait()


# Run as the child of a socket-activated server: move the passed sockets to
# descriptors 3, 4, ... (sd_listen_fds(3) expects them there) and close the
# copies they came in on, as systemd passes each socket once; set LISTEN_PID
# to this process, which exec keeps, and become the server.
_ACTIVATE = r"""
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
    start_server,  # type: ignore[no-untyped-def]
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
        command=[sys.executable, "-c", _ACTIVATE],
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
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.communicate(timeout=WAIT)


class NamespacesUnavailable(Exception):
    """This host (a container, say) does not let us make the namespaces."""


@pytest.fixture
def no_localhost(tmp_path: Path) -> Iterator[Callable[..., NoLocalhost]]:
    """Make NoLocalhost(ipv6=True) namespaces; closed at teardown.

    Making namespaces and mounting take root: without it, or without
    unshare, nsenter and ip, the test skips, except under CI=true, where it
    fails instead.
    """
    ci = os.environ.get("CI") == "true"

    def unavailable(reason: str) -> NoReturn:
        if ci:
            pytest.fail(f"{reason}; CI=true, so the test may not skip")
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("needs root to hide /etc/hosts in a mount namespace of its own")
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if missing:
        unavailable(f"needs {', '.join(missing)} (packages util-linux and iproute2)")
    made: list[NoLocalhost] = []

    def make(ipv6: bool = True) -> NoLocalhost:
        try:
            made.append(NoLocalhost(tmp_path / f"no-localhost-{len(made)}", ipv6=ipv6))
        except NamespacesUnavailable as exc:
            unavailable(str(exc))
        return made[-1]

    yield make
    for namespaces in made:
        namespaces.close()

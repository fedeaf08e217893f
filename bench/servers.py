"""The servers under test, and one running server: start, check, measure, stop.

Every server listens on 127.0.0.1 with a backlog of 4096 (the kernel's
default ceiling), logs at its default level to a file, and runs pinned to
the server core with ``taskset``; its children inherit the pinning.
A socket-activated server starts as ``systemd-socket-activate``, which
holds the listening socket and, on the first connection, executes the
server in the same process.  A server behind a load balancer expects a
PROXY protocol v2 header on every connection before it sends the poem:
its clients (the check's fetch, the load generator with ``-P``) send one
first, as the balancer's connections would.  A server over TLS (nginx's
stream ``ssl``, ``fastpoetry serve --tls-cert --tls-key``) gets a full
handshake from every client (the check's fetch, ``loadgen -T``), with the
run's own ECDSA P-256 certificate, and must end the poem with a
close_notify.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nginx_conf
import procfs

#: The peers' labels, which the report compares with.
NGINX = "nginx"
TWISTED = "twisted"
#: The label of fastpoetry's row behind a balancer, which the report judges
#: against plain fastpoetry's.
PROXY_V2 = "fastpoetry behind PROXY v2"

#: fastpoetry serve's option for listening sockets that expect a PROXY
#: protocol header (v1 or v2) before they send the poem.
PROXY_PROTOCOL_OPTION = "--proxy-protocol"

#: The rows of the TLS section, and --only's name for the two of them.
FASTPOETRY_TLS = "fastpoetry over TLS"
NGINX_TLS = "nginx stream ssl"
TLS = "tls"

#: How the run's certificate is made (openssl req): what the section's note says.
TLS_CERTIFICATE = "ECDSA P-256 (prime256v1), self-signed, CN=localhost, made for the run with openssl req"

#: PROXY protocol v2: the signature, version 2 with the PROXY command, and
#: by family the family-and-transport byte (TCP) and the addresses' length.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_PROXY = 0x21
_PROXY_V2_FAMILIES = {socket.AF_INET: (0x11, 12), socket.AF_INET6: (0x21, 36)}

#: The listen() backlog every server gets.
BACKLOG = 4096

#: Debian's interpreter: the one that sees python3-trio and python3-systemd,
#: the configuration the Debian package runs.
SYSTEM_PYTHON = "/usr/bin/python3"

#: How long a server may take to start, or to stop when asked.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Variables a parent systemd may have set for us; a server must not take
# them for its own.
_SYSTEMD_VARIABLES = (
    "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
    "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM",
)  # fmt: skip


class ServerFailed(Exception):
    """A server that did not start, or does not serve the poem: one line of why."""


@dataclass(frozen=True)
class Paths:
    """Where the benchmark's pieces are."""

    repo: Path
    bench: Path
    venv: Path
    logs: Path
    run: Path  # generated configuration files
    #: What fastpoetry's servers put on PYTHONPATH (see source.py).
    fastpoetry_src: Path


@dataclass(frozen=True)
class Launch:
    """How to start one server."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    #: Started by systemd-socket-activate: listening before the server runs.
    activated: bool = False
    #: Its clients send a PROXY protocol v2 header before they read, as a
    #: balancer's connections do (loadgen -P): it serves no poem without one.
    proxy_header: bool = False
    #: It speaks TLS: its clients make a full handshake first (loadgen -T)
    #: and read to the close_notify.
    tls: bool = False


@dataclass(frozen=True)
class TlsPair:
    """A certificate and its private key, PEM files."""

    cert: Path
    key: Path


def tls_pair(paths: Paths) -> TlsPair:
    """The run's certificate and key (TLS_CERTIFICATE), made on first use in ``paths.run``.

    The run directory is emptied as a run starts, so every run makes its
    own pair, and every server of the run uses the same one.  Valid for a
    day: nobody verifies it (loadgen -T does not, nor the check's fetch).
    """
    directory = paths.run / "tls"
    pair = TlsPair(directory / "cert.pem", directory / "key.pem")
    if pair.cert.exists() and pair.key.exists():
        return pair
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-days", "1", "-subj", "/CN=localhost", "-keyout", str(pair.key), "-out", str(pair.cert),
    ]  # fmt: skip
    try:
        subprocess.run(argv, capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        said = getattr(exc, "stderr", "") or str(exc)
        raise ServerFailed(f"could not make the TLS certificate: {said.strip().splitlines()[-1:]}") from None
    return pair


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARIABLES and k != "PYTHONPATH"}
    env.update(extra)
    return env


def _socket_activate(port: int, passed: dict[str, str], argv: list[str], *options: str) -> list[str]:
    # systemd-socket-activate passes on only the variables named with -E.
    setenv = [f"--setenv={name}={value}" for name, value in passed.items()]
    return ["systemd-socket-activate", f"--listen=127.0.0.1:{port}", *options, *setenv, *argv]


def fastpoetry(
    paths: Paths, poem: Path, port: int, *, activated: bool = False, options: tuple[str, ...] = (),
    src: Path | None = None, behind_proxy: bool = False, tls: TlsPair | None = None,
) -> Launch:  # fmt: skip
    """``python3 -m fastpoetry serve`` from the run's copy of the work tree, on Debian's trio.

    ``src``: import fastpoetry from there instead (the --baseline copy);
    everything else about the launch stays the same, so that the two rows
    differ by their code only.  ``behind_proxy``: the same launch plus
    --proxy-protocol, its clients sending a PROXY v2 header first.
    ``tls``: the same launch plus --tls-cert and --tls-key.
    """
    pythonpath = {"PYTHONPATH": str(src or paths.fastpoetry_src)}
    proxy = (PROXY_PROTOCOL_OPTION,) if behind_proxy else ()
    secure = ("--tls-cert", str(tls.cert), "--tls-key", str(tls.key)) if tls else ()
    serve = [SYSTEM_PYTHON, "-m", "fastpoetry", "serve", "--poem", str(poem), *options, *proxy, *secure]
    speaks = {"proxy_header": behind_proxy, "tls": tls is not None}
    if activated:
        argv = _socket_activate(port, pythonpath, serve)
        return Launch(argv, _environment(), activated=True, **speaks)
    argv = [*serve, "--port", str(port), "--iface", "127.0.0.1"]
    return Launch(argv, _environment(**pythonpath), **speaks)


def twisted(paths: Paths, poem: Path, port: int, *, activated: bool = False, log_file: Path) -> Launch:
    """twistd running twisted_poetry.tac, with Twisted from the benchmark's venv."""
    argv = [
        str(paths.venv / "bin" / "twistd"),
        "--nodaemon",
        "--pidfile=",
        f"--logfile={log_file}",
        f"--python={paths.bench / 'twisted_poetry.tac'}",
    ]
    settings = {"POETRY_FILE": str(poem)}
    if activated:
        settings["POETRY_LISTEN"] = "systemd"
        # Twisted takes inherited sockets only with names (LISTEN_FDNAMES),
        # as systemd itself always passes them; systemd-socket-activate
        # passes names only when given some.
        argv = _socket_activate(port, settings, argv, "--fdname=poetry")
        return Launch(argv, _environment(), activated=True)
    settings.update(POETRY_LISTEN="tcp", POETRY_PORT=str(port), POETRY_IFACE="127.0.0.1", POETRY_BACKLOG=str(BACKLOG))
    return Launch(argv, _environment(**settings))


def nginx(paths: Paths, poem: Path, port: int, *, tls: TlsPair | None = None) -> Launch:
    """Debian's nginx, its stream module returning the poem; with ``tls``, over TLS (stream ``ssl``)."""
    run_dir = paths.run / f"nginx-{port}"
    run_dir.mkdir(parents=True, exist_ok=True)
    conf = run_dir / "nginx.conf"
    pair = (tls.cert, tls.key) if tls else None
    conf.write_bytes(nginx_conf.render(poem.read_bytes(), port, run_dir, backlog=BACKLOG, tls=pair))
    # -e: where errors go before the configuration names its own log.
    argv = ["nginx", "-p", str(run_dir), "-c", str(conf), "-e", str(run_dir / "nginx-error.log")]
    return Launch(argv, _environment(), tls=tls is not None)


def trio_naive(paths: Paths, poem: Path, port: int) -> Launch:
    """trio.serve_tcp with a task per client (trio_poetry.py), on Debian's trio."""
    argv = [SYSTEM_PYTHON, str(paths.bench / "trio_poetry.py"), str(poem), str(port), "127.0.0.1"]
    return Launch(argv, _environment())


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def proxy_v2_header(sock: socket.socket) -> bytes:
    """The PROXY v2 header a balancer would send for connected TCP ``sock``: the bytes of ``loadgen -P``.

    Its own address is the source, the server's the destination, so that
    the server logs the client's true address.
    """
    family_byte, length = _PROXY_V2_FAMILIES[sock.family]
    source, destination = sock.getsockname(), sock.getpeername()
    addresses = (
        socket.inet_pton(sock.family, source[0]) + socket.inet_pton(sock.family, destination[0])
        + struct.pack("!HH", source[1], destination[1])
    )  # fmt: skip
    return PROXY_V2_SIGNATURE + bytes([PROXY_V2_PROXY, family_byte]) + struct.pack("!H", length) + addresses


def _connect(port: int, timeout: float, proxy_header: bool) -> socket.socket:
    """A connection to 127.0.0.1:``port``, its PROXY v2 header sent if ``proxy_header``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if proxy_header:
            sock.sendall(proxy_v2_header(sock))
    except OSError:
        sock.close()
        raise
    return sock


def _read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def tls_client_context() -> ssl.SSLContext:
    """What loadgen -T is, in Python: TLS 1.2 or 1.3, no verification, no session kept.

    An end without a close_notify is an error, as for loadgen -T: Python
    sets OP_IGNORE_UNEXPECTED_EOF on a new context with OpenSSL 3, which
    would read it as a clean end, so it is cleared.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options &= ~getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


def fetch_tls(port: int, timeout: float = START_TIMEOUT) -> tuple[bytes, str]:
    """One poem over TLS from 127.0.0.1:``port``, read to the close_notify; and what was negotiated.

    What was negotiated: the version, the cipher, and whether the server
    sent a session ticket ("TLSv1.3 TLS_AES_256_GCM_SHA384, no ticket").
    A stream that ends without a close_notify raises (an ssl.SSLError):
    the poem might have been cut.
    """
    with _connect(port, timeout, False) as raw:
        with tls_client_context().wrap_socket(raw, suppress_ragged_eofs=False) as sock:
            poem = _read_to_end(sock)
            cipher = sock.cipher()
            session = sock.session
            ticket = "a ticket" if session is not None and session.has_ticket else "no ticket"
            return poem, f"{sock.version()} {cipher[0] if cipher else '?'}, {ticket}"


def fetch(port: int, timeout: float = START_TIMEOUT, *, proxy_header: bool = False) -> bytes:
    """One poem from 127.0.0.1:``port``: connect (and send a PROXY v2 header), read to end of stream."""
    with _connect(port, timeout, proxy_header) as sock:
        return _read_to_end(sock)


class Server:
    """One server process (and its children), pinned to ``cores``."""

    def __init__(self, label: str, launch: Launch, port: int, log_path: Path, cores: str) -> None:
        self.label = label
        self.launch = launch
        self.port = port
        self.log_path = log_path
        self.cores = cores
        self.process: subprocess.Popen[bytes] | None = None
        #: Over TLS: what the check's fetch got (see fetch_tls).
        self.negotiated = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["taskset", "--cpu-list", self.cores, *self.launch.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.launch.env,
                # Its own session: a Ctrl-C reaches the benchmark, which
                # stops the servers in order, and not the servers directly.
                start_new_session=True,
            )

    def wait_listening(self) -> None:
        """Until the port takes connections (for an activated server: until it listens)."""
        if self.launch.activated:
            said = f"Listening on 127.0.0.1:{self.port} "  # what systemd-socket-activate says
            self._wait_for(lambda: said in self._log_text(), "listen")
        else:
            self._wait_for(self._connects, "accept connections")

    def check_poem(self, poem: bytes) -> None:
        """One fetch must bring exactly ``poem``; an activated server must now be the server."""
        try:
            if self.launch.tls:
                got, self.negotiated = fetch_tls(self.port)
            else:
                got = fetch(self.port, proxy_header=self.launch.proxy_header)
        except OSError as exc:  # ssl.SSLError too
            raise ServerFailed(f"{self.label}: fetching a poem failed: {exc}{self._log_tail()}") from None
        if got != poem:
            raise ServerFailed(f"{self.label}: served {len(got)} bytes that are not the poem ({len(poem)} bytes)")
        if self.launch.activated:
            command = procfs.command_line(self.pid)
            if not command or "systemd-socket-activate" in command[0]:
                raise ServerFailed(f"{self.label}: PID {self.pid} is not the server after the first connection: {command}")

    def pids(self) -> list[int]:
        return procfs.tree(self.pid)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; children left over are killed by PID."""
        if self.process is None:
            return
        family = procfs.tree(self.pid) if self.alive() else []
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in family:
            if pid != self.pid and procfs.command_line(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _connects(self) -> bool:
        # With the header it expects: a server behind a balancer warns of a
        # connection that closes without one, and this is no such client.
        try:
            sock = _connect(self.port, 1.0, self.launch.proxy_header)
        except OSError:
            return False
        with sock:
            if self.launch.tls:
                # A handshake, not a bare close, which a TLS server counts
                # as a failed one.  If it fails, the server still listens:
                # check_poem says what is wrong.
                try:
                    tls_client_context().wrap_socket(sock).close()
                except OSError:
                    pass
        return True

    def _wait_for(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if not self.alive():
                raise ServerFailed(f"{self.label}: exited ({self.process.returncode if self.process else '?'}) "
                                   f"before it would {what}{self._log_tail()}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.label}: did not {what} within {START_TIMEOUT:g} s{self._log_tail()}")
            time.sleep(0.02)

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self) -> str:
        lines = [line for line in self._log_text().splitlines() if line.strip()]
        return f"; its log ends: {lines[-1].strip()}" if lines else ""


# --------------------------------------------------------------------------
# The servers under test, by the names --only takes.


@dataclass(frozen=True)
class Contender:
    """A server under test: its name for --only, its label in the tables, how to start it."""

    key: str
    label: str
    launch: Callable[[Paths, Path, int, Path], Launch]  # paths, poem, port, log file


def twistd_log(log: Path) -> Path:
    # twistd's own log file, beside the file its standard error goes to.
    return log.with_name(f"{log.stem}-twistd.log")


CONTENDERS = (
    Contender("fastpoetry", "fastpoetry", lambda p, poem, port, log: fastpoetry(p, poem, port)),
    Contender(
        "activated",
        "fastpoetry (activated)",
        lambda p, poem, port, log: fastpoetry(p, poem, port, activated=True),
    ),
    Contender("proxy", PROXY_V2, lambda p, poem, port, log: fastpoetry(p, poem, port, behind_proxy=True)),
    Contender(
        "twisted",
        TWISTED,
        lambda p, poem, port, log: twisted(p, poem, port, log_file=twistd_log(log)),
    ),
    Contender(NGINX, NGINX, lambda p, poem, port, log: nginx(p, poem, port)),
    Contender("trio", "trio serve_tcp", lambda p, poem, port, log: trio_naive(p, poem, port)),
)


#: The TLS section's rows, both chosen by --only tls: fastpoetry, then its reference.
TLS_CONTENDERS = (
    Contender(TLS, FASTPOETRY_TLS, lambda p, poem, port, log: fastpoetry(p, poem, port, tls=tls_pair(p))),
    Contender(TLS, NGINX_TLS, lambda p, poem, port, log: nginx(p, poem, port, tls=tls_pair(p))),
)


#: --only's name for the --baseline row.
BASELINE = "baseline"


def baseline(label: str, src: Path) -> Contender:
    """The --baseline row: the ``fastpoetry`` row's launch, importing fastpoetry from ``src``."""
    return Contender(BASELINE, label, lambda p, poem, port, log: fastpoetry(p, poem, port, src=src))
